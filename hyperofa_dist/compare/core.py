"""The comparison itself, pure: run records in, series, curves, tables and figures out (no store, no files).

A *series* is one init method of one pipeline (runs carry `init.method` and `hyperofa.pipeline`, the run-dir
hash). Its label is the method; when the runs come from several pipelines (e.g. k = 100 and k = 400 sharing an
experiment), `method (pipeline)`, the pipeline named by its run directory. Of runs with the same name in the same
pipeline (a stage re-run after a config change) only the latest counts, so a curve never mixes two trainings.

Figures (each returned with the data of the lines actually drawn):
- training_loss.png: `compare.loss_metric` (`train/loss`) against steps, one curve per series;
- eval_loss_by_language.png: the pretraining job's held-out loss `eval/<lang>/loss`, one panel per language;
- <metric>.png for every other metric matching `compare.metrics`: `eval_loss.png` (the held-out average),
  `srt.average.top10.png`, ... (evaluations of successive models are separate runs at `hyperofa.step`; a series
  merges their points by step).
Tables:
- table (long): one row per (series, evaluated step): every step at which a matched metric other than the training
  loss has a value, with the training loss at that step when it was logged there;
- summary (wide): one row per series: its final evaluated step, each evaluation metric at step 0 and at its last
  step side by side, the final training loss, and the steps the series needed to reach the final training loss of
  random (same pipeline): the first logged step whose training loss is at or below it; then, when the compared runs
  include init runs, the init stage's step-0 diagnostics (`INIT_SUMMARY`: the new-token loss and the statistics of
  the new and copied embedding rows, docs/METHOD.md §1.13), `<metric>@0` each.
"""

from __future__ import annotations

import fnmatch
import io
import re
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any, Callable, Optional, Sequence

from ..formats.comparison import EVAL_LOSS_BY_LANGUAGE, TRAINING_LOSS, figure_name
from ..tracking import COMMAND_TAG, METHOD_TAG, OBJECTIVE_TAG, PIPELINE_TAG, RUN_DIR_TAG, STAGE_TAG, RunRecord

UNKNOWN = "unknown"
ENDED_BADLY = ("FAILED", "KILLED")  # MLflow run statuses of jobs that did not finish
BASELINE = "random"
HELDOUT_LANGUAGE = re.compile(r"^eval/(?P<lang>[^/]+)/loss$")  # pretrain job: held-out loss per language
STEPS_TO_BASELINE = f"steps_to_{BASELINE}_final_loss"
INIT_STAGE = "init"
# The init stage's step-0 diagnostics that the summary shows per series (init/rows.py names the row statistics).
INIT_SUMMARY = (
    "new_token_mlm_loss", "new_token_causal_loss",
    *(f"rows/{group}/{stat}" for group in ("new", "copy")
      for stat in ("norm_mean", "norm_sd", "mean_norm", "mean_share")),
    "rows/new/cosine_to_copy_mean",
)

Points = list[tuple[int, float]]


@dataclass(frozen=True)
class Series:
    method: str
    pipeline: str  # the pipeline id (`hyperofa.pipeline`), "" for runs without one
    label: str  # what the legend says
    pipeline_name: str  # the pipeline as a reader knows it: its run directory's name


@dataclass
class Figure:
    title: str
    ylabel: str
    panels: dict[str, dict[str, Points]]  # panel title ("" for a single panel) -> series label -> points


@dataclass
class Comparison:
    runs: list[RunRecord]
    series: list[Series]
    loss_metric: str
    metrics: list[str]  # matched metrics other than the training loss: the table's columns
    table: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    figures: dict[str, Figure] = field(default_factory=dict)  # file name -> figure
    init_metrics: list[str] = field(default_factory=list)  # INIT_SUMMARY metrics the init runs have: summary columns


# --- which runs, which series ----------------------------------------------------------------------------------


def matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def wanted(patterns: Sequence[str]) -> Callable[[str], bool]:
    """The metrics whose histories a comparison reads: the matched ones, the per-language held-out losses and the
    init stage's diagnostics."""
    return lambda key: matches(key, patterns) or bool(HELDOUT_LANGUAGE.match(key)) or key in INIT_SUMMARY


def is_init_run(run: RunRecord) -> bool:
    return run.tags.get(STAGE_TAG) == INIT_STAGE and any(k in INIT_SUMMARY for k in run.metrics)


