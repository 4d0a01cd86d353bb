"""A DeepSpeed job's directory (the hypernet and pretrain stages): what the stage shell hands the ranks, and the
checkpoints they leave.

    job.json                      the effective config, resolved paths, the filled DeepSpeed config, the id of
                                  the stage's MLflow run (`run_id`, which rank 0 logs into), the checkpoint to
                                  resume from: everything a rank needs (also for a launch by hand); one typed
                                  spec per job (`HypernetJobSpec`, `PretrainJobSpec`), checked key by key when
                                  read
    ds_config.json                the filled DeepSpeed config alone, for the reader
    checkpoints/latest            the tag of the newest complete checkpoint (DeepSpeed writes it last)
    checkpoints/<tag>/            DeepSpeed's files, plus
        hyperofa.sha256.json      {file: sha256} of every file of the tag, written once all ranks have saved and
                                  before `latest` names the tag; a resume checks it before anything is unpickled
        hyperofa.json             our client state (step or epoch, world size, seed) and its provenance: the
                                  fingerprint of every result-changing key it was trained with, and the changes
                                  a resume was allowed to make (runtime/job.py); written before DeepSpeed writes
                                  `latest`, so every tag `latest` names has one
        rng_rank<r>.npz           each rank's RNG states (hypernet) as plain arrays, no pickle, so a resumed run
                                  repeats the uninterrupted one
    logs/rank<r>.log              each rank's output (stdout and stderr), appended per launch (runtime/rank.py)
    logs/rank<r>.exit.json        how the rank's process ended in the last launch: exit status or signal, time
    failure.json                  why the job stopped itself (a non-finite loss), for the stage's one-line error
"""

from __future__ import annotations

import dataclasses
import json
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, TypeVar, Union

import numpy as np

from ..errors import HyperofaError
from .files import atomic_write_bytes, atomic_write_json, load_npz, read_json, save_npz, sha256_file

JOB = "job.json"
DS_CONFIG = "ds_config.json"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
CLIENT_INFO = "hyperofa.json"
CHECKPOINT_HASHES = "hyperofa.sha256.json"
RUN_ID = "run_id"  # the job-file key of the MLflow run rank 0 logs into
LOGS = "logs"
PROVENANCE = "provenance"
FAILURE = "failure.json"


# --- job.json: the stage's hand-off to the ranks ----------------------------------------------------------------


@dataclass(frozen=True)
class HypernetJobSpec:
    """What `hyperofa hypernet` hands every rank of its job."""

    config: dict[str, Any]  # the effective config (Config.effective())
    out_dir: str
    ds_config: dict[str, Any]
    run_id: Optional[str]  # the stage's MLflow run, which rank 0 logs into
    provenance: Optional[dict[str, Any]]  # recorded in every checkpoint (runtime/job.py)
    resume: bool = False
    resume_tag: Optional[str] = None  # the checkpoint the stage checked and the ranks load (runtime/checkpoint.py)


@dataclass(frozen=True)
class PretrainJobSpec:
    """What `hyperofa pretrain` hands every rank of its job."""

    config: dict[str, Any]
    out_dir: str
    model_dir: str
    block_size: int
    train_shards: dict[str, list[str]]  # language -> shard paths
    heldout_shards: dict[str, list[str]]
    train_blocks: dict[str, int]  # language -> blocks in its training shards
    ds_config: dict[str, Any]
    precision: str
    resume: bool
    resume_tag: Optional[str]
    trainable_rows: Optional[str]  # the embedding warm-up's rows (formats/pretrain.py)
    factors_dir: Optional[str]  # F_t.npy and P.npy for factorised training
    objective: str  # "masked" or "causal"
    frame: Optional[dict[str, Optional[int]]]  # a causal job's block framing ids: start, sep, pad
    provenance: Optional[dict[str, Any]]
    run_id: Optional[str]


JobSpec = Union[HypernetJobSpec, PretrainJobSpec]
Spec = TypeVar("Spec", HypernetJobSpec, PretrainJobSpec)


