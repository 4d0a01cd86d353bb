"""The pretrain stage's output, `<run.dir>/pretrain/<method>/`: the trained model and the job's logs.

    model/              stock HF masked LM + tokenizer, exported from the last checkpoint (what evaluate reads)
    F_t.npy, P.npy      after factorised training: the trained coordinates [V, k] (V the model's rows, padding
                        included) and primitives [k, D], model/'s embeddings being their product (formats/init.py)
    parameters.json     parameter counts of the model as trained: total and word embeddings (V k + k D or V D)
    train_log.jsonl     one line per optimizer step: loss, lr, grad norm, tokens seen (rank 0)
    eval_log.jsonl      one line per evaluation: held-out MLM loss per language
    probe.pt            a fixed held-out batch and the engine's loss on it: the exported model must reproduce it
    failure.json        why the job stopped itself (non-finite loss), for the stage shell's one-line error
    trainable_rows.pt   rows that train during the embedding warm-up (from the init stage's provenance)
    ranks/rank<r>.json  each rank's step and micro-step counts
    audit/rank<r>.jsonl with pretrain.data_audit: the blocks each rank trained on
    (job.json and checkpoints/ are the DeepSpeed job directory: formats/jobdir.py)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Optional

from .files import atomic_write_bytes, atomic_write_json, read_json, write_error
from .init import FACTORS  # noqa: F401 - a factorised pretrain output holds the same two files
from .jobdir import checkpoint_bytes
from .jobdir import FAILURE, read_failure, write_failure  # noqa: F401 - a job's own stop, shared with the hypernet
from .rundir import PerMethod

STAGE = "pretrain"
MODEL = "model"
TRAIN_LOG = "train_log.jsonl"
EVAL_LOG = "eval_log.jsonl"
PROBE = "probe.pt"
TRAINABLE_ROWS = "trainable_rows.pt"
RANKS = "ranks"
AUDIT = "audit"
PARAMETERS = "parameters.json"
JOB_OUTPUTS = (TRAIN_LOG, EVAL_LOG, PROBE, FAILURE, PARAMETERS)  # one run's files, removed before a fresh one


LAYOUT = PerMethod(STAGE, MODEL)  # `<run.dir>/pretrain/<method>/`, the model in `model/`
stage_of, model_dir, method_of = LAYOUT.stage_of, LAYOUT.model_dir, LAYOUT.method_of


def append_line(path: Path, record: dict[str, Any]) -> None:
    try:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
    except OSError as exc:  # a full disk: one line naming the log, not a traceback
        raise write_error(path, exc) from None


def read_lines(path: Path) -> Iterator[dict[str, Any]]:
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                yield json.loads(line)


def last_line(path: Path) -> Optional[dict[str, Any]]:
    found = None
    for found in read_lines(path):
        pass
    return found


def truncate_log(path: Path, last_step: int) -> None:
    """Keep the lines of steps up to `last_step` (the step a resumed run starts after): a killed run's lines
    past its last checkpoint are trained again and logged again."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= last_step]
    if len(kept) != len(lines):
        atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode("utf-8"))


def write_parameter_counts(out: Path, counts: dict[str, int]) -> Path:
    return atomic_write_json(out / PARAMETERS, counts)


def read_parameter_counts(out: Path) -> dict[str, int]:
    path = out / PARAMETERS
    return read_json(path, "parameter counts") if path.is_file() else {}


def write_rank_summary(out: Path, rank: int, summary: dict[str, Any]) -> Path:
    return atomic_write_json(out / RANKS / f"rank{rank}.json", summary)


def audit_path(out: Path, rank: int) -> Path:
    return out / AUDIT / f"rank{rank}.jsonl"


def pretrain_bytes(parameters: int, config: Any, world: int, done_tags: int = 0) -> int:
    """Estimated bytes pretraining writes: the checkpoints still to come that lie on disk at once (every one, or
    `pretrain.keep_checkpoints` + 1) and the exported model."""
    from ..runtime.checkpoint import checkpoints_to_write

    p = config.pretrain
    saves = len({*range(p.save_every, p.steps + 1, p.save_every), p.steps})
    return (checkpoints_to_write(saves - done_tags, done_tags, p.keep_checkpoints) * checkpoint_bytes(parameters, world)
            + parameters * 4)
