"""The evaluate stage's output, `<run.dir>/evaluate/<name>/results.json`: `{task: {lang: {metric: value},
"average": {metric: value}}}`, read back by the pipeline's summary table when its manifest matches the current
inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from .files import atomic_write_json, read_json
from .rundir import PerMethod

STAGE = "evaluate"
RESULTS = "results.json"


stage_of = PerMethod(STAGE).stage_of  # `<run.dir>/evaluate/<name>/`


def write_results(path: Path, results: dict[str, Any]) -> Path:
    return atomic_write_json(path, results)


def read_results(path: Path) -> dict[str, Any]:
    return read_json(path, "evaluation results")


def find_results(run_dir: str | Path, name: str, inputs_digest: str) -> Optional[dict[str, Any]]:
    """The results of the evaluation `name` of this run directory when it is complete for these inputs (its
    manifest records `inputs_digest` and results.json is the file it lists), else None: results of another model
    (an init rebuilt since, with `pipeline.evaluate=false`) or damaged ones are never read as current."""
    stage = stage_of(run_dir, name)
    return read_results(stage.path / RESULTS) if stage.is_complete(inputs_digest) else None
