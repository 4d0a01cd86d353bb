"""DeepSpeed's CPU all-reduce segments in /dev/shm: who removes them, and when (docs/DISTRIBUTED.md §2.2).

Each rank of a CPU launch creates `deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>` (64 MiB) and DeepSpeed
never unlinks it. Three removals, each for a way a launch can end:
- the rank's supervisor unlinks its own rank's segment when the rank's process has ended (runtime/rank.py);
- the driver unlinks every segment of its launch's port when the launch ends (runtime/launch.py);
- before a local launch, the driver unlinks segments that no running process has mapped or open: those of
  launches whose processes were all killed (kill -9 of the driver and its ranks).
Unlinking a segment that a live rank still maps only removes the name; the memory stays until that rank unmaps it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

SHM_PREFIX = "deepspeed_allreduce_buffer"
SHM_DIR = Path("/dev/shm")
# A segment is created (shm_open) and mapped within microseconds; one younger than this is left alone by the sweep
# in case it was caught between the two.
ORPHAN_MIN_AGE_S = 5.0


def segment_name(addr: str, port: str | int, rank: str | int) -> str:
    return f"{SHM_PREFIX}_{os.getuid()}_{addr}_{port}_{rank}"


def remove_segment(name: str, shm_dir: Path = SHM_DIR) -> bool:
    try:
        (shm_dir / name).unlink()
        return True
    except FileNotFoundError:
        return False
    except OSError:
        return False


def remove_shm_buffers(port: str | int, shm_dir: Path = SHM_DIR) -> int:
    """Unlink the segments of a local launch on `port`; returns how many. The port is the launch's own, so only its
    segments match."""
    removed = 0
    for path in shm_dir.glob(f"{SHM_PREFIX}_{os.getuid()}_*_{port}_*"):
        removed += remove_segment(path.name, shm_dir)
    return removed


def segments_in_use(shm_dir: Path = SHM_DIR, proc: Path = Path("/proc")) -> Optional[set[str]]:
    """Names of files in `shm_dir` that some process this user can inspect has mapped or open; None when that
    cannot be told (no procfs)."""
    if not proc.is_dir():
        return None
    prefix = str(shm_dir).rstrip("/") + "/"
    used: set[str] = set()
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            with open(entry / "maps", "r", encoding="utf-8", errors="replace") as maps:
                for line in maps:
                    at = line.find(prefix)
                    if at >= 0:
                        used.add(line[at + len(prefix):].strip().removesuffix(" (deleted)"))
        except OSError:
            pass
        try:
            for fd in (entry / "fd").iterdir():
                try:
                    target = os.readlink(fd)
                except OSError:
                    continue
                if target.startswith(prefix):
                    used.add(target[len(prefix):].removesuffix(" (deleted)"))
        except OSError:
            pass
    return used


def remove_orphan_segments(shm_dir: Path = SHM_DIR, proc: Path = Path("/proc"),
                           min_age_s: float = ORPHAN_MIN_AGE_S) -> tuple[int, int]:
    """Unlink this user's all-reduce segments that no process maps or holds open (their launch is dead);
    returns (segments removed, bytes freed)."""
    candidates = [p for p in shm_dir.glob(f"{SHM_PREFIX}_{os.getuid()}_*") if p.is_file()]
    if not candidates:
        return 0, 0
    used = segments_in_use(shm_dir, proc)
    if used is None:
        return 0, 0
    removed = freed = 0
    now = time.time()
    for path in candidates:
        try:
            stat = path.stat()
        except OSError:
            continue
        if path.name in used or now - stat.st_mtime < min_age_s:
            continue
        if remove_segment(path.name, shm_dir):
            removed += 1
            freed += stat.st_size
    return removed, freed
