"""Preflight: what a stage checks before it launches a process or starts expensive work, and where each check lives.

Each check sits beside the format it checks, reads only what it must (headers, indexes, line counts, a sample of
the corpus) and fails with one `HyperofaError` line naming the file and the key to change. The stage functions
call them while resolving their inputs, before `StageShell.open`, so a refused run opens no MLflow run and
writes nothing; `pipeline --dry-run` (dryrun.py) calls the same checks for every stage at once:

| check                              | what it refuses                                           | called by          |
|------------------------------------|-----------------------------------------------------------|--------------------|
| `run_dir` (here)                   | a run directory, compare output or local MLflow store     | cli, every command |
|                                    | that cannot be written (`files.writable`)                 |                    |
| `formats.models.check_model`       | a model directory without weights or tokenizer, truncated | pretrain, evaluate |
|                                    | weights, a tokenizer of another size than the embedding,  |                    |
|                                    | special ids out of range                                  |                    |
| `formats.models.source_vocabulary` | a source tokenizer that does not fit the source model     | tokenizer          |
| `formats.shards.check_shards`      | a shard whose size differs from the prepare manifest,     | pretrain, evaluate |
|                                    | whose tar or .npy headers do not parse, whose blocks      |                    |
|                                    | differ; with `run.verify_inputs`, any differing byte      |                    |
| `formats.files.free_space`         | less free space than the stage's estimated output         | prepare, pretrain  |
|                                    | (`shards.prepare_bytes`, `pretrain.pretrain_bytes`)       |                    |
| `formats.text.parallel_corpus`     | parallel files with different line counts                 | vectors train      |
| `formats.corpus.checked_samples`   | a language whose sample is mostly invalid UTF-8 or not    | tokenizer, prepare |
|                                    | letters                                                   |                    |

The tracking URI's scheme is checked when the config is read (`config.check_tracking_uri`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..formats.files import writable
from ..tracking.names import tracking_store_dir


def run_dir(config: Any, command: str) -> None:
    """Every directory the command will write is writable: the run directory (stages, pipeline, demo), compare's
    output, and a local MLflow store (sqlite file or file store), which MLflow would otherwise retry for minutes
    before failing with a database traceback."""
    from ..registry import COMMANDS

    writers = {entry.name for entry in COMMANDS if entry.is_stage} | {"pipeline", "demo"}
    targets: list[tuple[Path, str]] = []
    if command in writers:
        targets.append((config.run_dir, "run.dir"))
    if command == "compare":
        out = config.compare.output_dir
        targets.append((Path(out).resolve(), "compare.output_dir") if out else (config.run_dir, "run.dir"))
    store = tracking_store_dir(config)
    if store is not None:
        targets.append((store, "tracking.tracking_uri" if config.tracking.tracking_uri else "run.dir"))
    for path, key in targets:
        writable(path, key)
