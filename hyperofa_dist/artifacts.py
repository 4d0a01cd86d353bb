"""Run directory, stage manifests, atomic writes and fingerprints.

A stage writes `<run_dir>/<stage>/` and is complete exactly when `<run_dir>/<stage>/manifest.json` exists.
Every file is first written under a temporary name in the same directory and then renamed, so a crash can
leave `*.tmp*` debris but never a half-written file under its final name. A manifest records the inputs'
digest; a re-run with the same digest is a no-op, a re-run with another digest first removes the old manifest
so the stage never looks complete while its outputs are being replaced.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any, Iterable, Optional

from .errors import HyperofaError

MANIFEST = "manifest.json"
_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def digest(obj: Any) -> str:
    """Stable sha256 of JSON-able data (sorted keys): the identity of a stage's inputs."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode())


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


class Stage:
    """One stage's directory under the run directory, and its manifest."""

    def __init__(self, run_dir: str | Path, name: str):
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
        manifest = self.manifest()
        return manifest is not None and manifest.get("inputs_digest") == inputs_digest

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


def fingerprint_path(path: str | Path) -> str:
    """Identity of a file together with its companions (`x.kv` + `x.kv.vectors.npy`, as gensim saves them)."""
    path = Path(path)
    if not path.is_file():
        raise HyperofaError(f"{path}: file not found")
    files = [path] + sorted(p for p in path.parent.glob(path.name + ".*") if p.is_file())
    return digest({p.name: sha256_file(p) for p in files})
