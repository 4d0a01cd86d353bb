"""One rank's supervisor: what the `deepspeed` launcher starts on every local rank, around the job module.

    deepspeed ... --module hyperofa_dist.runtime.rank --target <job module> --job <stage dir>/job.json

It runs `python -u -m <job module> <the same arguments>` as its child and stays beside it, so that a rank never
dies unexplained and never outlives its job:
- the child's output goes to our output (the driver's stderr) and to `<stage dir>/logs/rank<r>.log`;
- when the child ends, `logs/rank<r>.exit.json` records its exit status or signal, whether it was asked to stop,
  and the time: the driver names the first rank that died on its own, with its log (runtime/launch.py);
- SIGTERM/SIGINT are passed to the child; if it has not ended GRACE_S later, it is killed;
- the driver is watched (its host, pid and start time come in HYPEROFA_DRIVER; only on the driver's host, since
  a Slurm or MPI launch may carry the variable to other nodes): when it is gone, however it died, the child is
  stopped the same way; the launcher dying (our parent) sends us SIGTERM (parent-death signal);
- the rank's CPU all-reduce segment in /dev/shm is unlinked once the child has ended (runtime/shm.py).
The child itself dies with us if we are killed outright (the job's parent-death signal, runtime/job.py).
Only the standard library and the job directory format are imported: this process costs milliseconds.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

from ..formats.jobdir import rank_log, write_exit_record
from .process import TERMINATING, alive, set_parent_death_signal, signal_name
from .shm import remove_segment, segment_name

DRIVER_ENV = "HYPEROFA_DRIVER"
MODULE = "hyperofa_dist.runtime.rank"
GRACE_S = 10.0
POLL_S = 0.2


def driver_env(ident: str) -> str:
    """HYPEROFA_DRIVER's value for the driver `ident` (runtime.process.identity) on this host."""
    return f"{socket.gethostname()}/{ident}"


def watched_driver(value: Optional[str]) -> Optional[str]:
    """The driver identity to watch, or None: no driver named, or one on another host (its pid means nothing here)."""
    if not value or "/" not in value:
        return None
    host, _, ident = value.rpartition("/")
    return ident if host == socket.gethostname() else None


def _pop_option(argv: list[str], name: str) -> Optional[str]:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
            del argv[i : i + 2]
            return value
        if arg.startswith(name + "="):
            del argv[i]
            return arg.split("=", 1)[1]
    return None


def _copy_output(source: Any, log: Any) -> None:
    """Child output -> our stdout and the rank's log, byte for byte (progress bars' carriage returns included)."""
    out: Optional[Any] = sys.stdout.buffer
    fd = source.fileno()
    while True:
        try:
            data = os.read(fd, 1 << 16)
        except OSError:
            break
        if not data:
            break
        if out is not None:
            try:
                out.write(data)
                out.flush()
            except (OSError, ValueError):  # the driver that read us is gone: keep the log
                out = None
        try:
            log.write(data)
            log.flush()
        except (OSError, ValueError):
            pass


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    target = _pop_option(argv, "--target")
    job = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--job"), None)
    if not target or not job:
        print("hyperofa rank: usage: --target <job module> --job <job.json> [job arguments]", file=sys.stderr)
        return 2
    out = Path(job).resolve().parent
    rank = int(os.environ.get("RANK", "0"))
    set_parent_death_signal(signal.SIGTERM)  # the launcher died: stop the child as for any termination

    log_path = rank_log(out, rank)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab")
    log.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} rank {rank}: {target} (supervisor pid {os.getpid()})\n"
              .encode())
    log.flush()
    child = subprocess.Popen([sys.executable, "-u", "-m", target, *argv], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
    copier = threading.Thread(target=_copy_output, args=(child.stdout, log), daemon=True)
    copier.start()

    asked: list[str] = []

    def stop(signum: int, frame: object) -> None:
        asked.append(signal_name(signum))
        try:
            child.send_signal(signum)
        except ProcessLookupError:
            pass

    for signum in TERMINATING:
        signal.signal(signum, stop)
    driver = watched_driver(os.environ.get(DRIVER_ENV))
    kill_at: Optional[float] = None
    while True:
        try:
            code = child.wait(timeout=POLL_S)
            break
        except subprocess.TimeoutExpired:
            pass
        if driver and not asked and not alive(driver):
            asked.append("driver gone")
            print(f"hyperofa: rank {rank}: the driver (pid {driver.split(':')[0]}) is gone; stopping this rank",
                  file=sys.stderr, flush=True)
            try:
                child.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        if asked and kill_at is None:
            kill_at = time.monotonic() + GRACE_S
        if kill_at is not None and time.monotonic() > kill_at:
            child.kill()
            kill_at = float("inf")
    copier.join(timeout=5.0)
    log.close()
    if os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT"):
        remove_segment(segment_name(os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"], rank))
    record: dict[str, Any] = {"pid": child.pid, "log": str(log_path), "asked": asked[0] if asked else None}
    if code < 0:
        record.update(signal=-code, signal_name=signal_name(-code), status=None)
    else:
        record.update(status=code, signal=None)
    try:
        write_exit_record(out, rank, record)
    except OSError:
        pass
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
