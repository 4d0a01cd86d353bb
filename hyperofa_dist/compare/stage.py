"""`hyperofa compare`: read the runs of an experiment (or given run ids), compare them (core.py), write and log.

Outputs in `compare.output_dir` (default `<run.dir>/compare/<experiment>/`, or `.../compare/runs/`), all logged
as artifacts of the `compare` run: table.md/.csv (one row per series and evaluated step), summary.md/.csv (step 0
and final side by side, steps to reach random's final loss), training_loss.png, eval_loss_by_language.png and one
PNG per matched metric (eval_loss.png, srt.average.top10.png, ...). The directory's manifest records what the
comparison was computed from; when the runs and their metrics are the same as last time (a re-run of a finished
pipeline), nothing is redrawn and no run is opened.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from ..config import Config
from ..errors import HyperofaError
from ..formats import comparison as out_format
from ..formats.rundir import Stage
from ..runtime.stage import StageShell, say
from ..tracking import RunStore, open_store, tracking_uri_of
from . import core


@dataclass
class Written:
    output_dir: Path
    files: list[Path]
    comparison: core.Comparison
    plots: dict[str, dict[str, tuple[list[float], list[float]]]]  # file -> label -> drawn (steps, values)


def load_runs(
    store: RunStore, patterns: Sequence[str], experiment: Optional[str] = None, run_ids: Optional[Sequence[str]] = None
) -> tuple[list[Any], list[Any]]:
    """(runs taking part, with their histories; runs left out), from the store."""
    runs = store.runs(run_ids) if run_ids else store.experiment_runs(experiment or "")
    kept, left_out = core.select_runs(runs, patterns)
    if not kept:
        source = f"runs {', '.join(run_ids)}" if run_ids else f"experiment {experiment!r}"
        raise HyperofaError(f"{source}: no run has a metric matching compare.metrics {list(patterns)}")
    store.fill_history(kept, core.wanted(patterns))
    return kept, left_out


def write(comparison: core.Comparison, output_dir: Path) -> Written:
    """The tables and figures of a comparison as files in `output_dir`."""
    output_dir.mkdir(parents=True, exist_ok=True)
    files = out_format.write_tables(output_dir, comparison.table, core.table_columns(comparison),
                                    comparison.summary, core.summary_columns(comparison))
    style = core.styles(comparison.series)
    plots = {}
    for name, figure in comparison.figures.items():
        png, plots[name] = core.render(figure, style)
        files.append(out_format.write_figure(output_dir, name, png))
    return Written(output_dir, files, comparison, plots)


def _reading_uri(config: Config) -> str:
    uri = tracking_uri_of(config)
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :])
        if not path.is_file():
            raise HyperofaError(f"{path}: no MLflow store to compare (set tracking.tracking_uri or run.dir)")
    return uri


def output_dir_of(config: Config) -> Path:
    cmp = config.compare
    if cmp.output_dir:
        return Path(cmp.output_dir).resolve()
    label = "runs" if cmp.run_ids else core.file_stem(cmp.experiment or config.tracking.experiment)
    return config.run_dir / out_format.ROOT / label


def run(config: Config, tracker: Any) -> int:
    cmp = config.compare
    experiment = None if cmp.run_ids else (cmp.experiment or config.tracking.experiment)
    output_dir = output_dir_of(config)
    if not tracker.deliver():  # the runs it reads may still have points in a journal (tracking/delivery.py)
        say("compare", "warning: the tracking store has not received every logged point yet; the comparison may "
            "miss some (they are replayed by the next command)")
    store = open_store(_reading_uri(config))
    runs, left_out = load_runs(store, cmp.metrics, experiment, cmp.run_ids)
    inputs = {"config": config.fingerprint("compare"), "experiment": experiment, "runs": core.identity(runs)}
    stage = Stage(output_dir.parent, output_dir.name)
    with StageShell.open(config, tracker, "compare", stage, inputs) as shell:
        if shell.up_to_date:
            return 0
        comparison = core.compare(runs, cmp.metrics, cmp.loss_metric)
        shell.begin()
        written = write(comparison, output_dir)
        shell.finish(
            outputs=[p.name for p in written.files],
            counts={"runs": len(runs), "series": len(comparison.series), "table_rows": len(comparison.table)},
        )
        for path in written.files:
            shell.run.log_artifact(path, "compare")
        shell.run.log_metrics({"compare/runs": len(runs), "compare/series": len(comparison.series)})
    labels = ", ".join(s.label for s in comparison.series)
    print(
        f"hyperofa compare: {len(runs)} runs ({labels}; {len(left_out)} without matching metrics, failed, killed or "
        f"superseded left out), {len(written.files)} files -> {output_dir}",
        file=sys.stderr,
    )
    return 0
