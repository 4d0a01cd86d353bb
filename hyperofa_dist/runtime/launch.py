"""The `deepspeed` launcher for both DeepSpeed jobs (hypernet, pretrain): command, hostfile, environment, clean-up.

One node: N local ranks (`--num_gpus N`, which the runner also uses as the process count on a CPU-only machine;
gloo there, NCCL on GPUs) on a free rendezvous port, whose store this process hosts on 127.0.0.1 only (torch's
rank 0 would listen on every interface), with gloo's and NCCL's sockets on loopback too; GPUs picked by
`include`/`exclude` or the user's CUDA_VISIBLE_DEVICES are named with `--include localhost:...` (`--num_gpus` would
put the ranks on GPUs 0..N-1). Many nodes: `--hostfile`, `--num_nodes`, `--launcher` (launcher flags go before the
module, DeepSpeed #662); pdsh gets the job's arguments quoted for its remote shell. The MLflow run rank 0 logs into
travels in the job file,
which every rank reads, local or remote.

Every rank runs under its supervisor (runtime/rank.py), which logs it, records how it ended and stops it when the
driver is gone. The launcher runs in a session of its own: the driver forwards SIGINT/SIGTERM to that whole
process group (launcher, supervisors, ranks, loader workers) and kills the group if it has not ended GRACE_S
later, then raises `Interrupted`. When a rank died, the driver prints one line naming the first rank that died on
its own, how (exit status or signal) and its log. Every local launch starts by removing the CPU all-reduce
segments of dead launches from /dev/shm and ends by removing its own (runtime/shm.py).
"""

from __future__ import annotations

import contextlib
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from ..errors import HyperofaError
from ..formats.jobdir import clear_exit_records, read_exit_records
from .process import Interrupted, identity, ignore_termination, signal_handlers, signal_name
from .rank import DRIVER_ENV, driver_env
from .rank import MODULE as SUPERVISOR
from .shm import SHM_PREFIX, remove_orphan_segments, remove_shm_buffers  # noqa: F401 (SHM_PREFIX: re-exported)

DEFAULT_MULTI_NODE_PORT = 29500
GRACE_S = 30.0
# `launcher=nossh`: no ssh/pdsh/mpirun; every node runs its own launcher (`--no_ssh --node_rank N`), rank 0 on the
# hostfile's first host. launch/nossh_node.sh starts it on each node.
NO_SSH = "nossh"


@dataclass(frozen=True)
class LaunchTarget:
    """Which job module to start and which config section holds its launch keys (for error messages)."""

    module: str
    section: str  # "hypernet" or "pretrain": the launch keys are `<section>.hostfile`, ...


def read_hostfile(path: Path, key: str = "hostfile") -> list[tuple[str, int]]:
    if not path.is_file():
        raise HyperofaError(f"{path}: hostfile not found ({key})")
    hosts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].startswith("slots=") or not parts[1][6:].isdigit():
            raise HyperofaError(f"{path}:{number}: expected `hostname slots=N`, got {line!r}")
        hosts.append((parts[0], int(parts[1][6:])))
    if not hosts:
        raise HyperofaError(f"{path}: hostfile lists no host")
    return hosts


VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"


@dataclass(frozen=True)
class Machine:
    """What this node offers a local launch: its GPUs (as this process sees them) and the user's
    CUDA_VISIBLE_DEVICES. `Machine.here()` reads them; tests describe other machines."""

    gpus: int
    visible: str = ""

    @staticmethod
    def here() -> "Machine":
        import torch

        return Machine(torch.cuda.device_count(), os.environ.get(VISIBLE_DEVICES, "").strip())


def device_filter(hosts: dict[str, int], launch: Any, section: str) -> dict[str, list[int]]:
    """The slots per host that `<section>.include`/`exclude` leave, as DeepSpeed's runner reads those strings
    (its own parser, so the count here is the count it starts); a host or slot that does not exist is one line."""
    key = f"{section}.{'include' if launch.include is not None else 'exclude'}"
    from .dsconfig import import_deepspeed

    import_deepspeed()
    from deepspeed.launcher.runner import parse_inclusion_exclusion

    try:
        chosen = parse_inclusion_exclusion(dict(hosts), launch.include or "", launch.exclude or "")
    except ValueError as exc:
        raise HyperofaError(f"{key}={launch.include or launch.exclude}: {exc} (hosts: {hosts})") from None
    if not chosen:
        raise HyperofaError(f"{key}={launch.include or launch.exclude}: leaves no device to run on (hosts: {hosts})")
    return {host: list(slots) for host, slots in chosen.items()}


