"""The run directory: one sub-directory per stage, the manifest that says a stage is complete, and the lock
that keeps a stage to one writer.

A stage writes `<run_dir>/<stage>/` and is complete exactly when `<run_dir>/<stage>/manifest.json` exists, records
the same inputs digest, and every output it lists is there with its recorded size and sha256. A manifest records
the effective config, the inputs and their digest, counts, and every output file with its size and sha256. A
re-run with the same digest is a no-op; a re-run with another digest first removes the old manifest, so the stage
never looks complete while its outputs are being replaced.

Beside each stage directory (never inside it: a stage may swap its whole directory in by rename) live two hidden
files of this module:

    .<stage>.lock         who writes the stage now (pid, host, command); `flock`ed while the writer runs
    .<stage>.sha256.json  {output: [bytes, mtime_ns, sha256]}: the hash of each output as of that size and
                          mtime, so verifying an unchanged output costs a `stat`, and a changed one is re-hashed

Inputs are recorded portably: a path inside the run directory is written as `<run.dir>/<relative path>`, so a run
directory that is moved (or copied) elsewhere keeps every stage up to date.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from ..errors import HyperofaError
from .files import atomic_write_json, digest, file_record, sha256_file

MANIFEST = "manifest.json"
RUN_DIR_TOKEN = "<run.dir>"
LOCK_SUFFIX = ".lock"
HASHES_SUFFIX = ".sha256.json"


def portable(obj: Any, run_dir: str | Path) -> Any:
    """`obj` with every absolute path string inside `run_dir` written as `<run.dir>/<relative path>`.

    What a stage's inputs digest holds must not change when the run directory moves: content is hashed, and the
    paths that name things inside the run directory (the demo's corpus and source model, a vectors file) are
    recorded relative to it. Paths outside it stay as they are; other strings are left alone."""
    root = os.path.realpath(run_dir)

    def convert(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: convert(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [convert(item) for item in value]
        if isinstance(value, str) and os.path.isabs(value):
            for candidate in (os.path.normpath(value), os.path.realpath(value)):
                if candidate == root or candidate.startswith(root + os.sep):
                    relative = os.path.relpath(candidate, root)
                    return RUN_DIR_TOKEN if relative == "." else f"{RUN_DIR_TOKEN}/{Path(relative).as_posix()}"
        return value

    return convert(obj)


def path_name_problem(name: str, parts: bool = False) -> str:
    """Why `name` cannot name a directory below the run directory ('' when it can): one plain directory name
    (or, with `parts`, several joined by '/'), none of them empty, '.', '..', or holding NUL or a control
    character, so that what a stage writes and deletes stays inside its own directory."""
    if not isinstance(name, str):
        return "must be a string"
    for part in name.split("/") if parts else [name]:
        if part in ("", ".", "..") or "/" in part or any(ord(c) < 32 or c == "\x7f" for c in part):
            return "must be one directory name inside the run directory (no '/', '.', '..' or control characters)"
        if len(part.encode("utf-8")) > 255:
            return "is longer than a directory name may be (255 bytes)"
    return ""


class Stage:
    """One stage's directory under the run directory, and its manifest."""

    def __init__(self, run_dir: str | Path, name: str):
        problem = path_name_problem(name, parts=True)
        if problem:
            raise HyperofaError(f"{run_dir}: stage directory name {name!r} {problem}")
        self.run_dir = Path(run_dir)
        self.name = name
        self.path = self.run_dir / name

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def manifest(self) -> Optional[dict[str, Any]]:
        if not self.manifest_path.is_file():
            return None
        try:
            return json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise HyperofaError(f"{self.manifest_path}: manifest is not valid JSON") from None

    def require(self) -> dict[str, Any]:
        """The manifest of a stage a later stage depends on; a clear error when it has not run."""
        manifest = self.manifest()
        if manifest is None:
            raise HyperofaError(f"{self.manifest_path}: stage '{self.name}' has not completed; run it first")
        return manifest

    def is_complete(self, inputs_digest: str) -> bool:
        """The manifest exists, records these inputs, and every output it lists is there with its recorded size
        and sha256."""
        complete, _ = self.check(inputs_digest)
        return complete

    def check(self, inputs_digest: str) -> tuple[bool, list[str]]:
        """(complete, damaged outputs): damaged is non-empty only when the manifest matches the inputs but some
        output it lists is missing or differs from its record (each a phrase naming the file)."""
        manifest = self.manifest()
        if manifest is None or manifest.get("inputs_digest") != inputs_digest:
            return False, []
        damaged = self.damaged_outputs(manifest.get("outputs", []))
        return not damaged, damaged

    def outputs_intact(self, records: Iterable[dict[str, Any]]) -> bool:
        return not self.damaged_outputs(records)

    def damaged_outputs(self, records: Iterable[dict[str, Any]]) -> list[str]:
        """Each listed output that is missing or whose size or sha256 differs from its record, as a phrase naming
        the file. A hash is computed only for files whose size or mtime changed since it was last verified."""
        return [phrase for _, phrase in self.damaged_records(records)]

    def damaged_records(self, records: Iterable[dict[str, Any]]) -> list[tuple[dict[str, Any], str]]:
        """(record, phrase naming the file and the difference) for each damaged output, as `damaged_outputs`."""
        cache = self.hash_cache()
        damaged = []
        for record in records:
            path = self.path / record["path"]
            try:
                stat = path.stat()
            except FileNotFoundError:
                damaged.append((record, f"{path} is missing"))
                continue
            except OSError as exc:
                damaged.append((record, f"{path} cannot be read ({exc.strerror})"))
                continue
            if stat.st_size != record["bytes"]:
                damaged.append((record, f"{path} has {stat.st_size} bytes, the manifest records {record['bytes']}"))
                continue
            expected = record.get("sha256")
            if expected is not None and cache.sha256(record["path"], path, stat) != expected:
                damaged.append((record, f"{path} differs from the manifest (sha256)"))
        cache.save()
        return damaged

    def remember_hashes(self, records: Iterable[dict[str, Any]]) -> None:
        """Seed the hash cache with outputs whose hashes were computed as they were written (a manifest's)."""
        cache = self.hash_cache()
        for record in records:
            path = self.path / record["path"]
            try:
                stat = path.stat()
            except OSError:
                continue
            if stat.st_size == record["bytes"] and record.get("sha256"):
                cache.put(record["path"], stat, record["sha256"])
        cache.save()

    def hash_cache(self) -> "HashCache":
        """One cache per Stage object: read once, however many times outputs are checked (prepare: per chunk)."""
        if getattr(self, "_hash_cache", None) is None:
            self._hash_cache = HashCache(self)
        return self._hash_cache

    def lock(self, command: str) -> "StageLock":
        return StageLock(self, command)

    def begin(self, inputs_digest: str) -> None:
        """Open the stage for (re)writing: a stale manifest for other inputs is removed first."""
        self.path.mkdir(parents=True, exist_ok=True)
        manifest = self.manifest()
        if manifest is not None and manifest.get("inputs_digest") != inputs_digest:
            self.manifest_path.unlink()
        for debris in self.path.rglob(".*.tmp-*"):
            if debris.is_file():
                debris.unlink()

    def write_manifest(
        self,
        *,
        config: dict[str, Any],
        inputs: dict[str, Any],
        outputs: Iterable[str | Path],
        counts: Optional[dict[str, Any]] = None,
        extra: Optional[dict[str, Any]] = None,
    ) -> dict[str, Any]:
        """Hash the outputs and write the manifest last: from this moment the stage is complete."""
        records = [file_record(self.path / p if not Path(p).is_absolute() else p, self.path) for p in outputs]
        self.remember_hashes(records)
        manifest = {
            "stage": self.name,
            "config": config,
            "inputs": inputs,
            "inputs_digest": digest(inputs),
            "counts": counts or {},
            "outputs": sorted(records, key=lambda r: r["path"]),
        }
        if extra:
            manifest.update(extra)
        atomic_write_json(self.manifest_path, manifest)
        return manifest

    def remove(self) -> None:
        if self.path.exists():
            shutil.rmtree(self.path)

    def clear(self, names: Iterable[str]) -> None:
        """Delete the named entries of the stage directory (files or folders), and nothing outside it: the
        directory must lie where its name says (not a symbolic link out of the run directory), and a link among
        the entries is removed itself, never what it points to."""
        if not self.path.exists():
            return
        inside = os.path.realpath(self.run_dir)
        if self.path.is_symlink() or not os.path.realpath(self.path).startswith(inside + os.sep):
            raise HyperofaError(
                f"{self.path}: refusing to delete in a stage directory that leaves {self.run_dir} (a symbolic link?)"
            )
        for name in names:
            problem = path_name_problem(name)
            if problem:
                raise HyperofaError(f"{self.path}: entry name {name!r} {problem}")
            target = self.path / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)


