"""`hyperofa pipeline` and `hyperofa demo`: every stage in order under one MLflow parent run.

tokenizer -> prepare -> vectors (when `vectors.path` is unset) -> mapping -> hypernet (when hyperofa is among
the methods) -> for each method: init, evaluate at step 0, pretrain, evaluate after pretraining -> compare.
Each stage decides for itself whether its manifest matches its inputs and returns at once when it does, so a
second run of a finished pipeline only checks fingerprints and adds nothing to MLflow but its parent run (tagged
`hyperofa.reused` with the stages it found up to date). The stages get variants of the one config tree (e.g.
`init.method=ofa`), built and validated the same way as command-line overrides; each names its own MLflow run
(`init/ofa`, `pretrain/ofa`, `evaluate/ofa@60`), and the step labels printed here are those names.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from .config import Config
from .errors import HyperofaError
from .formats import init as init_format
from .formats import pretrain as pretrain_format
from .formats import results as results_format
from .formats import summary as summary_format
from .formats.hypernet import stage_of as hypernet_stage
from .formats.jobdir import has_checkpoint
from .formats.pretrain import stage_of as pretrain_stage
from .formats.rundir import MANIFEST
from .registry import Command, command

log = logging.getLogger("hyperofa.pipeline")


@dataclass(frozen=True)
class Step:
    label: str
    command: Command
    config: Config


def plan(config: Config) -> list[Step]:
    p = config.pipeline

    def step(name: str, changes: Optional[dict[str, Any]] = None, label: Optional[str] = None) -> Step:
        return Step(label or name, command(name), config.with_changes(changes) if changes else config)

    steps = []
    if config.tokenizer.path is None:  # a given target tokenizer (e.g. Glot500's) replaces the built one
        steps.append(step("tokenizer"))
    steps.append(step("prepare"))
    if config.vectors.path is None:
        steps.append(step("vectors"))
    steps.append(step("mapping"))
    if "hyperofa" in p.methods:
        resume = interrupted(hypernet_stage(config.run_dir).path)
        steps.append(step("hypernet", {"hypernet.resume": True} if resume else None))
    for method in p.methods:
        steps.append(step("init", {"init.method": method}, f"init/{method}"))
        if p.evaluate:
            steps.append(_evaluate(config, method, "init", 0))
        if p.pretrain:
            changes: dict[str, Any] = {"pretrain.method": method}
            if interrupted(pretrain_stage(config.run_dir, method).path):
                changes["pretrain.resume"] = True
            steps.append(step("pretrain", changes, f"pretrain/{method}"))
            if p.evaluate:
                steps.append(_evaluate(config, method, "pretrain", config.pretrain.steps))
    if p.compare and config.tracking.enabled:  # compare reads the MLflow store
        steps.append(step("compare"))
    return steps


def interrupted(stage_dir: Path) -> bool:
    """A DeepSpeed stage that left checkpoints but no manifest was killed: the pipeline continues it."""
    return has_checkpoint(stage_dir) and not (stage_dir / MANIFEST).is_file()


def _evaluate(config: Config, method: str, source: str, step: int) -> Step:
    changes = {
        "evaluate.model": f"{source}/{method}",
        "evaluate.name": f"{source}-{method}",
        "evaluate.step": step,
        "evaluate.init_method": method,
    }
    return Step(f"evaluate/{method}@{step}", command("evaluate"), config.with_changes(changes))


def run_pipeline(config: Config, tracker) -> int:
    steps = plan(config)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    for index, step in enumerate(steps, 1):
        print(f"[pipeline {index}/{len(steps)}] {step.label}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        code = step.command.load()(step.config, tracker)
        timings[step.label] = round(time.perf_counter() - t0, 2)
        if code:
            raise HyperofaError(f"stage {step.label} failed (exit {code}); fix it and run the pipeline again to resume")
    tracker.log_metrics({_metric_name(f"pipeline/{k}_s"): v for k, v in timings.items()}
                        | {"pipeline/total_s": time.perf_counter() - started})
    table = results_table(config)
    write_results(config, table)
    print_summary(config, table, time.perf_counter() - started)
    return 0


def _metric_name(text: str) -> str:
    """MLflow metric names allow letters, digits, `_-. /:` only (`evaluate/ofa@60` -> `evaluate/ofa_at_60`)."""
    return re.sub(r"[^/\w.\- :]", "_", text.replace("@", "_at_"))


# --- the comparison the user reads first ------------------------------------------------------------------------

COLUMNS = ("method", "srt_top10_step0", "srt_top1_step0", "mlm_loss_step0", "mlm_loss_final")
# A causal LM's evaluation has bits per byte where a masked LM's has its MLM loss (evaluate/causal.py).
CAUSAL_COLUMNS = ("method", "srt_top10_step0", "srt_top1_step0", "bpb_step0", "bpb_final")


def _metric(results: dict[str, Any], task: str, metric: str) -> Optional[float]:
    value = results.get(task, {}).get("average", {}).get(metric)
    return None if value is None else round(float(value), 4)


def _results(config: Config, method: str, source: str) -> dict[str, Any]:
    """The evaluation the pipeline runs of `source/method`, only when it is up to date for the current model and
    data: a table never shows the numbers of a model that has been rebuilt since (`pipeline.evaluate=false`)."""
    from .evaluate.stage import current_results

    if source == "pretrain" and not trained_from_current_init(config, method):
        return {}
    step = 0 if source == "init" else config.pretrain.steps
    return current_results(_evaluate(config, method, source, step).config) or {}


def trained_from_current_init(config: Config, method: str) -> bool:
    """pretrain/<method> is complete and was trained from the init model now on disk (with `pipeline.pretrain=false`
    an init rebuilt since leaves the old pretrained model in place)."""
    from .formats.models import model_fingerprint
    from .formats.rundir import portable

    manifest = pretrain_stage(config.run_dir, method).manifest()
    start = init_format.model_dir(config.run_dir, method)
    if manifest is None or not start.is_dir():
        return False
    recorded = (manifest.get("inputs") or {}).get("model")
    return recorded == portable(model_fingerprint(start), config.run_dir)


def results_table(config: Config, read: Callable[[Config, str, str], dict[str, Any]] = _results) -> list[dict[str, Any]]:
    """One row per method, in the columns of the model kind: MLM loss for masked LMs, bits per byte (averaged over
    the evaluated languages) for causal LMs; n/a where no evaluation matches the current model. `read(config,
    method, "init" | "pretrain")` gives an evaluation's results ({} when there is none)."""
    results = {m: (read(config, m, "init"), read(config, m, "pretrain")) for m in config.pipeline.methods}
    causal = any("bpb" in step0 or "bpb" in final for step0, final in results.values())
    task, metric, suffix = ("bpb", "bpb", "bpb") if causal else ("mlm", "loss", "mlm_loss")
    rows = []
    for method, (step0, final) in results.items():
        rows.append({
            "method": method,
            "srt_top10_step0": _metric(step0, "srt", "top10"),
            "srt_top1_step0": _metric(step0, "srt", "top1"),
            f"{suffix}_step0": _metric(step0, task, metric),
            f"{suffix}_final": _metric(final, task, metric),
        })
    return rows


