"""The pipeline's results table, `<run.dir>/results/`: one row per init method, written at the end of every
`hyperofa pipeline` (and demo) from the evaluations that match the current models (pipeline.results_table).

    summary.md    the table as the pipeline prints it: floats with 4 decimals, `n/a` where no evaluation matches
    summary.csv   the same rows: floats as Python writes them, an empty cell for n/a

Not a stage: no manifest; the files are rewritten by every pipeline run, from results that are themselves checked
(formats/results.py reads an evaluation only when its manifest matches the current inputs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from .files import atomic_write_bytes, read_csv_rows

DIR = "results"
MARKDOWN = "summary.md"
CSV = "summary.csv"


def summary_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / DIR


def markdown_path(run_dir: str | Path) -> Path:
    return summary_dir(run_dir) / MARKDOWN


def markdown(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    def cell(v: Any) -> str:
        return "n/a" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_summary(run_dir: str | Path, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> list[Path]:
    """summary.md and summary.csv of `rows` in `columns`; returns their paths."""
    out = summary_dir(run_dir)
    lines = [",".join(columns)] + [",".join("" if r[c] is None else str(r[c]) for c in columns) for r in rows]
    return [
        atomic_write_bytes(out / MARKDOWN, (markdown(rows, columns) + "\n").encode()),
        atomic_write_bytes(out / CSV, ("\n".join(lines) + "\n").encode()),
    ]


def read_summary(run_dir: str | Path) -> list[dict[str, Optional[str]]]:
    """The rows of summary.csv, an empty cell as None (n/a)."""
    return read_csv_rows(summary_dir(run_dir) / CSV, "results table", ("method",))
