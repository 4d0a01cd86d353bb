"""The `deepspeed` launcher command and its clean-up (hyperofa_dist/runtime/launch.py)."""

from __future__ import annotations

import os

import pytest

from hyperofa_dist.config import load_config
from hyperofa_dist.errors import HyperofaError
from hyperofa_dist.runtime.launch import SHM_PREFIX, LaunchTarget, launch_command, read_hostfile, remove_shm_buffers

PRETRAIN = LaunchTarget("hyperofa_dist.pretrain.train", "pretrain")


def _flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_local_launch_names_ranks_and_a_port_before_the_module(tmp_path):
    p = load_config(None, ["pretrain.ranks_per_node=3", "pretrain.master_port=29611"]).pretrain
    cmd = launch_command(p, tmp_path / "job.json", PRETRAIN)
    assert _flag(cmd, "--num_gpus") == "3" and _flag(cmd, "--master_port") == "29611"
    assert cmd.index("--num_gpus") < cmd.index("--module") and "--hostfile" not in cmd
    # every rank runs under its supervisor, which starts the job module as its child
    assert cmd[-6:] == ["--module", "hyperofa_dist.runtime.rank", "--target", "hyperofa_dist.pretrain.train", "--job",
                        str(tmp_path / "job.json")]


def test_multi_node_launch_puts_launcher_flags_before_the_module(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=4\nnode-b slots=4  # second\n\n")
    p = load_config(None, [f"pretrain.hostfile={hostfile}", "pretrain.num_nodes=2", "pretrain.launcher=slurm"]).pretrain
    cmd = launch_command(p, tmp_path / "job.json", PRETRAIN)
    assert _flag(cmd, "--hostfile") == str(hostfile.resolve()) and _flag(cmd, "--launcher") == "slurm"
    assert _flag(cmd, "--num_nodes") == "2" and _flag(cmd, "--master_port") == "29500"
    assert max(cmd.index(f) for f in ("--hostfile", "--launcher", "--num_nodes")) < cmd.index("--module")
    assert read_hostfile(hostfile) == [("node-a", 4), ("node-b", 4)]


def test_malformed_hostfile_names_the_line(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=4\nnode-b 4\n")
    with pytest.raises(HyperofaError, match=r"hostfile:2: expected `hostname slots=N`"):
        read_hostfile(hostfile)


def test_shm_clean_up_removes_only_this_launchs_segments(tmp_path):
    uid = os.getuid()
    ours = [tmp_path / f"{SHM_PREFIX}_{uid}_127.0.0.1_29611_{rank}" for rank in range(2)]
    others = [tmp_path / f"{SHM_PREFIX}_{uid}_127.0.0.1_29612_0", tmp_path / f"{SHM_PREFIX}_{uid + 1}_127.0.0.1_29611_0",
              tmp_path / "unrelated_29611_0"]
    for path in ours + others:
        path.write_bytes(b"x")
    assert remove_shm_buffers("29611", tmp_path) == 2
    assert not any(p.exists() for p in ours) and all(p.exists() for p in others)
    assert remove_shm_buffers("29611", tmp_path) == 0


def test_local_rendezvous_port_is_free_and_below_the_ephemeral_range():
    import socket

    from hyperofa_dist.runtime.launch import _ephemeral_low, free_port

    low = _ephemeral_low()
    ports = {free_port() for _ in range(20)}
    assert all(max(1024, low - 12000) <= p < low for p in ports) and len(ports) > 1
    for port in list(ports)[:3]:
        with socket.socket() as sock:
            sock.bind(("", port))