def local_devices(launch: Any, section: str, ranks: Optional[int] = None,
                  machine: Optional[Machine] = None) -> tuple[Optional[list[int]], int]:
    """(the GPU numbers a local launch runs on, or None for `--num_gpus`; the number of ranks).

    DeepSpeed's runner, given `--num_gpus N`, drops the user's CUDA_VISIBLE_DEVICES and runs on GPUs 0..N-1, on a
    shared node other people's. So the GPUs are named: `<section>.include`/`exclude` (the machine's own GPU
    numbers), else CUDA_VISIBLE_DEVICES (its first `ranks_per_node` devices when that is set); only with neither
    does the launch take every GPU (`--num_gpus`). A CPU-only machine runs `ranks_per_node` (default 2) ranks."""
    machine = machine or Machine.here()
    picked = launch.include if launch.include is not None else launch.exclude
    key = f"{section}.{'include' if launch.include is not None else 'exclude'}"
    if machine.gpus == 0:
        if picked is not None:
            raise HyperofaError(f"{key}={picked}: picks GPUs, and this machine has none (CPU ranks: {section}.ranks_per_node)")
        return None, ranks or launch.ranks_per_node or 2
    if picked is not None:
        if machine.visible:
            raise HyperofaError(
                f"{key}={picked} and {VISIBLE_DEVICES}={machine.visible} both pick GPUs; unset one ({key} numbers "
                "the machine's GPUs as nvidia-smi does)"
            )
        chosen = device_filter({"localhost": machine.gpus}, launch, section)
        if set(chosen) != {"localhost"}:
            raise HyperofaError(f"{key}={picked}: a launch without a hostfile runs on localhost only")
        slots, source = chosen["localhost"], f"{key}={picked}"
    elif machine.visible:
        try:
            slots = [int(part) for part in machine.visible.split(",")]
        except ValueError:
            raise HyperofaError(
                f"{VISIBLE_DEVICES}={machine.visible}: names GPUs by UUID or MIG id, which DeepSpeed's runner cannot "
                f"select; unset it and set {section}.include=localhost:<GPU numbers>"
            ) from None
        source = f"{VISIBLE_DEVICES}={machine.visible}"
    else:
        return None, ranks or launch.ranks_per_node or machine.gpus
    wanted = ranks or launch.ranks_per_node or len(slots)
    if wanted > len(slots):
        raise HyperofaError(
            f"{section}.ranks_per_node={wanted} ranks, but {source} gives {len(slots)} GPU{'s' if len(slots) > 1 else ''}"
        )
    return slots[:wanted], wanted


def planned_world_size(launch: Any, section: str = "launch", machine: Optional[Machine] = None) -> int:
    """Ranks the launch will start: local ranks, or the slots of the hostfile's hosts (the first num_nodes, or
    those `include`/`exclude` leave)."""
    if launch.hostfile:
        hosts = read_hostfile(Path(launch.hostfile), f"{section}.hostfile")
        if launch.include is not None or launch.exclude is not None:
            return sum(len(slots) for slots in device_filter(dict(hosts), launch, section).values())
        hosts = hosts[: launch.num_nodes] if launch.num_nodes else hosts
        return sum(launch.ranks_per_node or slots for _, slots in hosts)
    return local_devices(launch, section, machine=machine)[1]


def free_port() -> int:
    """A port for rank 0's rendezvous, free now and outside the kernel's ephemeral range.

    Rank 0 binds it seconds later (after importing torch and DeepSpeed). A port the kernel handed out for
    `bind(0)` sits in the ephemeral range, which every outgoing connection on the machine also draws from (Ray,
    MLflow, other jobs), so in those seconds it can be taken and the launch dies with a rank killed. Below the
    range only an explicit bind can take it."""
    low = _ephemeral_low()
    rng = random.SystemRandom()
    for _ in range(64):
        port = rng.randrange(max(1024, low - 12000), low)
        if _bindable(port):
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # a crowded range: take what the kernel gives
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def remote_shell_arguments(cmd: list[str]) -> list[str]:
    """`cmd` as a pdsh launch must be given it. DeepSpeed's pdsh runner joins the working directory (`cd <cwd>;`),
    the interpreter and the job's arguments into one remote shell command, quoting none of them (an argument
    with a space only goes into double quotes, where `$` and backticks still run). The job's arguments (the job
    file's path) are quoted here so the remote shell reads them back unchanged; the working directory and the
    interpreter, which DeepSpeed writes itself, must need no quoting, or the launch is refused in one line."""
    if "--launcher" not in cmd or cmd[cmd.index("--launcher") + 1] != "pdsh":
        return cmd
    for what, value in (("working directory", os.path.abspath(".")), ("python interpreter", sys.executable)):
        if shlex.quote(value) != value:
            raise HyperofaError(
                f"{value}: DeepSpeed's pdsh launcher passes the {what} unquoted through a remote shell; use one whose "
                "path has only letters, digits and @%+=:,./- (a pdsh launch from here would run parts of it as commands)"
            )
    start = cmd.index("--module") + 1
    return cmd[:start] + [_pdsh_quoted(arg) for arg in cmd[start:]]


