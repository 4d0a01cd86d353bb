"""`hyperofa tune hypernet`'s output, `<run.dir>/tune/hypernet/`: the trials and the winning config.

    trials.tsv     one row per trial: its settings, how it ended, epochs run, best validation loss, new-token loss
    best.yaml      the effective config with the winner's hypernet keys (`hyperofa pipeline --config` loads it)
    summary.json   the winner (trial, settings, losses) and the search (space, trials, ASHA settings, seconds)
    manifest.json
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

import yaml

from ..errors import HyperofaError
from .files import atomic_write_bytes, atomic_write_json, read_json
from .rundir import Stage

STAGE = "tune/hypernet"
TRIALS = "trials.tsv"
BEST_CONFIG = "best.yaml"
SUMMARY = "summary.json"
OUTPUTS = (TRIALS, BEST_CONFIG, SUMMARY)


def stage_of(run_dir: str | Path) -> Stage:
    return Stage(run_dir, STAGE)


def write_trials(out: Path, rows: list[dict[str, Any]]) -> Path:
    """Tab-separated, columns in the first row's order; a loss a trial never reached is written empty."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), delimiter="\t", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()})
    return atomic_write_bytes(out / TRIALS, buffer.getvalue().encode("utf-8"))


def read_trials(out: Path) -> list[dict[str, str]]:
    path = out / TRIALS
    try:
        with path.open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
    except OSError as exc:
        raise HyperofaError(f"{path}: cannot read the trial table ({exc.strerror or exc})") from None
    if not rows:
        raise HyperofaError(f"{path}: the trial table has no rows")
    return rows


def write_best_config(out: Path, config: dict[str, Any]) -> Path:
    text = yaml.safe_dump(config, sort_keys=False, default_flow_style=False)
    return atomic_write_bytes(out / BEST_CONFIG, text.encode("utf-8"))


def best_config_path(out: Path) -> Path:
    return out / BEST_CONFIG


def write_summary(out: Path, summary: dict[str, Any]) -> Path:
    return atomic_write_json(out / SUMMARY, summary)


def read_summary(out: Path) -> dict[str, Any]:
    return read_json(out / SUMMARY, what="tune summary")
