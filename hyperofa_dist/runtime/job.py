"""The skeleton both DeepSpeed jobs (hypernet, pretrain) share: one rank's identity, device, process group,
threads, collectives, non-finite guard and MLflow tracker, and the `main` that parses the launcher's arguments.

A job module is launched on every rank by the `deepspeed` launcher (runtime/launch.py) as

    python -m <job module> --local_rank=<r> --job <stage dir>/job.json

and does: `ctx = JobContext(read_job(path))`, `ctx.init_distributed(threads)`, build its model and engine, run its
loop, and exit 0 (or `NAN_EXIT` when the guard stopped it). Only global rank 0 logs to MLflow, into the run its
stage shell opened (`ctx.tracked()`): the run id travels in the job file, because pdsh/ssh launchers forward only
MLFLOW*/PYTHON* variables to remote ranks.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from ..config import Config, build_config
from ..errors import HyperofaError
from ..formats.jobdir import RUN_ID, checkpoint_dir, read_job
from ..tracking import make_tracker

NAN_EXIT = 3


class JobContext:
    """One rank's view of a DeepSpeed job."""

    def __init__(self, job: dict[str, Any], command: str):
        import torch

        self.job = job
        self.command = command
        self.config: Config = build_config(job["config"])
        self.seed = self.config.run.seed
        self.out = Path(job["out_dir"])
        self.ckpt_dir = checkpoint_dir(self.out)
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
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local, 1)))
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
        return self.tracker().attach(self.job.get(RUN_ID))

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
    run: Callable[[dict[str, Any], argparse.Namespace], int],
    add_arguments: Callable[[argparse.ArgumentParser], None] = lambda parser: None,
) -> int:
    """Parse the launcher's arguments, read the job file, run; a HyperofaError is one line and exit 2."""
    parser = argparse.ArgumentParser(prog=f"hyperofa {command} job", description=f"hyperofa {command} (one rank)")
    parser.add_argument("--job", required=True, help=f"job.json written by `hyperofa {command}`")
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    try:
        return run(read_job(args.job), args)
    except HyperofaError as exc:
        print(f"hyperofa {command}: error: {exc}", file=sys.stderr, flush=True)
        return 2
