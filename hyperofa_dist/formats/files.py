"""Bytes on disk: atomic writes, content hashes, and the one writer and reader of `.npy`/`.npz` arrays.

Every file the system writes goes through `atomic_write_bytes` (or `npy_writer` for arrays too large to hold in
memory): the data lands under a sibling temporary name unique to this host and process, is fsynced, and is
renamed into place, so a crash can leave `.*.tmp-*` debris but never a half-written file under its final name.
A stage that writes many outputs in tasks may write them with `durable=False` and make them durable together
(`sync_files`, parallel fsyncs: a tenth of one fsync after another) before the manifest that names them; what a
crash loses in between is found by the stage's resume check, which verifies every output's size and sha256.
Array files are written without pickles and, for `.npz`, with fixed member timestamps, so equal arrays give
equal bytes (and equal sha256 in the manifests). The readers turn every way an array file can be broken (missing,
truncated, not an array, a pickle, a missing member) into one `HyperofaError` line naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import socket
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import numpy as np

from ..errors import HyperofaError

_CHUNK = 1 << 20


# --- hashes ------------------------------------------------------------------------------------------------


def sha256_file(path: str | Path) -> str:
    digest_ = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest_.update(block)
    return digest_.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def digest(obj: Any) -> str:
    """Stable sha256 of JSON-able data (sorted keys): the identity of a stage's inputs."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode())


def file_record(path: str | Path, root: str | Path) -> dict[str, Any]:
    """{'path': relative to root, 'bytes': size, 'sha256': hash}: how manifests list outputs."""
    path = Path(path)
    return {"path": path.relative_to(root).as_posix(), "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def fingerprint_dir(path: str | Path, names: Optional[Iterable[str]] = None) -> dict[str, str]:
    """sha256 of the files of a directory (or of the named ones present): e.g. a tokenizer's identity."""
    path = Path(path)
    if not path.is_dir():
        raise HyperofaError(f"{path}: directory not found")
    files = sorted(p for p in path.iterdir() if p.is_file()) if names is None else [
        path / n for n in sorted(names) if (path / n).is_file()
    ]
    return {p.name: sha256_file(p) for p in files}


def fingerprint_path(path: str | Path) -> str:
    """Identity of a file together with its companions (`x.kv` + `x.kv.vectors.npy`, as gensim saves them)."""
    path = Path(path)
    if not path.is_file():
        raise HyperofaError(f"{path}: file not found")
    files = [path] + sorted(p for p in path.parent.glob(path.name + ".*") if p.is_file())
    return digest({p.name: sha256_file(p) for p in files})


# --- atomic writes -----------------------------------------------------------------------------------------


def tmp_name(path: Path) -> Path:
    """A sibling temporary name unique to this process and host, so concurrent retries never collide."""
    return path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def create_new(path: str | Path, mode: int = 0o644, *, debris: bool = True) -> int:
    """A file descriptor of a new regular file at `path`, opened for writing. Never follows a symbolic link nor
    opens a file someone else made: names like ours are predictable, so a link planted under one in a shared
    run directory must not redirect the write. With `debris`, what lies under the name (a temporary file of a
    dead process that had our pid) is removed first; a link or file there (or back in between) is refused
    (EEXIST)."""
    path = Path(path)
    if debris and os.path.lexists(path):
        os.unlink(path)  # removes a link itself, never what it points to
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)


# Write failures that are the filesystem's state, not a bug: one line naming the file, not a traceback.
WRITE_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "read-only file system", errno.EACCES: "permission denied", errno.EPERM: "not permitted"}


def free_bytes(path: str | Path) -> int:
    """Bytes free to this user on the filesystem holding `path` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


LOW_SPACE = 1 << 20  # below this a failed write is put down to a full disk, whatever the writer reported


def disk_full(path: str | Path, exc: BaseException) -> bool:
    """Whether a failed write under `path` ran out of space: the error says so, or (writers such as torch's
    checkpoint stream report "file write failed" without an errno) the filesystem has almost nothing left."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return free_bytes(path) < LOW_SPACE
    except OSError:
        return False


def write_error(path: str | Path, exc: OSError, size: Optional[int] = None) -> Exception:
    """The one-line error for a write that the filesystem refused (ENOSPC, EROFS, ...); other errors unchanged."""
    reason = WRITE_ERRNOS.get(exc.errno or -1)
    if reason is None:
        return exc
    what = f" {size} bytes" if size is not None else ""
    free = f" ({free_bytes(path)} bytes free there)" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    return HyperofaError(f"{path}: cannot write{what}: {reason}{free}")


def atomic_write_bytes(path: str | Path, data: bytes, *, durable: bool = True) -> Path:
    path = Path(path)
    tmp = tmp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with os.fdopen(create_new(tmp), "wb") as handle:
            handle.write(data)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()  # a full disk must not keep the half-written copy as well
        raise write_error(path, exc, len(data)) from None
    return path


def atomic_write_json(path: str | Path, obj: Any, *, durable: bool = True) -> Path:
    text = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    return atomic_write_bytes(path, text.encode("utf-8"), durable=durable)


SYNC_THREADS = 16


def sync_files(paths: Iterable[str | Path]) -> int:
    """fsync every file and then every directory holding one (their new names), in parallel; returns the count.

    For outputs written with `durable=False`: the filesystem commits concurrent fsyncs together."""
    from concurrent.futures import ThreadPoolExecutor

    files = [Path(p) for p in paths]
    directories = sorted({p.parent for p in files})

    def sync(path: Path) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise write_error(path, exc) from None
        try:
            os.fsync(fd)
        except OSError as exc:
            raise write_error(path, exc) from None
        finally:
            os.close(fd)

    with ThreadPoolExecutor(max_workers=SYNC_THREADS, thread_name_prefix="sync") as pool:
        list(pool.map(sync, files))
        list(pool.map(sync, directories))
    return len(files)


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    """A JSON file another stage wrote; a missing or damaged one is one line naming it."""
    path = Path(path)
    if not path.is_file():
        raise HyperofaError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HyperofaError(f"{path}: {what} is not valid JSON ({exc.__class__.__name__})") from None