def _pdsh_quoted(arg: str) -> str:
    if " " not in arg:
        return shlex.quote(arg)
    # DeepSpeed puts an argument with a space into double quotes itself (escaping `"`): escape what stays
    # special there.
    return arg.replace("\\", "\\\\").replace("$", "\\$").replace("`", "\\`")


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("", port))  # all interfaces, as the rendezvous store binds
        except OSError:
            return False
    return True


LOOPBACK = "127.0.0.1"


@contextlib.contextmanager
def loopback_rendezvous(port: int) -> Iterator[dict[str, str]]:
    """For a local launch: rank 0's rendezvous store, hosted here on 127.0.0.1:`port` only, and the environment
    that makes every rank a client of it and keeps gloo's and NCCL's sockets on loopback too. Left to itself,
    torch's rank 0 would host the store on all interfaces, open to any host that can reach the port."""
    import datetime

    import torch.distributed as dist

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((LOOPBACK, port))
        listener.listen(256)
        store = dist.TCPStore(LOOPBACK, port, None, True, timeout=datetime.timedelta(minutes=30),
                              wait_for_workers=False, master_listen_fd=listener.fileno())
    except (OSError, RuntimeError) as exc:
        listener.close()
        raise HyperofaError(f"cannot host the rendezvous store on {LOOPBACK}:{port} ({exc}); set another master_port") from None
    listener.detach()  # the store owns the socket now, and closes it when it goes
    try:
        yield {"TORCHELASTIC_USE_AGENT_STORE": "True", "MASTER_ADDR": LOOPBACK}
    finally:
        del store


