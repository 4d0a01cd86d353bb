"""A DeepSpeed job's directory (the hypernet and pretrain stages): what the stage shell hands the ranks, and the
checkpoints they leave.

    job.json                      the effective config, resolved paths, the filled DeepSpeed config, the id of
                                  the stage's MLflow run (`run_id`, which rank 0 logs into): everything a rank
                                  needs (also for a launch by hand)
    ds_config.json                the filled DeepSpeed config alone, for the reader
    checkpoints/latest            the tag of the newest complete checkpoint (DeepSpeed writes it last)
    checkpoints/<tag>/            DeepSpeed's files, plus
        hyperofa.json             our client state (step or epoch, world size, seed)
        rng_rank<r>.pt            each rank's RNG states (hypernet), so a resumed run repeats the uninterrupted one
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ..errors import HyperofaError
from .files import atomic_write_json, read_json

JOB = "job.json"
DS_CONFIG = "ds_config.json"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
CLIENT_INFO = "hyperofa.json"
RUN_ID = "run_id"  # the job-file key of the MLflow run rank 0 logs into


def write_job(out: Path, job: dict[str, Any]) -> Path:
    """job.json and, beside it, ds_config.json (when the job carries one)."""
    if "ds_config" in job:
        atomic_write_json(out / DS_CONFIG, job["ds_config"])
    return atomic_write_json(out / JOB, job)


def read_job(path: str | Path) -> dict[str, Any]:
    return read_json(path, "job file")


def previous_run_id(out: Path) -> Optional[str]:
    """The MLflow run of the job this directory last ran (what a resumed job continues), or None."""
    path = out / JOB
    if not path.is_file():
        return None
    try:
        return read_job(path).get(RUN_ID) or None
    except HyperofaError:  # a damaged job file only means: start a fresh run
        return None


def checkpoint_dir(out: Path) -> Path:
    return out / CHECKPOINTS


def latest_tag(ckpt_dir: Path) -> Optional[str]:
    latest = ckpt_dir / LATEST
    return latest.read_text(encoding="utf-8").strip() if latest.is_file() else None


def has_checkpoint(out: Path) -> bool:
    return (checkpoint_dir(out) / LATEST).is_file()


def write_client_info(ckpt_dir: Path, tag: str, info: dict[str, Any]) -> Path:
    return atomic_write_json(ckpt_dir / tag / CLIENT_INFO, info)


def read_client_info(ckpt_dir: Path, tag: str) -> Optional[dict[str, Any]]:
    path = ckpt_dir / tag / CLIENT_INFO
    return read_json(path, "checkpoint info") if path.is_file() else None


def rng_path(ckpt_dir: Path, tag: str, rank: int) -> Path:
    return ckpt_dir / tag / f"rng_rank{rank}.pt"


def require_rng(ckpt_dir: Path, tag: str, rank: int) -> Path:
    path = rng_path(ckpt_dir, tag, rank)
    if not path.is_file():
        raise HyperofaError(f"{path}: RNG state of rank {rank} missing from the checkpoint")
    return path
