"""`hyperofa <command> [--config FILE] [key=value ...]`: the one entry point of every stage.

Each command resolves its config (YAML + overrides, validated before any work), opens the MLflow parent run of
this invocation, and calls the stage function with the config and the tracker. A `HyperofaError` becomes one
line on stderr and exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from .errors import HyperofaError
from .registry import BENCHES, COMMANDS, Command, bench, command


def _flag_overrides(entry: Command, args: argparse.Namespace) -> list[str]:
    """`--flag value` -> `key=<JSON>` overrides (JSON is YAML, so paths with ':' or '#' survive as strings)."""
    import json

    out = []
    for flag in entry.flags:
        value = getattr(args, flag.flag.lstrip("-").replace("-", "_"), None)
        if value is not None:
            parsed = [v.strip() for v in value.split(",") if v.strip()] if flag.is_list else value
            out.append(f"{flag.key}={json.dumps(parsed)}")
    return out


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="YAML config file (keys: docs/CONFIG.md)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. run.seed=3")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="hyperofa",
        description="HyperOFA: expand a multilingual model's vocabulary and continue pretraining, distributed.",
    )
    parser.add_argument("--version", action="version", version=f"hyperofa-dist {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for entry in COMMANDS:
        parser_ = sub.add_parser(entry.name, help=entry.help, description=entry.help)
        if entry.actions:
            parser_.add_argument("action", choices=entry.actions, help="what to do")
        _add_config_args(parser_)
        for flag in entry.flags:
            parser_.add_argument(flag.flag, help=f"{flag.help} (same as {flag.key}=...)")
        if entry.plan_target:
            parser_.add_argument("--dry-run", action="store_true",
                                 help="check every input and print the plan (stages, resources, disk); run and write nothing")
        if entry.launch_section:
            parser_.add_argument("--hostfile", help="DeepSpeed hostfile (`host slots=N` lines) for a multi-node job")
            parser_.add_argument("--num_nodes", type=int, help="use this many nodes of the hostfile")
            parser_.add_argument("--launcher", help="multi-node launcher: pdsh, openmpi, mvapich, slurm, mpich, impi, nossh")
    docs = sub.add_parser("docs", help="generated documentation: `docs config` writes docs/CONFIG.md from the schema",
                          description="generated documentation")
    docs.add_argument("action", choices=("config",), help="what to generate")
    docs.add_argument("--check", action="store_true", help="compare the file with the schema instead; exit 2 if stale")
    docs.add_argument("--output", default=None, help="the file (default: docs/CONFIG.md of the source tree)")
    benches = sub.add_parser("bench", help="benchmarks that print one JSON line", description="benchmarks")
    bench_sub = benches.add_subparsers(dest="bench", metavar="<bench>")
    for entry in BENCHES:
        p = bench_sub.add_parser(entry.name, help=entry.help, description=entry.help)
        _add_config_args(p)
        p.add_argument("--corpus", help="use this corpus directory instead of a generated one")
        p.add_argument("--workdir", help="keep the benchmark's files here (default: a temporary directory)")
        if entry.dry_run:
            p.add_argument("--dry-run", action="store_true", help="toy shape: checks the bench end to end, in seconds")
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
    if args.command == "docs":  # no config, no run directory, no MLflow
        from pathlib import Path

        from .configdoc import CONFIG_DOC, write_or_check
        from .errors import exit_status

        return exit_status("hyperofa docs", lambda: write_or_check(Path(args.output or CONFIG_DOC), args.check))
    from .runtime.process import raise_on_termination

    raise_on_termination()  # SIGTERM unwinds like Ctrl-C: MLflow runs end, locks and shared memory are released
    try:
        from .config import load_config

        overrides = list(args.overrides)
        entry: Optional[Command] = command(args.command) if args.command != "bench" else None
        section = entry.launch_section if entry else None
        for flag in ("hostfile", "num_nodes", "launcher") if section else ():
            if getattr(args, flag, None) is not None:
                overrides.append(f"{section}.{flag}={getattr(args, flag)}")
        overrides += _flag_overrides(entry, args) if entry else []
        config_file = args.config
        if config_file is None:
            from .config import DEFAULT_CONFIGS

            config_file = DEFAULT_CONFIGS.get(args.command)
        config = load_config(config_file, overrides)
        if args.command == "bench":
            if args.bench is None:
                parser.parse_args(["bench", "--help"])
            return int(bench(args.bench).load()(config, args) or 0)
        if getattr(args, "dry_run", False):  # before the run directory or an MLflow store is touched
            from .registry import resolve

            return int(resolve(entry.plan_target)(config) or 0)
        from .runtime.preflight import run_dir
        from .tracking import make_tracker

        run_dir(config, args.command)  # before MLflow touches a store there
        tracker = make_tracker(config)
        with tracker.session(args.command, config):
            return int(entry.load()(config, tracker) or 0)
    except HyperofaError as exc:
        print(f"hyperofa {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"hyperofa {args.command}: interrupted ({exc or 'SIGINT'})", file=sys.stderr)
        return 128 + getattr(exc, "signum", 2)


if __name__ == "__main__":
    sys.exit(main())
