"""compare's outputs, in `compare.output_dir` (default `<run.dir>/compare/<experiment or runs>/`): the tables
and figures of one comparison (compare/core.py computes them, compare/stage.py writes them through here).

    table.md, table.csv         one row per series and evaluated step
    summary.md, summary.csv     one row per series: step 0 and final side by side, steps to random's final loss
    training_loss.png           the training loss of every series against steps
    eval_loss_by_language.png   the pretraining job's held-out loss per language, one panel each
    <metric>.png                every other compared metric (`eval_loss.png`, `srt.average.top10.png`, ...)
    manifest.json               what the comparison was computed from (formats/rundir.py)

Markdown cells show floats with 4 significant digits; CSV cells hold them as Python writes them (`repr`), an
empty cell where a series has no value.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Optional, Sequence

from .files import atomic_write_bytes, read_csv_rows

TABLE_MD, TABLE_CSV = "table.md", "table.csv"
SUMMARY_MD, SUMMARY_CSV = "summary.md", "summary.csv"
TRAINING_LOSS = "training_loss.png"
EVAL_LOSS_BY_LANGUAGE = "eval_loss_by_language.png"
FIGURE_SUFFIX = ".png"
ROOT = "compare"  # `<run.dir>/compare/`, where the default output directories are


def figure_name(stem: str) -> str:
    """The file of a metric's figure, from its file-safe stem (`core.file_stem`)."""
    return stem + FIGURE_SUFFIX


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def markdown(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def to_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for r in rows:
        writer.writerow(["" if r.get(c) is None else repr(r[c]) if isinstance(r[c], float) else r[c] for c in columns])
    return buffer.getvalue()


def write_tables(
    output_dir: Path, table: Sequence[dict[str, Any]], table_columns: Sequence[str],
    summary: Sequence[dict[str, Any]], summary_columns: Sequence[str],
) -> list[Path]:
    """The long table and the summary, each as markdown and CSV; returns the four paths."""
    return [
        atomic_write_bytes(output_dir / TABLE_MD, markdown(table, table_columns).encode()),
        atomic_write_bytes(output_dir / TABLE_CSV, to_csv(table, table_columns).encode()),
        atomic_write_bytes(output_dir / SUMMARY_MD, markdown(summary, summary_columns).encode()),
        atomic_write_bytes(output_dir / SUMMARY_CSV, to_csv(summary, summary_columns).encode()),
    ]


def write_figure(output_dir: Path, name: str, png: bytes) -> Path:
    return atomic_write_bytes(output_dir / name, png)


def read_table(output_dir: Path, name: str = TABLE_CSV) -> list[dict[str, Optional[str]]]:
    """The rows of one of the CSV tables (`TABLE_CSV` or `SUMMARY_CSV`), an empty cell as None."""
    if name not in (TABLE_CSV, SUMMARY_CSV):
        raise ValueError(f"{name} is not one of compare's CSV tables")
    return read_csv_rows(output_dir / name, "compare table", ("method",))
