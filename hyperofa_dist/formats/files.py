"""Bytes on disk: atomic writes, content hashes, and the one writer and reader of `.npy`/`.npz` arrays.

Every file the system writes goes through `atomic_write_bytes` (or `npy_writer` for arrays too large to hold in
memory): the data lands under a sibling temporary name unique to this host and process, is fsynced, and is
renamed into place, so a crash can leave `.*.tmp-*` debris but never a half-written file under its final name.
Array files are written without pickles and, for `.npz`, with fixed member timestamps, so equal arrays give
equal bytes (and equal sha256 in the manifests). The readers turn every way an array file can be broken (missing,
truncated, not an array, a pickle, a missing member) into one `HyperofaError` line naming the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import socket
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


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    text = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    return atomic_write_bytes(path, text.encode("utf-8"))


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    """A JSON file another stage wrote; a missing or damaged one is one line naming it."""
    path = Path(path)
    if not path.is_file():
        raise HyperofaError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HyperofaError(f"{path}: {what} is not valid JSON ({exc.__class__.__name__})") from None


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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
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
    except (ValueError, OSError, EOFError) as exc:
        reason = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else exc.__class__.__name__
        raise HyperofaError(f"{path}: {what} is truncated or not a .npy array ({reason})") from None
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
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        reason = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else exc.__class__.__name__
        raise HyperofaError(f"{path}: {what} is truncated or not a .npz archive ({reason})") from None