def read_csv_rows(path: str | Path, what: str, columns: Iterable[str] = ()) -> list[dict[str, Optional[str]]]:
    """The rows of a CSV table with a header (an empty cell as None); a missing or damaged file, or one without
    the named columns, is one line naming it."""
    import csv

    path = Path(path)
    if not path.is_file():
        raise HyperofaError(f"{path}: {what} not found")
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            header = reader.fieldnames or []
    except (UnicodeDecodeError, csv.Error) as exc:
        raise HyperofaError(f"{path}: {what} is not valid CSV ({exc.__class__.__name__})") from None
    missing = [c for c in columns if c not in header]
    if missing:
        raise HyperofaError(f"{path}: {what} has no {missing[0]} column")
    return [{k: (v if v != "" else None) for k, v in row.items()} for row in rows]


# --- arrays ------------------------------------------------------------------------------------------------


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def save_npy(path: str | Path, array: np.ndarray) -> Path:
    return atomic_write_bytes(path, npy_bytes(array))


def save_npz(path: str | Path, **arrays: np.ndarray) -> Path:
    """np.savez with fixed member timestamps (np.savez stamps the wall clock): equal arrays, equal bytes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            archive.writestr(info, npy_bytes(arrays[name]))
    return atomic_write_bytes(path, buffer.getvalue())


@contextlib.contextmanager
def npy_writer(path: str | Path, dtype: Any, shape: tuple[int, ...]) -> Iterator[np.ndarray]:
    """A writable memory map of a new `.npy` for arrays too large for memory; renamed into place on success only."""
    path = Path(path)
    tmp = tmp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(create_new(tmp))  # ours, a regular file: open_memmap below opens it by name
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        # Reserve the blocks now: a memory map that runs out of disk later kills the process with SIGBUS.
        with open(tmp, "r+b") as handle:
            os.posix_fallocate(handle.fileno(), 0, os.fstat(handle.fileno()).st_size)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise write_error(path, exc) from None
    try:
        yield out
        out.flush()
        del out
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_npy(path: str | Path, *, mmap: bool = False, what: str = "array file") -> np.ndarray:
    """A `.npy` written by `save_npy`/`npy_writer`; memory-mapped when asked (large tables)."""
    path = Path(path)
    if not path.is_file():
        raise HyperofaError(f"{path}: {what} not found")
    try:
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except Exception as exc:  # numpy parses the header with Python's tokenizer: a damaged one raises anything
        raise HyperofaError(f"{path}: {what} is truncated or not a .npy array ({_reason(exc)})") from None
    if not isinstance(array, np.ndarray):
        raise HyperofaError(f"{path}: {what} is not a single .npy array")
    return array


def load_npz(path: str | Path, names: Iterable[str], *, what: str = "array archive") -> dict[str, np.ndarray]:
    """The named members of a `.npz` written by `save_npz`, all read into memory."""
    path = Path(path)
    if not path.is_file():
        raise HyperofaError(f"{path}: {what} not found")
    names = tuple(names)
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [n for n in names if n not in data.files]
            if missing:
                raise HyperofaError(f"{path}: {what} lacks the arrays {missing}")
            return {n: data[n] for n in names}
    except HyperofaError:
        raise
    except Exception as exc:  # zipfile answers damaged headers with NotImplementedError and RuntimeError too
        raise HyperofaError(f"{path}: {what} is truncated or not a .npz archive ({_reason(exc)})") from None


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{exc.__class__.__name__}: {text.splitlines()[0][:120]}" if text else exc.__class__.__name__


# --- preflight: what a stage checks before it writes -------------------------------------------------------


def writable(path: Path, key: str) -> None:
    """`path` is (or can be created as) a writable directory: a file is created and removed in it, or in its
    nearest existing parent (permission bits say nothing to root or on a read-only mount; a write does)."""
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise HyperofaError(f"{probe}: not a directory, so {path} cannot be created ({key})")
    try:
        handle, name = tempfile.mkstemp(prefix=".hyperofa-preflight-", dir=probe)
        os.close(handle)
        os.unlink(name)
    except OSError as exc:
        where = "" if probe == Path(path).absolute() else f" (its parent {probe})"
        raise HyperofaError(f"{path}: not writable{where}: {exc.strerror or exc.__class__.__name__} ({key})") from None


def output_file(path: Path, key: str) -> None:
    """`path` can be written as a file: it is not a directory, and its nearest existing parent is a writable
    directory (not a file), checked before the work whose result it will hold."""
    if path.is_dir():
        raise HyperofaError(f"{path}: is a directory; {key} names the file to write")
    writable(path.parent, key)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def used_bytes(path: Path) -> int:
    """Bytes of the files under `path` (what a re-run may overwrite in place)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else 0


def free_space(where: Path, needed: int, what: str, reclaimable: int = 0) -> None:
    """At least `needed` bytes free (counting `reclaimable` bytes a re-run overwrites) on `where`'s filesystem."""
    free = free_bytes(where)
    if free + reclaimable < needed:
        raise HyperofaError(
            f"{where}: {what} needs about {human(needed)}, the filesystem has {human(free)} free; free space or "
            "move run.dir"
        )
