"""Measurements that each need a fresh process (so that a peak memory reading is that run's own): the parent
writes the effective config once and starts `python -m <module> --<option> <value> --config <file>` per run; the
child's `main` loads that config, measures with stdout sent to stderr, and prints its result as the last line."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from typing import Any, Callable, Optional

from ..config import Config
from ..errors import HyperofaError


def in_fresh_processes(config: Config, module: str, option: str, runs: dict[str, str], bench: str) -> dict[str, Any]:
    """`{name: result}`: each run of `runs` (`name -> the value of --option`) measured in its own process."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        spec = os.path.join(tmp, "config.json")
        with open(spec, "w", encoding="utf-8") as handle:
            json.dump(config.effective(), handle)
        for name, value in runs.items():
            done = subprocess.run([sys.executable, "-m", module, f"--{option}", value, "--config", spec],
                                  stdout=subprocess.PIPE, text=True)
            if done.returncode != 0 or not done.stdout.strip():
                raise HyperofaError(f"bench {bench}: the {name} run failed (exit {done.returncode}; see stderr)")
            results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


def child_main(argv: Optional[list[str]], option: str, measure_one: Callable[[Config, Any], dict[str, Any]],
               **option_spec: Any) -> int:
    """The child's entry point: parse `--option` (as `option_spec` says) and `--config`, print one JSON line."""
    parser = argparse.ArgumentParser()
    parser.add_argument(f"--{option}", required=True, **option_spec)
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    with open(args.config, encoding="utf-8") as handle:
        config = Config.model_validate(json.load(handle))
    with contextlib.redirect_stdout(sys.stderr):
        result = measure_one(config, getattr(args, option))
    print(json.dumps(result), flush=True)
    return 0
