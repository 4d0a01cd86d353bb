"""The run directory: one sub-directory per stage and the manifest that says a stage is complete.

A stage writes `<run_dir>/<stage>/` and is complete exactly when `<run_dir>/<stage>/manifest.json` exists. A
manifest records the effective config, the inputs and their digest, counts, and every output file with its size
and sha256. A re-run with the same digest is a no-op; a re-run with another digest first removes the old
manifest, so the stage never looks complete while its outputs are being replaced.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Iterable, Optional

from ..errors import HyperofaError
from .files import atomic_write_json, digest, file_record

MANIFEST = "manifest.json"


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
        """The manifest exists, records these inputs, and every output it lists is there with its recorded size."""
        manifest = self.manifest()
        return (
            manifest is not None
            and manifest.get("inputs_digest") == inputs_digest
            and self.outputs_intact(manifest.get("outputs", []))
        )

    def outputs_intact(self, records: Iterable[dict[str, Any]]) -> bool:
        for record in records:
            path = self.path / record["path"]
            if not path.is_file() or path.stat().st_size != record["bytes"]:
                return False
        return True

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