def launch_command(
    launch: Any, job_file: Path, target: LaunchTarget, *, ranks: Optional[int] = None, extra: tuple[str, ...] = (),
    node_rank: int = 0, machine: Optional[Machine] = None,
) -> list[str]:
    """The launcher invocation. `launch` is a config section with the launch keys (`config.LaunchConfig`);
    `ranks` forces that many local ranks (the benchmarks' 1- and 2-rank runs); `node_rank` is this node's index
    in the hostfile when every node starts its own launcher (`launcher=nossh`); `machine` is this node (read
    when not given)."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner"]
    if launch.hostfile and ranks is None:
        hostfile = Path(launch.hostfile)
        hosts = read_hostfile(hostfile, f"{target.section}.hostfile")
        cmd += ["--hostfile", str(hostfile.resolve()), "--master_port", str(launch.master_port or DEFAULT_MULTI_NODE_PORT)]
        if launch.launcher == NO_SSH:
            # Without ssh the runner cannot ask the first host for its address, nor start the other nodes' ranks.
            cmd += ["--no_ssh", "--node_rank", str(node_rank), "--master_addr", hosts[0][0]]
        else:
            cmd += ["--launcher", launch.launcher]
        if launch.num_nodes:
            cmd += ["--num_nodes", str(launch.num_nodes)]
        if launch.ranks_per_node:
            cmd += ["--num_gpus", str(launch.ranks_per_node)]
        if launch.include is not None or launch.exclude is not None:
            device_filter(dict(hosts), launch, target.section)  # a host or slot that is not there: one line, now
            cmd += ["--include", launch.include] if launch.include is not None else ["--exclude", launch.exclude]
    else:
        devices, local = local_devices(launch, target.section, ranks, machine)
        cmd += (["--include", f"localhost:{','.join(map(str, devices))}"] if devices is not None
                else ["--num_gpus", str(local)])
        cmd += ["--master_port", str(launch.master_port or free_port())]
    return cmd + ["--module", SUPERVISOR, "--target", target.module, "--job", str(job_file), *extra]


@dataclass
class LaunchResult:
    returncode: int
    stdout: Optional[str]  # the launch's output when captured
    failure: Optional[str]  # the line naming the first rank that died, when one did


def run_launcher(cmd: list[str], capture: bool = False) -> LaunchResult:
    """Run the launcher and wait for it; its ranks' output streams to our stderr (stdout stays for results: the
    demo's table, a bench's JSON line), or is returned when `capture`.

    A SIGINT/SIGTERM to us is passed to the launch's process group; once the group has ended (or been killed
    GRACE_S later) the shared memory is removed and `Interrupted` is raised."""
    launched = remote_shell_arguments(cmd)
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env[DRIVER_ENV] = driver_env(identity())  # the supervisors stop their ranks once this process is gone
    local = "--hostfile" not in cmd
    if local and "--include" in cmd:  # the devices are named there (local_devices); the runner sets each rank's own
        env.pop(VISIBLE_DEVICES, None)
    job_dir = Path(cmd[cmd.index("--job") + 1]).parent
    clear_exit_records(job_dir)
    rendezvous = contextlib.ExitStack()  # a local launch's store, hosted by this process until the launch ends
    if local:
        env.update(rendezvous.enter_context(loopback_rendezvous(int(cmd[cmd.index("--master_port") + 1]))))
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # the ranks' own connections: loopback, as the store
        env.setdefault("NCCL_SOCKET_IFNAME", "lo")
        removed, freed = remove_orphan_segments()
        if removed:
            _say(f"removed {removed} shared-memory segments of killed launches from /dev/shm ({freed / 2**20:.0f} MiB)")
    received: list[int] = []
    killer: list[threading.Timer] = []
    proc = subprocess.Popen(
        launched, env=env, text=capture, start_new_session=True,
        stdout=subprocess.PIPE if capture else 2,  # fd 2, so it also works under a replaced sys.stderr
        stderr=subprocess.STDOUT if capture else None,
    )

    def forward(signum: int, frame: object) -> None:
        received.append(signum)
        _signal_group(proc.pid, signum if len(received) == 1 else signal.SIGKILL)  # a second signal: at once
        if not killer:
            killer.append(threading.Timer(GRACE_S, _signal_group, (proc.pid, signal.SIGKILL)))
            killer[0].daemon = True
            killer[0].start()
    try:
        if threading.current_thread() is threading.main_thread():
            with signal_handlers(forward):
                stdout, _ = proc.communicate()
        else:
            stdout, _ = proc.communicate()
    finally:
        for timer in killer:
            timer.cancel()
        if proc.poll() is None:  # we are leaving on an exception of our own: take the launch with us
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
        if local:
            remove_shm_buffers(cmd[cmd.index("--master_port") + 1])
        rendezvous.close()
    failure = None
    if proc.returncode != 0 or received:
        failure = describe_rank_failure(read_exit_records(job_dir), _local_ranks(cmd) if local else None)
        if failure and not received:
            _say(failure)
    if received:
        ignore_termination()  # as runtime.process.raise_on_termination: one exception, an undisturbed clean-up
        raise Interrupted(received[0])
    return LaunchResult(proc.returncode, stdout, failure)


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _say(text: str) -> None:
    print(f"hyperofa: {text}", file=sys.stderr, flush=True)


def _local_ranks(cmd: list[str]) -> Optional[int]:
    try:
        if "--include" in cmd:  # localhost:2,3
            return len(cmd[cmd.index("--include") + 1].split(":", 1)[1].split(","))
        return int(cmd[cmd.index("--num_gpus") + 1])
    except (ValueError, IndexError):
        return None


def describe_rank_failure(records: list[dict[str, Any]], world: Optional[int] = None) -> Optional[str]:
    """One line: the first rank that died on its own (not stopped because another died, or because we were asked
    to stop), how, and where its output is; None when no rank died on its own."""
    failed = [r for r in records if r.get("signal") or r.get("status") not in (0, None)]
    own = sorted((r for r in failed if not r.get("asked")), key=lambda r: r.get("time", 0.0))
    missing = sorted(set(range(world)) - {r["rank"] for r in records}) if world else []
    if not own:
        if failed and missing:
            return (f"rank {', '.join(map(str, missing))} left no exit record: it was killed together with its "
                    "supervisor (SIGKILL from outside the job: the kernel's out-of-memory killer, a scheduler or a "
                    "user; `dmesg` names the OOM killer's victims)")
        return None
    first = own[0]
    if first.get("signal"):
        how = f"was killed by {first.get('signal_name') or signal_name(first['signal'])}"
        if first["signal"] == signal.SIGKILL:
            how += (" (from outside the job: the kernel's out-of-memory killer, a scheduler or a user; `dmesg` "
                    "names the OOM killer's victims)")
        elif first["signal"] in (signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT, signal.SIGILL, signal.SIGFPE):
            how += " (a crash in native code)"
    else:
        how = f"exited with status {first['status']}"
    others = len(failed) - 1
    after = f"; {others} other rank{'s' if others > 1 else ''} ended too" if others > 0 else ""
    return f"rank {first['rank']} (pid {first.get('pid')}) {how}{after}; its output: {first.get('log')}"
