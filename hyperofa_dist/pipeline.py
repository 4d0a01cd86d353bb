"""`hyperofa pipeline` and `hyperofa demo`: every stage in order under one MLflow parent run.

tokenizer -> prepare -> vectors (when `vectors.path` is unset) -> mapping -> hypernet (when hyperofa is among
the methods) -> for each method: init, evaluate at step 0, pretrain, evaluate after pretraining -> compare.
Each stage decides for itself whether its manifest matches its inputs and returns at once when it does, so a
second run of a finished pipeline only checks fingerprints. The stages get variants of the one config tree
(e.g. `init.method=ofa`), built and validated the same way as command-line overrides.
"""

from __future__ import annotations

import csv
import importlib
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from .config import Config, build_config
from .errors import HyperofaError

log = logging.getLogger("hyperofa.pipeline")


@dataclass(frozen=True)
class Step:
    label: str
    target: str  # module:function with signature fn(config, tracker) -> int
    config: Config


def variant(config: Config, changes: dict[str, Any]) -> Config:
    """The config with dotted keys replaced, validated like overrides."""
    tree = config.effective()
    for key, value in changes.items():
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = value
    return build_config(tree)


def plan(config: Config) -> list[Step]:
    p = config.pipeline
    steps = []
    if config.tokenizer.path is None:  # a given target tokenizer (e.g. Glot500's) replaces the built one
        steps.append(Step("tokenizer", "hyperofa_dist.tokenizer_build:run_tokenizer_stage", config))
    steps.append(Step("prepare", "data_prep.prepare:run_prepare_stage", config))
    if config.vectors.path is None:
        steps.append(Step("vectors", "hyperofa_dist.vectors:run_vectors_train", config))
    steps.append(Step("mapping", "data_prep.mapping_stage:run_mapping_stage", config))
    if "hyperofa" in p.methods:
        changes = {"hypernet.resume": True} if interrupted(config.run_dir / "hypernet") else {}
        steps.append(Step("hypernet", "hyperofa_dist.hypernet.stage:run_hypernet_stage", variant(config, changes)))
    for method in p.methods:
        steps.append(Step(f"init/{method}", "hyperofa_dist.init.stage:run_init_stage", variant(config, {"init.method": method})))
        if p.evaluate:
            steps.append(_evaluate(config, method, "init", 0))
        if p.pretrain:
            changes = {"pretrain.method": method}
            if interrupted(config.run_dir / "pretrain" / method):
                changes["pretrain.resume"] = True
            steps.append(Step(f"pretrain/{method}", "hyperofa_dist.pretrain.stage:run_pretrain_stage", variant(config, changes)))
            if p.evaluate:
                steps.append(_evaluate(config, method, "pretrain", config.pretrain.steps))
    if p.compare and config.tracking.enabled:  # compare reads the MLflow store
        steps.append(Step("compare", "hyperofa_dist.evaluate.compare:run_compare_stage", config))
    return steps


def interrupted(stage_dir: Path) -> bool:
    """A DeepSpeed stage that left checkpoints but no manifest was killed: the pipeline continues it."""
    return (stage_dir / "checkpoints" / "latest").is_file() and not (stage_dir / "manifest.json").is_file()


def _evaluate(config: Config, method: str, source: str, step: int) -> Step:
    changes = {
        "evaluate.model": f"{source}/{method}",
        "evaluate.name": f"{source}-{method}",
        "evaluate.step": step,
        "evaluate.init_method": method,
    }
    return Step(f"evaluate/{source}-{method}", "hyperofa_dist.evaluate.stage:run_evaluate_stage", variant(config, changes))


def _call(target: str) -> Callable:
    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)


def run_pipeline(config: Config, tracker) -> int:
    steps = plan(config)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    for index, step in enumerate(steps, 1):
        print(f"[pipeline {index}/{len(steps)}] {step.label}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        code = _call(step.target)(step.config, tracker)
        timings[step.label] = round(time.perf_counter() - t0, 2)
        if code:
            raise HyperofaError(f"stage {step.label} failed (exit {code}); fix it and run the pipeline again to resume")
    tracker.log_metrics({f"pipeline/{k}_s": v for k, v in timings.items()} | {"pipeline/total_s": time.perf_counter() - started})
    table = results_table(config)
    write_results(config, table)
    print_summary(config, table, time.perf_counter() - started)
    return 0


# --- the comparison the user reads first ------------------------------------------------------------------------

COLUMNS = ("method", "srt_top10_step0", "srt_top1_step0", "mlm_loss_step0", "mlm_loss_final")


def _metric(results: dict[str, Any], task: str, metric: str) -> Optional[float]:
    value = results.get(task, {}).get("average", {}).get(metric)
    return None if value is None else round(float(value), 4)


def _results(config: Config, name: str) -> dict[str, Any]:
    path = config.run_dir / "evaluate" / name / "results.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def results_table(config: Config) -> list[dict[str, Any]]:
    rows = []
    for method in config.pipeline.methods:
        step0, final = _results(config, f"init-{method}"), _results(config, f"pretrain-{method}")
        rows.append({
            "method": method,
            "srt_top10_step0": _metric(step0, "srt", "top10"),
            "srt_top1_step0": _metric(step0, "srt", "top1"),
            "mlm_loss_step0": _metric(step0, "mlm", "loss"),
            "mlm_loss_final": _metric(final, "mlm", "loss"),
        })
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    def cell(v: Any) -> str:
        return "n/a" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def write_results(config: Config, rows: list[dict[str, Any]]) -> None:
    from .artifacts import atomic_write_bytes

    out = config.run_dir / "results"
    atomic_write_bytes(out / "summary.md", (markdown(rows) + "\n").encode())
    lines = [",".join(COLUMNS)] + [",".join("" if r[c] is None else str(r[c]) for c in COLUMNS) for r in rows]
    atomic_write_bytes(out / "summary.csv", ("\n".join(lines) + "\n").encode())


def print_summary(config: Config, rows: list[dict[str, Any]], seconds: float) -> None:
    from .tracking import default_tracking_uri

    run_dir = config.run_dir
    uri = config.tracking.tracking_uri or default_tracking_uri(run_dir) if config.tracking.enabled else "(tracking disabled)"
    print(markdown(rows))
    print()
    print(f"finished in {seconds:.0f}s")
    print(f"results:        {run_dir / 'results' / 'summary.md'} (and .csv; per-task JSON in {run_dir / 'evaluate'})")
    for method in config.pipeline.methods:
        final = run_dir / "pretrain" / method / "model"
        print(f"model {method:9s} {final if final.is_dir() else run_dir / 'init' / method / 'model'}")
    print(f"MLflow store:   {uri}  (mlflow ui --backend-store-uri {uri})")


DEMO_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"


def run_demo(config: Config, tracker) -> int:
    """Generate the demo world into `<run.dir>/world/`, point the config at it, run the whole pipeline."""
    from .demo_world import WorldSpec, build_world

    print("[demo] building the generated world (corpus, evaluation data, source model)", file=sys.stderr, flush=True)
    paths = build_world(config.run_dir, WorldSpec(seed=config.run.seed, block_size=config.prepare.block_size))
    config = variant(config, {
        "source.model": str(paths.source_model),
        "corpus.path": str(paths.corpus),
        "evaluate.data_dir": str(paths.eval_data),
    })
    return run_pipeline(config, tracker)