def run_method(run: RunRecord) -> str:
    """The `init.method` tag; else, for pretraining runs, the `pretrain.method` param (which model they trained);
    for evaluations of a model of unknown method, the evaluation's name; else unknown. (Every run carries every
    config param, so the config default `init.method` says nothing about a run.)"""
    tags, params = run.tags, run.params
    if tags.get(METHOD_TAG):
        return tags[METHOD_TAG]
    stage = tags.get(STAGE_TAG, "")
    if stage.startswith("pretrain") and params.get("pretrain.method"):
        return params["pretrain.method"]
    if stage == "evaluate" and tags.get("evaluate.name"):
        return tags["evaluate.name"]
    return UNKNOWN


def select_runs(runs: Sequence[RunRecord], patterns: Sequence[str]) -> tuple[list[RunRecord], list[RunRecord]]:
    """(runs that take part, runs left out). A run takes part when it has a metric matching `patterns` (or is an init
    run with a diagnostic of `INIT_SUMMARY`), did not end
    FAILED or KILLED, and is the latest of the runs sharing its pipeline, name and evaluation name; command (parent)
    runs never do. A failed or killed job's partial curve is left out: the resumed job continues its run (which then
    ends FINISHED), and a job started afresh has a run of its own."""
    candidates, left_out = [], []
    for run in runs:
        if (COMMAND_TAG not in run.tags and run.status not in ENDED_BADLY
                and (any(matches(k, patterns) for k in run.metrics) or is_init_run(run))):
            candidates.append(run)
        else:
            left_out.append(run)
    latest: dict[tuple[str, str, str], RunRecord] = {}
    for run in sorted(candidates, key=lambda r: (r.start_time, r.run_id)):
        key = (run.tags.get(PIPELINE_TAG, ""), run.name, run.tags.get("evaluate.name", ""))
        if key in latest:
            left_out.append(latest[key])
        latest[key] = run
    kept = sorted(latest.values(), key=lambda r: (run_method(r), r.tags.get(PIPELINE_TAG, ""), r.start_time, r.run_id))
    return kept, left_out


def pipeline_names(runs: Sequence[RunRecord]) -> dict[str, str]:
    """pipeline id -> its run directory's name (the id itself where two pipelines' directories share a name)."""
    dirs: dict[str, str] = {}
    for run in runs:
        pid = run.tags.get(PIPELINE_TAG, "")
        if pid not in dirs or not dirs[pid]:
            dirs[pid] = PurePath(run.tags.get(RUN_DIR_TAG, "")).name
    names = {pid: (name or pid or "untagged") for pid, name in dirs.items()}
    counts: dict[str, int] = {}
    for name in names.values():
        counts[name] = counts.get(name, 0) + 1
    return {pid: (name if counts[name] == 1 else pid or "untagged") for pid, name in names.items()}


def series_of(runs: Sequence[RunRecord]) -> dict[str, Series]:
    """run id -> its series; the pipeline appears in labels only when the runs span several pipelines."""
    names = pipeline_names(runs)
    several = len(names) > 1
    out = {}
    for run in runs:
        method, pid = run_method(run), run.tags.get(PIPELINE_TAG, "")
        label = f"{method} ({names[pid]})" if several else method
        out[run.run_id] = Series(method, pid, label, names[pid])
    return out


def identity(runs: Sequence[RunRecord]) -> list[dict[str, Any]]:
    """What a comparison is computed from (for the compare stage's up-to-date check): every kept run's id, name,
    series and metric histories; nothing that changes when the same runs are read again."""
    return [
        {
            "run_id": r.run_id,
            "name": r.name,
            "method": run_method(r),
            "pipeline": r.tags.get(PIPELINE_TAG, ""),
            "run_dir": r.tags.get(RUN_DIR_TAG, ""),
            "history": {k: [[s, v] for s, v in points] for k, points in sorted(r.history.items())},
        }
        for r in runs
    ]


# --- curves and tables -----------------------------------------------------------------------------------------


def curves(runs: Sequence[RunRecord], series: dict[str, Series], metric: str) -> dict[Series, Points]:
    """One curve per series: the points of its runs that have `metric`, by step (a later run wins a shared step)."""
    merged: dict[Series, dict[int, float]] = {}
    for run in sorted(runs, key=lambda r: (r.start_time, r.run_id)):
        for step, value in run.history.get(metric, []):
            merged.setdefault(series[run.run_id], {})[int(step)] = float(value)
    return {s: sorted(points.items()) for s, points in sorted(merged.items(), key=lambda kv: kv[0].label)}


def _by_label(curves_: dict[Series, Points]) -> dict[str, Points]:
    return {s.label: points for s, points in curves_.items()}


