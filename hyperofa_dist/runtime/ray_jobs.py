"""The Ray stages (prepare, mapping) as `ray job submit` jobs on a running cluster (launch/prepare_ray_submit.sh).

A Ray job runs its entrypoint on the head node inside a temporary copy of the uploaded working directory, so
everything the job reads or writes by a relative path would land in that copy and vanish with it. The submission
is therefore planned on the driver: `run.dir` and every input path that exists here become absolute (they must be
on storage every node sees at the same path), the run directory must be writable here, the inputs the Ray stages
read must exist (the target tokenizer, the word vectors: `hyperofa tokenizer` and `hyperofa vectors train` are not
Ray stages and run first, on the driver), and the upload leaves out data and run folders (models, vectors, runs,
virtual environments), which would otherwise exceed Ray's upload limit. Only prepare and mapping are submitted.

    python -m hyperofa_dist.runtime.ray_jobs CONFIG DASHBOARD [key=value ...] [--print]
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from ..errors import HyperofaError

RAY_STAGES = ("prepare", "mapping")  # tokenizer and vectors run without Ray, on the driver
# Folders of data and results a checkout gathers (gitignore patterns, relative to the working dir): never code.
UPLOAD_EXCLUDES = (".git/", ".venv/", "venv/", "runs/", "models/", "vectors/", "data/", "mlruns/", "mlartifacts/",
                   "*.db", "build/", "dist/", "*.egg-info/", "__pycache__/", ".pytest_cache/")
# Input paths the Ray stages read; a relative one that exists here is made absolute for the job.
PATH_KEYS = ("source.model", "source.tokenizer", "corpus.path", "tokenizer.path", "vectors.path")


@dataclass(frozen=True)
class Submission:
    stage: str
    command: list[str]  # the `ray job submit` invocation


def _get(config: Any, key: str) -> Any:
    node = config
    for part in key.split("."):
        node = getattr(node, part)
    return node


def absolute_overrides(config: Any, cwd: Path) -> list[str]:
    """`run.dir=<absolute>` and every relative input path that exists here, made absolute."""
    out = [f"run.dir={json.dumps(str((cwd / config.run.dir).resolve()))}"]  # an absolute run.dir stays itself
    for key in PATH_KEYS:
        value = _get(config, key)
        if value and not Path(value).is_absolute() and (cwd / value).exists():
            out.append(f"{key}={json.dumps(str((cwd / value).resolve()))}")
    return out


def check_inputs(config: Any) -> None:
    """What the Ray stages read exists before anything is submitted; the run directory is writable from here."""
    from ..formats.tokenizer import target_tokenizer_dir
    from ..formats.vectors import resolve_vectors_path
    from ..formats.files import writable

    writable(config.run_dir, "run.dir")
    target_tokenizer_dir(config)  # tokenizer.path, or <run.dir>/tokenizer from `hyperofa tokenizer`
    resolve_vectors_path(config)  # vectors.path, or <run.dir>/vectors from `hyperofa vectors train`


def ray_cli() -> str:
    """The `ray` of this Python's environment (the one whose Ray version the cluster must match), else PATH's."""
    here = Path(sys.executable).with_name("ray")
    return str(here) if here.is_file() else "ray"


def plan_submissions(config_file: Path, overrides: Sequence[str], dashboard: str, working_dir: Path,
                     cwd: Optional[Path] = None) -> tuple[Any, list[Submission]]:
    """(the config as the jobs will see it, one `ray job submit` per Ray stage in order)."""
    from ..config import load_config

    cwd = (cwd or Path.cwd()).resolve()
    working_dir = working_dir.resolve()
    config = load_config(config_file, list(overrides))
    absolute = absolute_overrides(config, cwd)
    rewritten = {item.split("=", 1)[0] for item in absolute}
    fixed = [item for item in overrides if item.split("=", 1)[0].strip() not in rewritten]
    if not config.ray.address:
        fixed.append("ray.address=auto")  # the job joins the cluster it runs on
    fixed += absolute
    config_file = Path(config_file).resolve()
    if config_file.is_relative_to(working_dir):  # uploaded with the code: the job reads its copy
        shown = config_file.relative_to(working_dir).as_posix()
    else:
        shown = str(config_file)  # must then be on storage the head node sees at the same path
    # No env_vars here: the stage's own ray.init gives the workers theirs (runtime/ray.py), and Ray refuses to merge a
    # job's runtime env with the driver's when both set them.
    runtime_env = {"working_dir": str(working_dir), "excludes": list(UPLOAD_EXCLUDES)}
    jobs = [
        Submission(stage, [ray_cli(), "job", "submit", "--address", dashboard, "--runtime-env-json",
                           json.dumps(runtime_env), "--", "python", "-m", "hyperofa_dist.cli", stage, "--config",
                           shown, *fixed])
        for stage in RAY_STAGES
    ]
    return load_config(config_file, fixed), jobs


def main(argv: Optional[list[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    dry = "--print" in args
    args = [a for a in args if a != "--print"]
    if len(args) < 2 or "=" in args[0] or "=" in args[1]:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    config_file, dashboard, overrides = Path(args[0]), args[1], args[2:]
    try:
        working_dir = Path(os.environ.get("HYPEROFA_WORKING_DIR", Path.cwd()))
        config, submissions = plan_submissions(config_file, overrides, dashboard, working_dir)
        check_inputs(config)
    except HyperofaError as exc:
        print(f"ray job submit: error: {exc}", file=sys.stderr)
        return 2
    print(f"run.dir {config.run_dir}: it must be on storage every Ray node sees at this path", file=sys.stderr)
    for job in submissions:
        print(shlex.join(job.command), file=sys.stdout if dry else sys.stderr, flush=True)
        if dry:
            continue
        code = subprocess.run(job.command).returncode
        if code:
            print(f"ray job submit: the {job.stage} job failed (exit {code}); later stages were not submitted",
                  file=sys.stderr)
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