# --- verified outputs: a hash per (size, mtime) --------------------------------------------------------------


@dataclass(frozen=True)
class PerMethod:
    """A stage run once per method (or name): `<run.dir>/<stage>/<method>/`, a Stage named by the method whose lock
    and hash cache sit beside it in `<stage>/`, holding its model in `<method>/<model>/` when it makes one."""

    stage: str
    model: str = ""

    def stage_of(self, run_dir: str | Path, method: str) -> Stage:
        return Stage(Path(run_dir) / self.stage, method)

    def model_dir(self, run_dir: str | Path, method: str) -> Path:
        return self.stage_of(run_dir, method).path / self.model

    def method_of(self, model_path: Path) -> Optional[str]:
        """`.../<stage>/<method>/<model>` (where this stage writes its model) names its method; any other path is
        unknown."""
        parts = Path(model_path).parts
        if len(parts) >= 3 and parts[-1] == self.model and parts[-3] == self.stage:
            return parts[-2]
        return None


class HashCache:
    """`.<stage>.sha256.json` beside the stage directory: the sha256 of each output as of its size and mtime.

    A file rewritten in place gets a new mtime, so it is hashed again; one that was not touched costs a `stat`.
    A cache that cannot be read is empty, one that cannot be written (a read-only run directory) is not kept."""

    def __init__(self, stage: Stage):
        self.path = stage.path.parent / f".{stage.name}{HASHES_SUFFIX}"
        try:
            loaded = json.loads(self.path.read_text(encoding="utf-8"))
            self.entries: dict[str, list] = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            self.entries = {}
        self.changed = False

    def put(self, name: str, stat: os.stat_result, sha256: str) -> None:
        entry = [stat.st_size, stat.st_mtime_ns, sha256]
        if self.entries.get(name) != entry:
            self.entries[name] = entry
            self.changed = True

    def sha256(self, name: str, path: Path, stat: os.stat_result) -> str:
        entry = self.entries.get(name)
        if isinstance(entry, list) and len(entry) == 3 and entry[:2] == [stat.st_size, stat.st_mtime_ns]:
            return entry[2]
        value = sha256_file(path)
        self.put(name, stat, value)
        return value

    def save(self) -> None:
        if not self.changed:
            return
        try:
            atomic_write_json(self.path, self.entries)
        except OSError:
            pass
        self.changed = False


