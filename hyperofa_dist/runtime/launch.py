"""The `deepspeed` launcher for both DeepSpeed jobs (hypernet, pretrain): command, hostfile, environment, clean-up.

One node: N local ranks (`--num_gpus N`, which the runner also uses as the process count on a CPU-only machine;
gloo there, NCCL on GPUs) on a free rendezvous port. Many nodes: `--hostfile`, `--num_nodes`, `--launcher`
(launcher flags go before the module, DeepSpeed #662). The MLflow parent run id travels in the environment
(HYPEROFA_PARENT_RUN_ID) for local ranks and in the job file for remote ones. Every local launch ends by
removing the CPU all-reduce shared-memory segments its ranks leave in /dev/shm.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..errors import HyperofaError
from ..tracking import PARENT_ENV

SHM_PREFIX = "deepspeed_allreduce_buffer"
DEFAULT_MULTI_NODE_PORT = 29500
# `launcher=nossh`: no ssh/pdsh/mpirun; every node runs its own launcher (`--no_ssh --node_rank N`), rank 0 on the
# hostfile's first host. launch/nossh_node.sh starts it on each node.
NO_SSH = "nossh"


@dataclass(frozen=True)
class LaunchTarget:
    """Which job module to start and which config section holds its launch keys (for error messages)."""

    module: str
    section: str  # "hypernet" or "pretrain": the launch keys are `<section>.hostfile`, ...


def read_hostfile(path: Path, key: str = "hostfile") -> list[tuple[str, int]]:
    if not path.is_file():
        raise HyperofaError(f"{path}: hostfile not found ({key})")
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


def planned_world_size(launch: Any, section: str = "launch") -> int:
    """Ranks the launch will start: local ranks, or the slots of the hostfile's first num_nodes hosts."""
    if launch.hostfile:
        hosts = read_hostfile(Path(launch.hostfile), f"{section}.hostfile")
        hosts = hosts[: launch.num_nodes] if launch.num_nodes else hosts
        return sum(launch.ranks_per_node or slots for _, slots in hosts)
    if launch.ranks_per_node:
        return launch.ranks_per_node
    import torch

    return torch.cuda.device_count() or 2


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch_command(
    launch: Any, job_file: Path, target: LaunchTarget, *, ranks: Optional[int] = None, extra: tuple[str, ...] = (),
    node_rank: int = 0,
) -> list[str]:
    """The launcher invocation. `launch` is a config section with the launch keys (`config.LaunchConfig`);
    `ranks` forces that many local ranks (the benchmarks' 1- and 2-rank runs); `node_rank` is this node's index
    in the hostfile when every node starts its own launcher (`launcher=nossh`)."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner"]
    if launch.hostfile and ranks is None:
        hostfile = Path(launch.hostfile)
        hosts = read_hostfile(hostfile, f"{target.section}.hostfile")
        cmd += ["--hostfile", str(hostfile.resolve()), "--master_port", str(launch.master_port or DEFAULT_MULTI_NODE_PORT)]
        if launch.launcher == NO_SSH:
            # Without ssh the runner cannot ask the first host for its address, nor start the other nodes' ranks.
            cmd += ["--no_ssh", "--node_rank", str(node_rank), "--master_addr", hosts[0][0]]
        else:
            cmd += ["--launcher", launch.launcher]
        if launch.num_nodes:
            cmd += ["--num_nodes", str(launch.num_nodes)]
        if launch.ranks_per_node:
            cmd += ["--num_gpus", str(launch.ranks_per_node)]
    else:
        local = ranks or planned_world_size(launch, target.section)
        cmd += ["--num_gpus", str(local), "--master_port", str(launch.master_port or free_port())]
    return cmd + ["--module", target.module, "--job", str(job_file), *extra]


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
