"""`hyperofa <command> [--config FILE] [key=value ...]`: the one entry point of every stage.

Each command resolves its config (YAML + overrides, validated before any work), opens the MLflow parent run of
this invocation, and calls the stage function with the config and the tracker. A `HyperofaError` becomes one
line on stderr and exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, Optional

from .errors import HyperofaError

# command -> (module, function, help). Modules are imported only when their command runs, so --help is fast.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "tokenizer": ("hyperofa_dist.tokenizer_build", "run_tokenizer_stage", "build the target tokenizer (extend or train)"),
    "prepare": ("data_prep.prepare", "run_prepare_stage", "Ray job: corpus -> sampled, tokenized, packed webdataset shards"),
    "vectors": ("hyperofa_dist.vectors", "run_vectors_command", "word vectors: `vectors train` learns cross-lingual vectors from a parallel corpus"),
    "mapping": ("data_prep.mapping_stage", "run_mapping_stage", "Ray job: overlap, SVD factorisation, token->word postings, split"),
    "init": ("hyperofa_dist.init.stage", "run_init_stage", "new-token embeddings (init.method=hyperofa|ofa|random) + expanded HF model"),
    "pretrain": ("hyperofa_dist.pretrain.stage", "run_pretrain_stage", "DeepSpeed ZeRO job: continued MLM pretraining + HF export"),
    "hypernet": ("hyperofa_dist.hypernet.stage", "run_hypernet_stage", "DeepSpeed job: train the hypernetwork, predict new-token coordinates"),
    "pipeline": ("hyperofa_dist.pipeline", "run_pipeline", "every stage in order (skipping finished ones), one MLflow parent run"),
    "demo": ("hyperofa_dist.pipeline", "run_demo", "the whole pipeline on a generated world, on this machine (configs/demo.yaml)"),
    "evaluate": ("hyperofa_dist.evaluate.stage", "run_evaluate_stage", "SR-T/SR-B retrieval, zero-shot POS/NER, per-language MLM loss of one model"),
    "compare": ("hyperofa_dist.evaluate.compare", "run_compare_stage", "table and loss/metric-vs-step plots of MLflow runs by init method"),
}

# Commands that take an action word first (`hyperofa vectors train`); it is passed to the function as `action`.
ACTIONS: dict[str, tuple[str, ...]] = {"vectors": ("train",)}

# Commands that launch DeepSpeed jobs: --hostfile/--num_nodes/--launcher are shorthands for <section>.<flag>=...
LAUNCH_SECTIONS: dict[str, str] = {"pretrain": "pretrain", "hypernet": "hypernet"}

# Per-command flags, each a shorthand for one config key: (flag, key, is a comma-separated list, help).
# They are applied after the key=value overrides.
COMMAND_FLAGS: dict[str, tuple[tuple[str, str, bool, str], ...]] = {
    "evaluate": (
        ("--model", "evaluate.model", False, "HF model directory or run stage, e.g. init/hyperofa"),
        ("--tasks", "evaluate.tasks", True, "comma-separated subset of srt,srb,pos,ner,mlm"),
        ("--data", "evaluate.data_dir", False, "benchmark data directory (srt/ srb/ pos/ ner/ inside)"),
        ("--output", "evaluate.output", False, "results JSON file"),
    ),
    "compare": (
        ("--experiment", "compare.experiment", False, "MLflow experiment whose runs to compare"),
        ("--runs", "compare.run_ids", True, "comma-separated MLflow run ids instead of an experiment"),
    ),
}


def _flag_overrides(command: str, args: argparse.Namespace) -> list[str]:
    """`--flag value` -> `key=<JSON>` overrides (JSON is YAML, so paths with ':' or '#' survive as strings)."""
    import json

    out = []
    for flag, key, is_list, _ in COMMAND_FLAGS.get(command, ()):
        value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        if value is not None:
            parsed = [v.strip() for v in value.split(",") if v.strip()] if is_list else value
            out.append(f"{key}={json.dumps(parsed)}")
    return out


# `hyperofa bench <name>`: one JSON line with the figure and its same-run baseline.
BENCHES: dict[str, tuple[str, str, str]] = {
    "prepare": ("data_prep.bench", "bench_prepare", "throughput of prepare vs the raw tokenizer; 1 vs 2 workers"),
    "mapping": ("data_prep.bench_mapping", "bench_mapping", "Ray postings builder (2 workers) vs the per-word encode loop"),
    "init": ("hyperofa_dist.init.bench", "bench_init", "OFA assembly at XLM-R-to-Glot500 scale on generated vectors"),
    "pretrain": ("hyperofa_dist.pretrain.bench", "bench_pretrain", "masked-head DeepSpeed loop vs a plain full-logits loop"),
    "hypernet": ("hyperofa_dist.hypernet.bench", "bench_hypernet", "DeepSpeed 1 and 2 ranks vs a plain PyTorch loop (samples/s)"),
}


def _load(target: tuple[str, str, str]) -> Callable:
    module, function, _ = target
    return getattr(importlib.import_module(module), function)


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="YAML config file (see README: config reference)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. run.seed=3")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="hyperofa",
        description="HyperOFA: expand a multilingual model's vocabulary and continue pretraining, distributed.",
    )
    parser.add_argument("--version", action="version", version=f"hyperofa-dist {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, target in COMMANDS.items():
        command = sub.add_parser(name, help=target[2], description=target[2])
        if name in ACTIONS:
            command.add_argument("action", choices=ACTIONS[name], help="what to do")
        _add_config_args(command)
        for flag, key, _, text in COMMAND_FLAGS.get(name, ()):
            command.add_argument(flag, help=f"{text} (same as {key}=...)")
        if name in LAUNCH_SECTIONS:
            command.add_argument("--hostfile", help="DeepSpeed hostfile (`host slots=N` lines) for a multi-node job")
            command.add_argument("--num_nodes", type=int, help="use this many nodes of the hostfile")
            command.add_argument("--launcher", help="multi-node launcher: pdsh, openmpi, mvapich, slurm, mpich, impi")
    bench = sub.add_parser("bench", help="benchmarks that print one JSON line", description="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench", metavar="<bench>")
    for name, target in BENCHES.items():
        p = bench_sub.add_parser(name, help=target[2], description=target[2])
        _add_config_args(p)
        p.add_argument("--corpus", help="use this corpus directory instead of a generated one")
        p.add_argument("--workdir", help="keep the benchmark's files here (default: a temporary directory)")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    # key=value overrides may sit on both sides of a command's flags; argparse stops a positional list at the first
    # flag, so the overrides after it come back as unknown arguments and join the list here, in order.
    args, rest = parser.parse_known_args(argv)
    stray = [a for a in rest if a.startswith("-") or "=" not in a]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if rest:
        args.overrides = [*getattr(args, "overrides", []), *rest]
    if args.command is None:
        parser.print_help()
        return 0
    try:
        from .config import load_config

        overrides = list(args.overrides)
        section = LAUNCH_SECTIONS.get(args.command)
        for flag in ("hostfile", "num_nodes", "launcher") if section else ():
            if getattr(args, flag, None) is not None:
                overrides.append(f"{section}.{flag}={getattr(args, flag)}")
        overrides += _flag_overrides(args.command, args)
        config_file = args.config
        if config_file is None and args.command == "demo":
            from .pipeline import DEMO_CONFIG

            config_file = DEMO_CONFIG
        config = load_config(config_file, overrides)
        if args.command == "bench":
            if args.bench is None:
                parser.parse_args(["bench", "--help"])
            return int(_load(BENCHES[args.bench])(config, args) or 0)
        from .tracking import make_tracker

        tracker = make_tracker(config)
        with tracker.session(args.command, config):
            extra = {"action": args.action} if args.command in ACTIONS else {}
            return int(_load(COMMANDS[args.command])(config, tracker, **extra) or 0)
    except HyperofaError as exc:
        print(f"hyperofa {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hyperofa {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
