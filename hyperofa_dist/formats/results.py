"""The evaluate stage's output, `<run.dir>/evaluate/<name>/results.json`: `{task: {lang: {metric: value},
"average": {metric: value}}}`, read back by the pipeline's summary table."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from .files import atomic_write_json, read_json
from .rundir import Stage

STAGE = "evaluate"
RESULTS = "results.json"


def stage_of(run_dir: str | Path, name: str) -> Stage:
    return Stage(run_dir, f"{STAGE}/{name}")


def write_results(path: Path, results: dict[str, Any]) -> Path:
    return atomic_write_json(path, results)


def read_results(path: Path) -> dict[str, Any]:
    return read_json(path, "evaluation results")


def find_results(run_dir: str | Path, name: str) -> Optional[dict[str, Any]]:
    """The results of a finished evaluation of this run directory, or None when it has not run."""
    path = stage_of(run_dir, name).path / RESULTS
    return read_results(path) if path.is_file() else None