def write_job(out: Path, spec: JobSpec) -> Path:
    """job.json and, beside it, ds_config.json (the filled DeepSpeed config alone, for the reader)."""
    atomic_write_json(out / DS_CONFIG, spec.ds_config)
    return atomic_write_json(out / JOB, dataclasses.asdict(spec))


def read_job(path: str | Path, kind: type[Spec]) -> Spec:
    """The job file as `kind`; a missing, unknown or mistyped key is one line naming the file and the key."""
    data = read_json(path, "job file")
    if not isinstance(data, dict):
        raise HyperofaError(f"{path}: job file is not a JSON object")
    hints = typing.get_type_hints(kind)
    fields = {f.name: f for f in dataclasses.fields(kind)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise HyperofaError(f"{path}: unknown key '{unknown[0]}' in a {kind.__name__} job file (written by another version?)")
    values = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING:
                raise HyperofaError(f"{path}: key '{name}' missing from the job file")
            continue
        if not _has_type(data[name], hints[name]):
            raise HyperofaError(f"{path}: key '{name}' must be {_describe(hints[name])}, not {data[name]!r:.60}")
        values[name] = data[name]
    return kind(**values)


def _has_type(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a field's annotation (the few shapes job specs use)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin is Union:
        return any(_has_type(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) and _has_type(v, args[1]) for k, v in value.items())
    if origin is list:
        return isinstance(value, list) and all(_has_type(v, args[0]) for v in value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def previous_run_id(out: Path) -> Optional[str]:
    """The MLflow run of the job this directory last ran (what a resumed job continues), or None."""
    path = out / JOB
    if not path.is_file():
        return None
    try:
        found = read_json(path, "job file")
        return (found.get(RUN_ID) if isinstance(found, dict) else None) or None
    except HyperofaError:  # a damaged job file only means: start a fresh run
        return None


def write_failure(out: Path, reason: str, message: str) -> Path:
    return atomic_write_json(out / FAILURE, {"reason": reason, "message": message})


def read_failure(out: Path) -> Optional[str]:
    path = out / FAILURE
    return read_json(path, "failure report")["message"] if path.is_file() else None


def checkpoint_dir(out: Path) -> Path:
    return out / CHECKPOINTS


def latest_tag(ckpt_dir: Path) -> Optional[str]:
    latest = ckpt_dir / LATEST
    return latest.read_text(encoding="utf-8").strip() if latest.is_file() else None


def write_latest(ckpt_dir: Path, tag: str) -> Path:
    """Point `latest` at `tag`, atomically; rank 0 calls it once every rank has written its part of the tag.
    DeepSpeed's own `save_latest` writes the file as soon as rank 0's part is saved, so a rank dying mid-save (a
    lost node) would leave `latest` naming a checkpoint that cannot be loaded."""
    return atomic_write_bytes(ckpt_dir / LATEST, tag.encode("utf-8"))


def has_checkpoint(out: Path) -> bool:
    return (checkpoint_dir(out) / LATEST).is_file()


def write_client_info(ckpt_dir: Path, tag: str, info: dict[str, Any]) -> Path:
    return atomic_write_json(ckpt_dir / tag / CLIENT_INFO, info)


def read_client_info(ckpt_dir: Path, tag: str) -> Optional[dict[str, Any]]:
    path = ckpt_dir / tag / CLIENT_INFO
    return read_json(path, "checkpoint info") if path.is_file() else None


def rng_path(ckpt_dir: Path, tag: str, rank: int) -> Path:
    return ckpt_dir / tag / f"rng_rank{rank}.npz"


def write_rng(ckpt_dir: Path, tag: str, rank: int, state: dict[str, np.ndarray]) -> Path:
    """A rank's RNG states as named arrays (written without pickles: a resume must not run code from a file)."""
    return save_npz(rng_path(ckpt_dir, tag, rank), **state)


def read_rng(ckpt_dir: Path, tag: str, rank: int, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    path = rng_path(ckpt_dir, tag, rank)
    if not path.is_file():
        raise HyperofaError(f"{path}: RNG state of rank {rank} missing from the checkpoint")
    return load_npz(path, names, what=f"RNG state of rank {rank}")


def _checkpoint_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.name != CHECKPOINT_HASHES and (p.is_file() or p.is_symlink()))


def write_checkpoint_hashes(ckpt_dir: Path, tag: str) -> Path:
    """Rank 0, once every rank has written its part of `tag`: the sha256 of each of its files."""
    root = ckpt_dir / tag
    return atomic_write_json(root / CHECKPOINT_HASHES,
                             {p.relative_to(root).as_posix(): sha256_file(p) for p in _checkpoint_files(root)})


def verify_checkpoint(ckpt_dir: Path, tag: str) -> None:
    """Before a resume reads checkpoint `tag`: every file is the one written at save time (its sha256 as
    recorded), none is missing, none was added, none is a link. DeepSpeed's files are pickles, which run code
    when loaded, so a checkpoint that does not match is refused in one line before anything of it is read."""
    root = ckpt_dir / tag
    record = root / CHECKPOINT_HASHES
    if not record.is_file():
        raise HyperofaError(
            f"{root}: resume refused: the checkpoint has no {CHECKPOINT_HASHES} (not written by this version of "
            "hyperofa), so its pickled files cannot be checked before they are loaded; remove the checkpoints "
            "directory to start over"
        )
    listed = read_json(record, "checkpoint file list")
    if not isinstance(listed, dict) or not all(isinstance(v, str) for v in listed.values()):
        raise HyperofaError(f"{record}: not a {{file: sha256}} list")
    present = {p.relative_to(root).as_posix(): p for p in _checkpoint_files(root)}
    for name, path in present.items():
        if path.is_symlink() or name not in listed:
            what = "a symbolic link" if path.is_symlink() else "not one of the files written with the checkpoint"
            raise HyperofaError(f"{path}: resume refused: {what} (nothing of the checkpoint was loaded)")
    for name, expected in sorted(listed.items()):
        path = root / name
        if name not in present:
            raise HyperofaError(f"{path}: resume refused: missing from the checkpoint")
        if sha256_file(path) != expected:
            raise HyperofaError(
                f"{path}: resume refused: differs from the sha256 recorded when the checkpoint was saved (nothing "
                "of the checkpoint was loaded)"
            )


def read_provenance(ckpt_dir: Path, tag: str) -> Optional[dict[str, Any]]:
    """{'fingerprint': {key: value}, 'changes': [...]} recorded with checkpoint `tag`, None if it records none."""
    info = read_client_info(ckpt_dir, tag)
    provenance = (info or {}).get(PROVENANCE)
    return provenance if isinstance(provenance, dict) and isinstance(provenance.get("fingerprint"), dict) else None


# --- the ranks' logs and exit records (written by runtime/rank.py, read by runtime/launch.py) -----------------


def logs_dir(out: Path) -> Path:
    return Path(out) / LOGS


def rank_log(out: Path, rank: int) -> Path:
    return logs_dir(out) / f"rank{rank}.log"


def exit_record_path(out: Path, rank: int) -> Path:
    return logs_dir(out) / f"rank{rank}.exit.json"


def write_exit_record(out: Path, rank: int, record: dict[str, Any]) -> Path:
    return atomic_write_json(exit_record_path(out, rank), {"rank": rank, "time": time.time(), **record})


def clear_exit_records(out: Path) -> None:
    """Before a launch: the records of an earlier one must not be read as this one's."""
    directory = logs_dir(out)
    if directory.is_dir():
        for path in directory.glob("rank*.exit.json"):
            path.unlink(missing_ok=True)


def read_exit_records(out: Path) -> list[dict[str, Any]]:
    records = []
    directory = logs_dir(out)
    for path in sorted(directory.glob("rank*.exit.json")) if directory.is_dir() else []:
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and isinstance(record.get("rank"), int):
            records.append(record)
    return records


def checkpoint_bytes(parameters: int, world: int) -> int:
    """One DeepSpeed checkpoint: fp32 master weights and two Adam moments (12 B per parameter) over all ranks,
    the module's weights (at most 4 B), and a little per rank for RNG states and metadata."""
    return parameters * 16 + world * (64 << 10)
