"""Process hygiene shared by the driver, the rank supervisors and the ranks: who is alive, who dies with whom,
and how a termination signal becomes an exception that closes what a `with` block opened.

Three rules hold a launch together (runtime/launch.py, runtime/rank.py, runtime/job.py):
- a SIGTERM (or SIGINT) becomes `Interrupted`, so context managers run: MLflow runs end, Ray shuts down, locks
  are released, shared memory is unlinked; the process then exits 128 + signal number;
- a child that must not outlive its parent asks the kernel for a parent-death signal (Linux `prctl`
  PR_SET_PDEATHSIG), which also covers a parent killed by SIGKILL;
- a process identifies another by (pid, start time), so a recycled pid is never taken for the original.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Iterator, Optional

PR_SET_PDEATHSIG = 1
TERMINATING = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A termination signal, raised in the main thread (a KeyboardInterrupt, so `except Exception` lets it by)."""

    def __init__(self, signum: int):
        super().__init__(signal_name(signum))
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _raise_interrupted(signum: int, frame: object) -> None:
    ignore_termination()
    raise Interrupted(signum)


def raise_on_termination() -> None:
    """SIGTERM (and SIGINT) raise `Interrupted` in the main thread from now on (call from the main thread).

    Only the first: a process being stopped often gets the signal more than once (a rank from the driver's
    process-group signal, its supervisor and the launcher), and a second exception raised inside the first one's
    clean-up (ending an MLflow run, an atexit hook) would cut that clean-up short. Whoever sent it escalates to
    SIGKILL if the process does not end (runtime/rank.py, runtime/launch.py)."""
    for signum in TERMINATING:
        signal.signal(signum, _raise_interrupted)


def ignore_termination() -> None:
    """From now on SIGTERM and SIGINT are ignored: this process is already on its way out."""
    if threading.current_thread() is threading.main_thread():
        for signum in TERMINATING:
            signal.signal(signum, signal.SIG_IGN)


@contextlib.contextmanager
def signal_handlers(handler) -> Iterator[None]:
    """`handler` for SIGINT and SIGTERM inside the block, the previous handlers after it."""
    previous = {signum: signal.getsignal(signum) for signum in TERMINATING}
    for signum in TERMINATING:
        signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def set_parent_death_signal(signum: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send `signum` to this process when its parent exits (Linux only; False elsewhere)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _stat(pid: int) -> Optional[tuple[str, str]]:
    """(state, start time) of `pid` from /proc/<pid>/stat, None when no such process exists.

    The start time is field 22 (clock ticks since boot); the command name before the fields may hold spaces and
    parentheses, so they are counted from the last ')'."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2 :].split()
    return (fields[0].decode(), fields[19].decode()) if len(fields) > 19 else None


def start_time(pid: int) -> Optional[str]:
    """The kernel's start time of `pid`, None when no such process exists (or it is a zombie: dead, unreaped)."""
    stat = _stat(pid)
    return None if stat is None or stat[0] == "Z" else stat[1]


def identity(pid: Optional[int] = None) -> str:
    """`pid:start` of this (or another) process: what a watcher compares to tell it still runs."""
    pid = os.getpid() if pid is None else pid
    return f"{pid}:{start_time(pid) or '?'}"


def alive(ident: str) -> bool:
    """Whether the process `pid:start` (from `identity`) still runs; a recycled pid does not count."""
    pid_text, _, start = ident.partition(":")
    try:
        pid = int(pid_text)
    except ValueError:
        return False
    now = start_time(pid)
    if now is None:
        # no procfs: fall back to "a process with that pid exists"
        return pid_alive(pid) if not os.path.isdir("/proc") else False
    return start in ("?", "") or now == start


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