def metric_columns(runs: Sequence[RunRecord], patterns: Sequence[str], loss_metric: str) -> list[str]:
    names = {k for r in runs for k in r.history if matches(k, patterns) and k != loss_metric}
    # The pretraining job's held-out average first, then the evaluation metrics by name.
    return sorted(names, key=lambda n: (not n.startswith("eval/"), n))


def first_step_at_or_below(points: Points, target: float) -> Optional[int]:
    for step, value in points:
        if value <= target:
            return step
    return None


def build_tables(
    runs: Sequence[RunRecord], series: dict[str, Series], metrics: Sequence[str], loss_metric: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    ordered = sorted({s for s in series.values()}, key=lambda s: (s.pipeline_name, s.method))
    per_metric = {m: {s: dict(p) for s, p in curves(runs, series, m).items()} for m in (loss_metric, *metrics)}
    table = []
    for s in ordered:
        steps = sorted({step for m in metrics for step in per_metric[m].get(s, {})})
        for step in steps:
            row: dict[str, Any] = {"method": s.method, "pipeline": s.pipeline_name, "step": step}
            row[loss_metric] = per_metric[loss_metric].get(s, {}).get(step)
            row.update({m: per_metric[m].get(s, {}).get(step) for m in metrics})
            table.append(row)
    losses = per_metric[loss_metric]
    summary = []
    for s in ordered:
        row = {"method": s.method, "pipeline": s.pipeline_name}
        finals = [max(per_metric[m][s]) for m in metrics if per_metric[m].get(s)]
        row["final_step"] = max(finals) if finals else None
        for m in metrics:
            points = per_metric[m].get(s, {})
            row[f"{m}@0"] = points.get(0)
            row[f"{m}@final"] = points[max(points)] if points else None  # the metric's own last step
        own = sorted(losses.get(s, {}).items())
        row[f"{loss_metric}@final"] = own[-1][1] if own else None
        baseline = next((b for b in losses if b.method == BASELINE and b.pipeline == s.pipeline), None)
        target = sorted(losses[baseline].items())[-1][1] if baseline is not None and losses[baseline] else None
        row[STEPS_TO_BASELINE] = first_step_at_or_below(own, target) if target is not None else None
        summary.append(row)
    return table, summary


def init_columns(runs: Sequence[RunRecord], metrics: Sequence[str]) -> list[str]:
    """The INIT_SUMMARY metrics some compared init run has (and no pattern column already shows)."""
    present = {k for r in runs if is_init_run(r) for k in r.history}
    return [m for m in INIT_SUMMARY if m in present and m not in metrics]


def add_init_columns(summary: list[dict[str, Any]], runs: Sequence[RunRecord], series: dict[str, Series],
                     columns: Sequence[str]) -> list[dict[str, Any]]:
    """Each summary row gets its series' init diagnostics as `<metric>@0` (the latest init run's value)."""
    inits = [r for r in runs if is_init_run(r)]
    for metric in columns:
        values = {(s.method, s.pipeline_name): points[-1][1] for s, points in curves(inits, series, metric).items()}
        for row in summary:
            row[f"{metric}@0"] = values.get((row["method"], row["pipeline"]))
    return summary


def compare(
    runs: Sequence[RunRecord], patterns: Sequence[str], loss_metric: str = "train/loss"
) -> Comparison:
    """The comparison of `runs` (already selected, histories filled): tables and figure data."""
    series = series_of(runs)
    metrics = metric_columns(runs, patterns, loss_metric)
    table, summary = build_tables(runs, series, metrics, loss_metric)
    init_metrics = init_columns(runs, metrics)
    add_init_columns(summary, runs, series, init_metrics)
    figures: dict[str, Figure] = {}
    objective = objective_name(runs)
    loss = _by_label(curves(runs, series, loss_metric))
    if loss:
        figures[TRAINING_LOSS] = Figure(f"training {objective} loss ({loss_metric})", loss_metric, {"": loss})
    languages = sorted({m.group("lang") for r in runs for k in r.history if (m := HELDOUT_LANGUAGE.match(k))})
    if languages:
        panels = {lang: _by_label(curves(runs, series, f"eval/{lang}/loss")) for lang in languages}
        figures[EVAL_LOSS_BY_LANGUAGE] = Figure(f"held-out {objective} loss per language (eval/<lang>/loss)",
                                                      "eval loss", panels)
    for metric in metrics:
        lines = _by_label(curves(runs, series, metric))
        figures[figure_name(file_stem(metric))] = Figure(title(metric, objective), metric, {"": lines})
    return Comparison(list(runs), sorted(set(series.values()), key=lambda s: s.label), loss_metric, metrics, table,
                      summary, figures, init_metrics)


def objective_name(runs: Sequence[RunRecord]) -> str:
    """What the loss curves measure, from the pretraining runs' objective tag: a causal LM's next-token loss or a
    masked LM's MLM loss (runs without the tag predate causal sources: masked)."""
    kinds = {r.tags.get(OBJECTIVE_TAG, "masked") for r in runs if r.tags.get(STAGE_TAG) == "pretrain"}
    return {frozenset({"causal"}): "next-token", frozenset({"causal", "masked"}): "MLM / next-token"}.get(
        frozenset(kinds), "MLM")


TITLES = {  # what a reader calls the metrics the system logs; other metrics are titled by their name
    "eval/loss": "held-out {objective} loss, mean over languages",
    "bpb.average.bpb": "held-out bits per byte, mean over languages",
    "fertility.average.fertility_target": "pieces per word (extended tokenizer), mean over languages",
    "mlm.average.loss": "MLM loss of the evaluated model, mean over languages",
    "mlm.average.perplexity": "MLM perplexity of the evaluated model, mean over languages",
    **{f"{task}.average.top{k}": f"{name} top-{k} accuracy (%), mean over languages"
       for task, name in (("srt", "SR-T"), ("srb", "SR-B")) for k in (1, 5, 10)},
    **{f"{task}.average.f1": f"{task.upper()} zero-shot F1, mean over languages" for task in ("pos", "ner")},
}


def title(metric: str, objective: str = "MLM") -> str:
    return f"{TITLES[metric].format(objective=objective)} ({metric})" if metric in TITLES else metric


def file_stem(metric: str) -> str:
    """A name safe as one file or directory name: never '.', '..' or empty (an experiment named '..' must not
    put the comparison outside compare/)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", metric)
    return stem if stem.strip(".") else stem.replace(".", "_") or "_"


# --- rendering -----------------------------------------------------------------------------------------------------


def table_columns(result: Comparison) -> list[str]:
    return ["method", "pipeline", "step", result.loss_metric, *result.metrics]


def summary_columns(result: Comparison) -> list[str]:
    cols = ["method", "pipeline", "final_step"]
    for m in result.metrics:
        cols += [f"{m}@0", f"{m}@final"]
    return cols + [f"{result.loss_metric}@final", STEPS_TO_BASELINE, *(f"{m}@0" for m in result.init_metrics)]


def styles(series: Sequence[Series]) -> dict[str, dict[str, Any]]:
    """label -> matplotlib line style: one colour per method, one dash pattern per pipeline."""
    import matplotlib

    palette = matplotlib.colormaps["tab10"]
    methods = sorted({s.method for s in series})
    pipelines = sorted({s.pipeline for s in series})
    dashes = ["-", "--", ":", "-."]
    return {
        s.label: {"color": palette(methods.index(s.method) % 10), "linestyle": dashes[pipelines.index(s.pipeline) % 4]}
        for s in series
    }


Drawn = dict[str, tuple[list[float], list[float]]]


def render(figure: Figure, style: dict[str, dict[str, Any]]) -> tuple[bytes, Drawn]:
    """(PNG bytes, label -> (steps, values) of the lines actually drawn; `<panel>: <label>` in a panel grid)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure as MplFigure

    n = len(figure.panels)
    cols = 1 if n == 1 else min(3, n)
    rows = -(-n // cols)
    fig = MplFigure(figsize=(6.4 if n == 1 else 4.2 * cols, 4.0 if n == 1 else 3.2 * rows), dpi=100)
    drawn: Drawn = {}
    for index, (panel, lines) in enumerate(figure.panels.items()):
        axes = fig.add_subplot(rows, cols, index + 1)
        for label, points in lines.items():
            axes.plot([p[0] for p in points], [p[1] for p in points], marker="o" if len(points) < 25 else None,
                      markersize=3, label=label, **style.get(label, {}))
        axes.set_title(panel or figure.title, fontsize="medium" if n == 1 else "small")
        axes.set_xlabel("step")
        axes.set_ylabel(figure.ylabel if n == 1 else "")
        axes.grid(True, alpha=0.3)
        if lines and (n == 1 or index == 0):
            axes.legend(fontsize="small")
        for line in axes.get_lines():
            xs, ys = line.get_data()
            drawn[f"{panel}: {line.get_label()}" if panel else line.get_label()] = (
                [float(x) for x in xs], [float(y) for y in ys])
    if n > 1:
        fig.suptitle(figure.title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue(), drawn
