"""The tracking journal, `<run.dir>/tracking/journal-<host>-<pid>-<ms>-<n>.jsonl`: every write a tracker sends to
MLflow, on disk before it is sent, so a tracker outage loses nothing (tracking/delivery.py sends, retries and
replays it).

One file per tracker process, held under an exclusive `flock` while that process lives: a file nobody holds belongs
to a process that ended, and whoever claims it may replay it. Lines, in the order the writes were made:

    {"store": "http://mlflow-host:5000"}   first line: the tracking store the writes are for
    {"id": 7, "op": "metrics", "run": "<run id>", "metrics": [[key, value, timestamp_ms, step], ...]}
    {"id": 8, "op": "tags", "run": "<run id>", "tags": {"k": "v"}}
    {"id": 9, "op": "params" | "terminate" | "artifact" | "artifacts" | "model", "run": "<run id>", ...}
    {"ack": [7, 8]}        the store confirmed these writes

A line cut short by a process dying while writing it is ignored. A journal whose every write is confirmed is
deleted by its owner, so a directory that holds journals holds undelivered writes.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional

from .files import create_new

DIRECTORY = "tracking"
PREFIX = "journal-"
SUFFIX = ".jsonl"
_serial = itertools.count()  # two journals one process opens within a millisecond still get two names


def journal_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / DIRECTORY


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every complete, well-formed line of a journal (a torn last line, or garbage, is skipped)."""
    out = []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def pending_writes(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The writes of `records` no ack line confirms, in journal order."""
    acked: set[int] = set()
    for record in records:
        if isinstance(record.get("ack"), list):
            acked.update(int(i) for i in record["ack"])
    return [r for r in records if "op" in r and isinstance(r.get("id"), int) and r["id"] not in acked]


class Journal:
    """An open journal this process holds (its lock); `append` and `ack` may be called from two threads."""

    def __init__(self, path: Path, handle: Any, next_id: int, store: Optional[str] = None):
        self.path = path
        self.store = store
        self._handle = handle
        self._next = next_id
        self._lock = threading.Lock()

    @classmethod
    def create(cls, directory: str | Path, store: Optional[str] = None) -> "Journal":
        """A new journal of this process in `directory` (made if missing), for the tracking store `store`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        name = f"{PREFIX}{socket.gethostname()}-{os.getpid()}-{int(time.time() * 1000)}-{next(_serial)}{SUFFIX}"
        handle = os.fdopen(create_new(directory / name, debris=False), "a", encoding="utf-8")  # never through a planted link
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        journal = cls(directory / name, handle, 1, store)
        if store is not None:
            journal._write({"store": store})
        return journal

    @classmethod
    def claim(cls, path: Path) -> Optional["Journal"]:
        """The journal at `path`, now held by this process, or None when a live process holds it (or it is gone)."""
        try:
            handle = open(path, "a", encoding="utf-8")
        except OSError:
            return None
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return None
        if not path.exists():  # deleted by its owner between our open and our lock: nothing left to replay
            handle.close()
            return None
        records = read_records(path)
        ids = [r["id"] for r in records if isinstance(r.get("id"), int)]
        store = next((r["store"] for r in records if isinstance(r.get("store"), str)), None)
        if _torn(path):
            handle.write("\n")  # a torn last line stays alone on its line, so our next line parses
            handle.flush()
        return cls(path, handle, max(ids, default=0) + 1, store)

    def _write(self, record: dict[str, Any]) -> None:
        # Flushed to the OS, not fsynced: the journal survives the death of its process (the case it is for); a
        # machine crash may lose its last lines, and an fsync per metric would cost a training step real time.
        self._handle.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._handle.flush()

    def append(self, write: dict[str, Any]) -> int:
        """Record one write; returns its id."""
        with self._lock:
            ident = self._next
            self._next += 1
            self._write({"id": ident, **write})
            return ident

    def ack(self, ids: list[int]) -> None:
        if ids:
            with self._lock:
                self._write({"ack": sorted(ids)})

    def pending(self) -> list[dict[str, Any]]:
        with self._lock:
            return pending_writes(read_records(self.path))

    def release(self) -> None:
        """Let the journal go as it is (nothing deleted)."""
        with self._lock:
            if not self._handle.closed:
                self._handle.close()

    def close(self) -> bool:
        """Release the journal; deleted when every write in it is confirmed. True when deleted."""
        with self._lock:
            if self._handle.closed:
                return not self.path.exists()
            done = not pending_writes(read_records(self.path))
            if done:
                self.path.unlink(missing_ok=True)  # still under our lock: nobody claims a file being deleted
            self._handle.close()
            return done


def _torn(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            if handle.tell() == 0:
                return False
            handle.seek(-1, os.SEEK_END)
            return handle.read(1) != b"\n"
    except OSError:
        return False


def journals(directory: str | Path) -> list[Path]:
    directory = Path(directory)
    return sorted(directory.glob(f"{PREFIX}*{SUFFIX}")) if directory.is_dir() else []


def claimable(directory: str | Path) -> Iterator[Journal]:
    """The journals in `directory` whose processes have ended, each claimed (locked) by this process in turn and
    released when the caller asks for the next (unless the caller closed it already)."""
    for path in journals(directory):
        journal = Journal.claim(path)
        if journal is not None:
            try:
                yield journal
            finally:
                journal.release()
