"""The skeleton both DeepSpeed jobs (hypernet, pretrain) share: one rank's identity, device, process group,
threads, collectives, non-finite guard and MLflow tracker, and the `main` that parses the launcher's arguments.

A job module is launched on every rank by the `deepspeed` launcher (runtime/launch.py) as

    python -m <job module> --local_rank=<r> --job <stage dir>/job.json

and does: `ctx = JobContext(read_job(path, <its spec type>))`, `ctx.init_distributed(threads)`, build its model and
engine, run its loop (checkpoints: runtime/checkpoint.py), and exit 0 (or `NAN_EXIT` when the guard stopped it). Only global rank 0 logs to MLflow, into the run its
stage shell opened (`ctx.tracked()`): the run id travels in the job file, because pdsh/ssh launchers forward only
MLFLOW*/PYTHON* variables to remote ranks.

A rank dies with its parent (the supervisor, runtime/rank.py): parent-death signal SIGKILL. SIGTERM/SIGINT raise
`Interrupted`, so the rank's MLflow run is ended as it unwinds, and the rank exits 128 + signal.

Resume provenance (both jobs): every checkpoint records, in `hyperofa.json`, the fingerprint of the result-
changing settings it was trained with (`resume_fingerprint`: the config keys that are not execution-only, and
the identity of each input) and the changes earlier resumes were allowed to make. `check_resume` compares a
checkpoint's fingerprint with this run's before anything is launched: a difference is refused with one line
naming each changed key (old -> new), unless `<section>.allow_config_change=true`, which records the change at
the checkpoint's step in the job (and so in every later checkpoint), the manifest and MLflow.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np

from ..config import Config, build_config, flatten
from ..errors import HyperofaError
from ..formats.files import digest
from ..formats.jobdir import PROVENANCE, JobSpec, read_client_info, read_job, verify_checkpoint
from ..formats.rundir import portable
from ..tracking import make_tracker
from .process import Interrupted, raise_on_termination, set_parent_death_signal

NAN_EXIT = 3


class JobContext:
    """One rank's view of a DeepSpeed job."""

    def __init__(self, spec: JobSpec, command: str):
        import torch

        self.spec = spec
        self.command = command
        self.config: Config = build_config(spec.config)
        self.seed = self.config.run.seed
        self.out = Path(spec.out_dir)
        self.rank = int(os.environ.get("RANK", "0"))
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        on_gpu = torch.cuda.is_available()
        self.device = torch.device("cuda", self.local_rank) if on_gpu else torch.device("cpu")

    def init_distributed(self, threads: Optional[int] = None) -> None:
        """Threads (given, or the cores split among this node's ranks on CPU), device, and the process group."""
        import deepspeed
        import torch

        if threads:
            torch.set_num_threads(threads)
        elif self.device.type == "cpu":
            local = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", self.world)))
            # The cores this process may run on (a Slurm or container cpuset, taskset), not all of the machine's:
            # more threads than cores make every intra-op thread spin-wait for the others.
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            torch.set_num_threads(max(1, cores // max(local, 1)))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo")
        self.rank = torch.distributed.get_rank()
        self.world = torch.distributed.get_world_size()

    def tracker(self) -> Any:
        """MLflow on global rank 0, the no-op tracker elsewhere."""
        return make_tracker(self.config, rank=self.rank, connect=False)  # the store may be down: train on

    def tracked(self) -> Any:
        """Context: the stage's MLflow run (named in the job file) on rank 0, opened and closed by the stage shell;
        no new run is created here."""
        return self.tracker().attach(self.spec.run_id)

    def say(self, text: str) -> None:
        if self.rank == 0:
            print(f"hyperofa {self.command}: {text}", file=sys.stderr, flush=True)

    # --- collectives -----------------------------------------------------------------------------------------

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def all_sum(self, values: np.ndarray) -> np.ndarray:
        """Element-wise sum over ranks, in float64."""
        import torch
        import torch.distributed as dist

        tensor = torch.tensor(np.asarray(values), dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.cpu().numpy()


def job_main(
    argv: Optional[list[str]],
    command: str,
    spec_type: type,
    run: Callable[[Any, argparse.Namespace], int],
    add_arguments: Callable[[argparse.ArgumentParser], None] = lambda parser: None,
) -> int:
    """Parse the launcher's arguments, read the job file as `spec_type` (formats/jobdir.py), run; a HyperofaError
    is one line and exit 2."""
    parser = argparse.ArgumentParser(prog=f"hyperofa {command} job", description=f"hyperofa {command} (one rank)")
    parser.add_argument("--job", required=True, help=f"job.json written by `hyperofa {command}`")
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    set_parent_death_signal(signal.SIGKILL)
    raise_on_termination()
    try:
        return run(read_job(args.job, spec_type), args)
    except HyperofaError as exc:
        print(f"hyperofa {command}: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except Interrupted as exc:
        print(f"hyperofa {command}: rank {os.environ.get('RANK', '0')} stopped by {exc}", file=sys.stderr, flush=True)
        return exc.exit_code


# --- loading checkpoints without running code from them -------------------------------------------------------

# DeepSpeed's checkpoint files are pickles. Beside tensors and plain data they hold these few DeepSpeed objects (a
# loss scaler, the ZeRO stage enum, parameter fragment addresses); torch's weights-only unpickler admits exactly
# these and refuses anything else.
DEEPSPEED_CHECKPOINT_GLOBALS = (
    ("deepspeed.runtime.fp16.loss_scaler", ("LossScaler", "DynamicLossScaler")),
    ("deepspeed.runtime.zero.config", ("ZeroStageEnum",)),
    ("deepspeed.utils.tensor_fragment", ("fragment_address",)),
)
FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


def _deepspeed_globals() -> list[Any]:
    import importlib

    found = []
    for module, names in DEEPSPEED_CHECKPOINT_GLOBALS:
        try:
            loaded = importlib.import_module(module)
        except ImportError:  # another DeepSpeed layout: those objects cannot be in its checkpoints either
            continue
        found += [getattr(loaded, name) for name in names if hasattr(loaded, name)]
    return found


@contextlib.contextmanager
def weights_only_loads(where: Path) -> Iterator[None]:
    """Every `torch.load` inside (DeepSpeed's own, which pass `weights_only=False`, included) runs torch's
    weights-only unpickler (`TORCH_FORCE_WEIGHTS_ONLY_LOAD`), admitting tensors, plain data and the DeepSpeed
    objects above: a checkpoint file that names anything else is refused in one line and nothing of it runs."""
    import pickle

    import torch

    previous = os.environ.get(FORCE_WEIGHTS_ONLY)
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_globals()):
            yield
    except pickle.UnpicklingError as exc:
        detail = next((line.strip() for line in str(exc).splitlines() if "GLOBAL" in line or "Unsupported" in line),
                      str(exc).strip().splitlines()[0] if str(exc).strip() else "")
        raise HyperofaError(
            f"{where}: resume refused: a checkpoint file holds objects other than tensors and plain data, which "
            f"loading would run ({detail[:160]})"
        ) from None
    finally:
        if previous is None:
            os.environ.pop(FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[FORCE_WEIGHTS_ONLY] = previous


# --- resume provenance -----------------------------------------------------------------------------------------


def resume_fingerprint(config: Config, sections: tuple[str, ...], inputs: dict[str, Any]) -> dict[str, Any]:
    """{dotted key: value} of every result-changing key of `sections` (execution-only keys are left out by
    `Config.fingerprint`), plus `input.<name>` for each input's identity (a digest when it is not a plain value).
    Paths inside the run directory are written relative to it, so a moved run directory still matches."""
    flat = flatten(portable(config.fingerprint(*sections), config.run_dir))
    for name, value in sorted(inputs.items()):
        plain = value is None or isinstance(value, (str, int, float, bool))
        flat[f"input.{name}"] = portable(value, config.run_dir) if plain else digest(portable(value, config.run_dir))
    return flat


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, list[Any]]:
    """{key: [old, new]} for every key whose value differs (a key only one side has: None on the other)."""
    return {key: [old.get(key), new.get(key)] for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)}


def describe_changes(changes: dict[str, list[Any]]) -> str:
    def show(value: Any) -> str:
        text = "unset" if value is None else str(value)
        return text if len(text) <= 40 else text[:12] + "..."

    return ", ".join(f"{key} {show(old)} -> {show(new)}" for key, (old, new) in changes.items())


def check_resume(ckpt_dir: Path, tag: str, fingerprint: dict[str, Any], *, allow: bool, allow_key: str,
                 position: str = "step") -> dict[str, Any]:
    """The provenance the resumed job records in its checkpoints, after verifying checkpoint `tag`'s files against
    the sha256 recorded at save time and comparing its fingerprint with this run's: a difference is one line naming each changed key, unless `allow` (then it is recorded as a
    change at the checkpoint's `position`, its step or epoch)."""
    verify_checkpoint(ckpt_dir, tag)  # before anything of it is read, here or by the ranks
    info = read_client_info(ckpt_dir, tag) or {}
    recorded = info.get(PROVENANCE)
    at = info.get(position)
    where = ckpt_dir / tag
    if not isinstance(recorded, dict) or not isinstance(recorded.get("fingerprint"), dict):
        if not allow:
            raise HyperofaError(
                f"{where}: records no fingerprint of the settings it was trained with (an older checkpoint), so a "
                f"resume cannot be checked; set {allow_key}=true to resume it anyway"
            )
        return {"fingerprint": fingerprint, "changes": [{position: at, "tag": tag, "changed": "unknown"}]}
    changes = config_changes(recorded["fingerprint"], fingerprint)
    history = list(recorded.get("changes") or [])
    if changes and not allow:
        raise HyperofaError(
            f"{where}: resume refused, result-changing settings differ from the ones this checkpoint was trained "
            f"with: {describe_changes(changes)}; restore them, or set {allow_key}=true to continue with the new "
            f"values (recorded as a change at {position} {at})"
        )
    if changes:
        history.append({position: at, "tag": tag, "changed": changes})
    return {"fingerprint": fingerprint, "changes": history}


def fresh_provenance(fingerprint: dict[str, Any]) -> dict[str, Any]:
    return {"fingerprint": fingerprint, "changes": []}


def change_tags(provenance: dict[str, Any], position: str = "step") -> dict[str, str]:
    """MLflow tags naming each recorded change: `hyperofa.config_change.<step>` -> 'key old -> new, ...'."""
    tags = {}
    for change in provenance.get("changes") or []:
        changed = change.get("changed")
        text = describe_changes(changed) if isinstance(changed, dict) else "unknown (an older checkpoint)"
        tags[f"hyperofa.config_change.{position}{change.get(position)}"] = text
    return tags
