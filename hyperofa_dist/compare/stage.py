"""`hyperofa compare`: runs side by side by init method, as a table and as curves against steps (Figure 2).

Runs come from an MLflow experiment (or a list of run ids); a run takes part when it has at least one metric
matching `compare.metrics` (fnmatch patterns), so parent and bookkeeping runs drop out. Its init method is the
`init.method` tag, else (pretraining runs) the `pretrain.method` param, else the `init.method` param. Outputs, all
logged as MLflow artifacts:
- table.md and table.csv: one row per run, sorted by init method; the last value (highest step) of each metric;
- training_loss.png: the training-loss metric (`train/loss`) against steps, one curve per run;
- <metric>.png for every other matched metric: one curve per init method, the points of all its runs merged by
  step (evaluations of successive checkpoints are separate `hyperofa evaluate` runs at `evaluate.step`).
"""

from __future__ import annotations

import csv
import fnmatch
import io
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from ..formats.files import atomic_write_bytes
from ..config import Config
from ..errors import HyperofaError
from ..tracking import default_tracking_uri

UNKNOWN = "unknown"


@dataclass
class RunSummary:
    run_id: str
    name: str
    method: str
    last: dict[str, float]
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


@dataclass
class CompareResult:
    output_dir: Path
    files: list[Path]
    runs: list[RunSummary]
    # file name -> curve label -> (steps, values), read back from the drawn matplotlib lines
    plots: dict[str, dict[str, tuple[list[float], list[float]]]]


def matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def run_method(run: Any) -> str:
    """The explicit `init.method` tag; for pretraining runs the `pretrain.method` param (which model they
    trained); else the `init.method` param. Every run carries every config param, so the stage decides which."""
    tags, params = run.data.tags, run.data.params
    if tags.get("init.method"):
        return tags["init.method"]
    if tags.get("hyperofa.stage", "").startswith("pretrain") and params.get("pretrain.method"):
        return params["pretrain.method"]
    return params.get("init.method") or UNKNOWN


def _history(client: Any, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) sorted by step; several values at one step keep the latest logged."""
    by_step: dict[int, tuple[int, float]] = {}
    for m in client.get_metric_history(run_id, key):
        if m.step not in by_step or m.timestamp >= by_step[m.step][0]:
            by_step[m.step] = (m.timestamp, m.value)
    return [(step, value) for step, (_, value) in sorted(by_step.items())]


def collect_runs(
    client: Any, patterns: Sequence[str], experiment: Optional[str] = None, run_ids: Optional[Sequence[str]] = None
) -> tuple[list[RunSummary], list[str]]:
    """(runs with matching metrics, ids of runs left out for having none)."""
    if run_ids:
        runs = []
        for run_id in run_ids:
            try:
                runs.append(client.get_run(run_id))
            except Exception:  # MLflow raises MlflowException or a store error for an unknown id
                raise HyperofaError(f"compare.run_ids: run {run_id} not found in the tracking store") from None
    else:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise HyperofaError(f"MLflow experiment {experiment!r} not found (compare.experiment)")
        runs, token = [], None
        while True:
            page = client.search_runs([found.experiment_id], max_results=1000, page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                break
    summaries, left_out = [], []
    for run in runs:
        keys = sorted(k for k in run.data.metrics if matches(k, patterns))
        if not keys:
            left_out.append(run.info.run_id)
            continue
        summaries.append(
            RunSummary(
                run_id=run.info.run_id,
                name=run.info.run_name or run.info.run_id[:8],
                method=run_method(run),
                last={k: float(run.data.metrics[k]) for k in keys},
                history={k: _history(client, run.info.run_id, k) for k in keys},
            )
        )
    summaries.sort(key=lambda r: (r.method, r.name, r.run_id))
    return summaries, left_out


def metric_columns(runs: Sequence[RunSummary], loss_metric: str) -> list[str]:
    names = sorted({k for r in runs for k in r.last})
    return ([loss_metric] if loss_metric in names else []) + [n for n in names if n != loss_metric]


def table_markdown(runs: Sequence[RunSummary], columns: Sequence[str]) -> str:
    header = ["init method", "run", "run id", *columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in runs:
        cells = [r.method, r.name, r.run_id, *(f"{r.last[c]:.4g}" if c in r.last else "" for c in columns)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table_csv(runs: Sequence[RunSummary], columns: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["init_method", "run", "run_id", *columns])
    for r in runs:
        writer.writerow([r.method, r.name, r.run_id, *(repr(r.last[c]) if c in r.last else "" for c in columns)])
    return buffer.getvalue()


def method_curves(runs: Sequence[RunSummary], metric: str) -> dict[str, list[tuple[int, float]]]:
    """One curve per init method: the points of all its runs, by step (a later run wins a shared step)."""
    curves: dict[str, dict[int, float]] = {}
    for r in runs:
        for step, value in r.history.get(metric, []):
            curves.setdefault(r.method, {})[step] = value
    return {m: sorted(points.items()) for m, points in sorted(curves.items())}


def plot_curves(
    curves: dict[str, list[tuple[int, float]]], title: str, ylabel: str, colors: dict[str, Any]
) -> tuple[bytes, dict[str, tuple[list[float], list[float]]]]:
    """(PNG bytes, label -> (steps, values) of the lines actually drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.0), dpi=100)
    axes = figure.add_subplot()
    for label, points in curves.items():
        steps = [p[0] for p in points]
        values = [p[1] for p in points]
        axes.plot(steps, values, marker="o" if len(points) < 12 else None, label=label, color=colors.get(label))
    axes.set_title(title)
    axes.set_xlabel("step")
    axes.set_ylabel(ylabel)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    drawn = {}
    for line in axes.get_lines():
        xs, ys = line.get_data()
        drawn[line.get_label()] = ([float(x) for x in xs], [float(y) for y in ys])
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue(), drawn