# --- one writer per stage --------------------------------------------------------------------------------------


class StageLock:
    """`.<stage>.lock` beside the stage directory, held with `flock` while a command writes the stage.

    A second writer is refused with one line naming the holder. The kernel drops a `flock` when its holder dies,
    however it dies, so a lock file left by a killed writer is free: it is taken over, and the caller says so.
    Protocol: open (create), `flock` non-blocking, then check that the path still names the locked file (a
    releasing holder unlinks it while still holding the lock); the file is removed when released."""

    def __init__(self, stage: Stage, command: str):
        self.stage = stage
        self.command = command
        self.path = stage.path.parent / f".{stage.name}{LOCK_SUFFIX}"
        self.fd: Optional[int] = None
        self.created_parent: Optional[Path] = None

    def acquire(self) -> Optional[str]:
        """Take the lock; returns a note when it took over the lock of a writer that no longer runs."""
        import fcntl

        parent = self.path.parent
        if not parent.is_dir():
            top = parent
            while not top.parent.is_dir():
                top = top.parent
            self.created_parent = top
        for _ in range(20):
            try:
                parent.mkdir(parents=True, exist_ok=True)
                # Never through a symbolic link: the name is predictable, and a planted link would have us
                # truncate and write whatever file it points to.
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                if os.path.islink(self.path):
                    raise HyperofaError(
                        f"{self.path}: the stage lock is a symbolic link, which is never followed; remove it"
                    ) from None
                raise HyperofaError(
                    f"{self.path}: cannot create the stage lock ({exc.strerror}); is the run directory writable?"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _read_holder(fd)
                os.close(fd)
                raise HyperofaError(
                    f"{self.stage.path}: another writer holds {self.path.name} ({_describe(holder)}); wait for it to "
                    "end or stop it, then run again"
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # released and unlinked between our open and our flock: try the new file
                os.close(fd)
                continue
            previous = _read_holder(fd)
            record = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                      "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
            self.fd = fd
            if previous and previous.get("pid") is not None:
                return f"took over the stale lock {self.path} of {_describe(previous)}, which no longer runs"
            return None
        raise HyperofaError(f"{self.path}: the stage lock keeps changing hands; is another writer starting and stopping?")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still holding it: see the protocol above
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None
        top = self.created_parent
        if top is not None:  # nothing was written but the lock: leave no empty directories behind
            for directory in [self.path.parent, *self.path.parent.parents]:
                try:
                    directory.rmdir()
                except OSError:
                    break
                if directory == top:
                    break

    def __enter__(self) -> "StageLock":
        self.note = self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int) -> Optional[dict[str, Any]]:
    try:
        data = os.pread(fd, 4096, 0)
        holder = json.loads(data.decode("utf-8")) if data.strip() else None
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _describe(holder: Optional[dict[str, Any]]) -> str:
    if not holder:
        return "a writer that left no record"
    command = f"`hyperofa {holder['command']}`" if holder.get("command") else "a writer"
    return f"{command}, PID {holder.get('pid')} on {holder.get('host')}, since {holder.get('since')}"