def columns_of(rows: list[dict[str, Any]]) -> tuple[str, ...]:
    return tuple(rows[0]) if rows else COLUMNS


def markdown(rows: list[dict[str, Any]]) -> str:
    return summary_format.markdown(rows, columns_of(rows))


def write_results(config: Config, rows: list[dict[str, Any]]) -> None:
    summary_format.write_summary(config.run_dir, rows, columns_of(rows))


def print_summary(config: Config, rows: list[dict[str, Any]], seconds: float) -> None:
    from .errors import redact
    from .tracking import default_tracking_uri

    run_dir = config.run_dir
    uri = config.tracking.tracking_uri or default_tracking_uri(run_dir) if config.tracking.enabled else "(tracking disabled)"
    uri = redact(uri)
    print(markdown(rows))
    print()
    print(f"finished in {seconds:.0f}s")
    print(f"results:        {summary_format.markdown_path(run_dir)} (and .csv; per-task JSON in {run_dir / results_format.STAGE})")
    for method in config.pipeline.methods:
        final = pretrain_format.model_dir(run_dir, method)
        current = final.is_dir() and trained_from_current_init(config, method)
        print(f"model {method:9s} {final if current else init_format.model_dir(run_dir, method)}")
    if config.tracking.enabled and config.pipeline.compare:
        from .compare.stage import output_dir_of
        from .formats import comparison as cmp

        files = (cmp.TRAINING_LOSS, cmp.figure_name("eval_loss"), cmp.TABLE_MD, cmp.SUMMARY_MD)
        print(f"compare:        {output_dir_of(config)} ({', '.join(files)}, ...)")
    print(f"MLflow store:   {uri}  (mlflow ui --backend-store-uri {uri})")


def run_demo(config: Config, tracker) -> int:
    """Generate the demo world into `<run.dir>/world/`, point the config at it, run the whole pipeline."""
    from .synthetic.demo import WorldSpec

    return _demo_on(config, tracker, WorldSpec)


def run_demo_causal(config: Config, tracker) -> int:
    """The demo with a causal source (configs/demo-causal.yaml): a tiny untied Llama with a Llama-3-style tokenizer,
    pretrained with the next-token loss; the table reports held-out bits per byte."""
    from .synthetic.demo import CausalWorldSpec

    return _demo_on(config, tracker, CausalWorldSpec)


def _demo_on(config: Config, tracker, spec_type: type) -> int:
    from .synthetic.demo import build_world

    print("[demo] building the generated world (corpus, evaluation data, source model)", file=sys.stderr, flush=True)
    paths = build_world(config.run_dir, spec_type(seed=config.run.seed, block_size=config.prepare.block_size))
    config = config.with_changes({
        "source.model": str(paths.source_model),
        "corpus.path": str(paths.corpus),
        "evaluate.data_dir": str(paths.eval_data),
    })
    return run_pipeline(config, tracker)
