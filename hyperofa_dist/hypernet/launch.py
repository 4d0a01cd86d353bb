"""Build and run the `deepspeed` launcher command for the hypernetwork job.

One node: N local ranks (`--num_gpus N`, which the runner also uses as the process count on a CPU-only machine;
gloo there, NCCL on GPUs) on a free rendezvous port. Many nodes: `--hostfile`, `--num_nodes`, `--launcher`
(launcher flags go before the module, DeepSpeed #662). The MLflow parent run id travels in the environment
(HYPEROFA_PARENT_RUN_ID) for local ranks and in the job file for remote ones.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

from ..errors import HyperofaError
from ..tracking import PARENT_ENV

MODULE = "hyperofa_dist.hypernet.train"
SHM_PREFIX = "deepspeed_allreduce_buffer"


def read_hostfile(path: Path) -> list[tuple[str, int]]:
    if not path.is_file():
        raise HyperofaError(f"{path}: hostfile not found (hypernet.hostfile)")
    hosts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].startswith("slots=") or not parts[1][6:].isdigit():
            raise HyperofaError(f"{path}:{number}: expected `hostname slots=N`, got {line!r}")
        hosts.append((parts[0], int(parts[1][6:])))
    if not hosts:
        raise HyperofaError(f"{path}: hostfile lists no host")
    return hosts


def planned_world_size(hp: Any) -> int:
    """Ranks the launch will start: local ranks, or the slots of the hostfile's first num_nodes hosts."""
    if hp.hostfile:
        hosts = read_hostfile(Path(hp.hostfile))
        hosts = hosts[: hp.num_nodes] if hp.num_nodes else hosts
        return sum(hp.ranks_per_node or slots for _, slots in hosts)
    if hp.ranks_per_node:
        return hp.ranks_per_node
    import torch

    return torch.cuda.device_count() or 2


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch_command(
    hp: Any, job_file: Path, *, ranks: Optional[int] = None, extra: tuple[str, ...] = (), module: str = MODULE
) -> list[str]:
    """The launcher invocation; `ranks` overrides the local rank count (the benchmark's 1- and 2-rank runs).
    `hp` is any config section with the launch keys (hypernet, pretrain); `module` is the job to run."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner"]
    if hp.hostfile and ranks is None:
        cmd += ["--hostfile", str(Path(hp.hostfile).resolve()), "--launcher", hp.launcher,
                "--master_port", str(hp.master_port or 29500)]
        if hp.num_nodes:
            cmd += ["--num_nodes", str(hp.num_nodes)]
        if hp.ranks_per_node:
            cmd += ["--num_gpus", str(hp.ranks_per_node)]
    else:
        cmd += ["--num_gpus", str(ranks or planned_world_size(hp)), "--master_port", str(hp.master_port or free_port())]
    return cmd + ["--module", module, "--job", str(job_file), *extra]


def run_launcher(cmd: list[str], parent_run_id: Optional[str], capture: bool = False) -> subprocess.CompletedProcess:
    """Run the launcher; its ranks' output streams to our stderr (stdout stays for results: the demo's table, a
    bench's JSON line), or is returned when `capture`."""
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if parent_run_id:
        env[PARENT_ENV] = parent_run_id
    try:
        if capture:
            return subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        return subprocess.run(cmd, env=env, stdout=2)  # fd 2, so it also works under a replaced sys.stderr
    finally:
        if "--hostfile" not in cmd:
            remove_shm_buffers(cmd[cmd.index("--master_port") + 1])


def remove_shm_buffers(port: str, shm_dir: Path = Path("/dev/shm")) -> int:
    """Unlink the CPU all-reduce buffers the ranks of a local launch on `port` left behind; returns how many.

    DeepSpeed's CPU shm all-reduce creates one 64 MiB segment per rank (deepspeed_allreduce_buffer_<uid>_<addr>_
    <port>_<rank>) and never unlinks it, so every CPU run, finished or killed, would keep that memory in /dev/shm
    until reboot. The port is this launch's own, so only its segments match."""
    removed = 0
    for path in shm_dir.glob(f"{SHM_PREFIX}_{os.getuid()}_*_{port}_*"):
        try:
            path.unlink()
            removed += 1
        except FileNotFoundError:
            pass
    return removed
