"""Every command of `hyperofa`, once: the CLI builds its parser from here and the pipeline runs its stages from
here, so a stage is added, renamed or described in one place.

An entry names its run function as `module:function` and is imported only when the command runs, so
`hyperofa --help` stays fast and the core never imports the Ray preparation package (`data_prep`) at import time;
`tests/test_registry.py` resolves every entry, so a rename fails in the tests, not at a user's run.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Optional


@dataclass(frozen=True)
class Flag:
    """`--flag value`: a shorthand for one config key (a comma-separated list when `is_list`)."""

    flag: str
    key: str
    is_list: bool
    help: str


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    target: str  # "module:function"; the function takes (config, tracker) and returns an exit status
    actions: tuple[str, ...] = ()  # a word the command takes first (`hyperofa vectors train`)
    launch_section: Optional[str] = None  # DeepSpeed jobs: --hostfile/--num_nodes/--launcher -> <section>.<flag>
    flags: tuple[Flag, ...] = ()
    is_stage: bool = True  # writes <run.dir>/<name>/ with a manifest (pipeline, demo, compare do not)
    dry_run: bool = False  # a bench with `--dry-run`: a toy shape that checks it runs end to end (CI)
    plan_target: Optional[str] = None  # a command with `--dry-run`: "module:function(config)" checks and prints its plan

    def load(self) -> Callable:
        return resolve(self.target)


def resolve(target: str) -> Callable:
    """`module:function` -> the function, importing the module now (also how a benchmark reaches a data_prep
    function without the core importing data_prep)."""
    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)


COMMANDS: tuple[Command, ...] = (
    Command("tokenizer", "build the target tokenizer (extend or train)", "hyperofa_dist.tokenizer.stage:run"),
    Command("prepare", "Ray job: corpus -> sampled, tokenized, packed webdataset shards", "data_prep.prepare.stage:run"),
    Command(
        "vectors", "word vectors: `vectors train` learns cross-lingual vectors from a parallel corpus",
        "hyperofa_dist.vectors.stage:run", actions=("train",),
    ),
    Command(
        "mapping", "Ray job: overlap, SVD factorisation, token->word postings, split", "data_prep.mapping.stage:run"
    ),
    Command(
        "hypernet", "DeepSpeed job: train the hypernetwork, predict new-token coordinates",
        "hyperofa_dist.hypernet.stage:run", launch_section="hypernet",
    ),
    Command(
        "init", "new-token embeddings (init.method=hyperofa|ofa|random) + expanded HF model",
        "hyperofa_dist.init.stage:run",
    ),
    Command(
        "pretrain", "DeepSpeed ZeRO job: continued MLM pretraining + HF export", "hyperofa_dist.pretrain.stage:run",
        launch_section="pretrain",
    ),
    Command(
        "evaluate", "SR-T/SR-B retrieval, zero-shot POS/NER, per-language MLM loss of one model",
        "hyperofa_dist.evaluate.stage:run",
        flags=(
            Flag("--model", "evaluate.model", False, "HF model directory or run stage, e.g. init/hyperofa"),
            Flag("--tasks", "evaluate.tasks", True, "comma-separated subset of srt,srb,pos,ner,mlm"),
            Flag("--data", "evaluate.data_dir", False, "benchmark data directory (srt/ srb/ pos/ ner/ inside)"),
            Flag("--output", "evaluate.output", False, "results JSON file"),
        ),
    ),
    Command(
        "compare", "tables and loss/metric-vs-step plots of MLflow runs, one curve per init method (and pipeline)",
        "hyperofa_dist.compare.stage:run", is_stage=False,
        flags=(
            Flag("--experiment", "compare.experiment", False, "MLflow experiment whose runs to compare"),
            Flag("--runs", "compare.run_ids", True, "comma-separated MLflow run ids instead of an experiment"),
        ),
    ),
    Command(
        "tune", "`tune hypernet`: Ray Tune search (ASHA) of the hypernetwork's settings by the new-token loss; "
        "writes the winning config", "hyperofa_dist.tune.stage:run", actions=("hypernet",),
    ),
    Command(
        "pipeline", "every stage in order (skipping finished ones), one MLflow parent run",
        "hyperofa_dist.pipeline:run_pipeline", is_stage=False, plan_target="hyperofa_dist.dryrun:dry_run",
    ),
    Command(
        "demo", "the whole pipeline on a generated world, on this machine (configs/demo.yaml)",
        "hyperofa_dist.pipeline:run_demo", is_stage=False,
    ),
    Command(
        "demo-causal", "the demo with a causal source (a tiny Llama; configs/demo-causal.yaml): bits per byte per method",
        "hyperofa_dist.pipeline:run_demo_causal", is_stage=False,
    ),
)

# `hyperofa bench <name>`: one JSON line with the figure and its baseline measured in the same run.
BENCHES: tuple[Command, ...] = (
    Command("prepare", "throughput of prepare vs the raw tokenizer; 1 vs 2 workers", "hyperofa_dist.bench.prepare:run"),
    Command(
        "prepare-scale", "prepare on one language at 1x, 4x, 16x (Glot500-c parquet layout): throughput, peak RSS per worker",
        "hyperofa_dist.bench.prepare_scale:run", dry_run=True,
    ),
    Command("mapping", "Ray postings builder (2 workers) vs the per-word encode loop", "hyperofa_dist.bench.mapping:run"),
    Command("init", "OFA assembly at XLM-R-to-Glot500 scale on generated vectors", "hyperofa_dist.bench.init:run"),
    Command("pretrain", "masked-head DeepSpeed loop vs a plain full-logits loop", "hyperofa_dist.bench.pretrain:run"),
    Command(
        "causal-loss", "peak memory of a causal LM's loss: chunked vs full logits, each in a fresh process",
        "hyperofa_dist.bench.causal_loss:run",
    ),
    Command("hypernet", "DeepSpeed 1 and 2 ranks vs a plain PyTorch loop (samples/s)", "hyperofa_dist.bench.hypernet:run"),
    Command(
        "pretrain-sweep", "pretraining step per lever (padding, SDPA, fused AdamW, syncs, ZeRO, micro-batch) and phase",
        "hyperofa_dist.bench.sweep:run", dry_run=True,
    ),
    Command(
        "context", "hypernet context rule: lowest word indices vs a fixed per-token sample (cosine, new-token loss)",
        "hyperofa_dist.bench.context:run",
    ),
    Command(
        "variants", "step-0 new-token loss of OFA/HyperOFA variants: re-centred rows, shuffled word order (3 seeds)",
        "hyperofa_dist.bench.variants:run",
    ),
    Command(
        "untied", "untied causal LM: one factorisation of [E_in | E_out] and one hypernetwork vs two (held-out cosine)",
        "hyperofa_dist.bench.untied:run",
    ),
)


def command(name: str) -> Command:
    for entry in COMMANDS:
        if entry.name == name:
            return entry
    raise KeyError(name)


def bench(name: str) -> Command:
    for entry in BENCHES:
        if entry.name == name:
            return entry
    raise KeyError(name)