def _color_map(labels: Sequence[str]) -> dict[str, Any]:
    import matplotlib

    palette = matplotlib.colormaps["tab10"]
    return {label: palette(i % 10) for i, label in enumerate(sorted(set(labels)))}


def file_stem(metric: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", metric)


def compare_runs(
    client: Any,
    output_dir: Path,
    *,
    patterns: Sequence[str],
    loss_metric: str = "train/loss",
    experiment: Optional[str] = None,
    run_ids: Optional[Sequence[str]] = None,
) -> CompareResult:
    runs, left_out = collect_runs(client, patterns, experiment, run_ids)
    source = f"runs {', '.join(run_ids)}" if run_ids else f"experiment {experiment!r}"
    if not runs:
        raise HyperofaError(f"{source}: no run has a metric matching compare.metrics {list(patterns)}")
    if left_out:
        print(f"hyperofa compare: {len(left_out)} runs without matching metrics left out", file=sys.stderr)
    output_dir.mkdir(parents=True, exist_ok=True)
    columns = metric_columns(runs, loss_metric)
    files = [
        atomic_write_bytes(output_dir / "table.md", table_markdown(runs, columns).encode("utf-8")),
        atomic_write_bytes(output_dir / "table.csv", table_csv(runs, columns).encode("utf-8")),
    ]
    method_colors = _color_map([r.method for r in runs])
    plots = {}
    loss_runs = [r for r in runs if r.history.get(loss_metric)]
    if loss_runs:
        curves = {f"{r.method} ({r.name})": r.history[loss_metric] for r in loss_runs}
        colors = {f"{r.method} ({r.name})": method_colors[r.method] for r in loss_runs}
        png, drawn = plot_curves(curves, f"training {loss_metric}", loss_metric, colors)
        files.append(atomic_write_bytes(output_dir / "training_loss.png", png))
        plots["training_loss.png"] = drawn
    for metric in columns:
        if metric == loss_metric:
            continue
        png, drawn = plot_curves(method_curves(runs, metric), metric, metric, method_colors)
        name = f"{file_stem(metric)}.png"
        files.append(atomic_write_bytes(output_dir / name, png))
        plots[name] = drawn
    return CompareResult(output_dir, files, runs, plots)


def _reading_uri(config: Config) -> str:
    uri = config.tracking.tracking_uri or default_tracking_uri(config.run_dir)
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :])
        if not path.is_file():
            raise HyperofaError(f"{path}: no MLflow store to compare (set tracking.tracking_uri or run.dir)")
    return uri


def run(config: Config, tracker: Any) -> int:
    from mlflow.tracking import MlflowClient

    cmp = config.compare
    experiment = cmp.experiment or config.tracking.experiment
    label = "runs" if cmp.run_ids else file_stem(experiment)
    output_dir = Path(cmp.output_dir) if cmp.output_dir else config.run_dir / "compare" / label
    client = MlflowClient(tracking_uri=_reading_uri(config))
    with tracker.stage("compare", config) as run:
        result = compare_runs(
            client,
            output_dir,
            patterns=cmp.metrics,
            loss_metric=cmp.loss_metric,
            experiment=None if cmp.run_ids else experiment,
            run_ids=cmp.run_ids,
        )
        for path in result.files:
            run.log_artifact(path, "compare")
        run.log_metrics({"compare/runs": len(result.runs)})
    methods = sorted({r.method for r in result.runs})
    print(
        f"hyperofa compare: {len(result.runs)} runs ({', '.join(methods)}), {len(result.files)} files -> {output_dir}",
        file=sys.stderr,
    )
    return 0
