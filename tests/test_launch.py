"""The `deepspeed` launcher command and its clean-up (hyperofa_dist/runtime/launch.py)."""

from __future__ import annotations

import os
import sys

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


# --- which GPUs a local launch runs on ---------------------------------------------------------------------------

from hyperofa_dist.runtime.launch import Machine, planned_world_size  # noqa: E402


def _local(tmp_path, overrides, machine, ranks=None):
    p = load_config(None, ["pretrain.master_port=29611", *overrides]).pretrain
    cmd = launch_command(p, tmp_path / "job.json", PRETRAIN, ranks=ranks, machine=machine)
    assert cmd[cmd.index("--master_port") - 2] in ("--include", "--num_gpus")  # the device flag, then the port
    return cmd[: cmd.index("--master_port")], planned_world_size(p, "pretrain", machine)


def test_local_launch_keeps_the_users_cuda_visible_devices(tmp_path):
    runner = [sys.executable, "-m", "deepspeed.launcher.runner"]
    cmd, world = _local(tmp_path, [], Machine(gpus=2, visible="2,5"))
    assert cmd == [*runner, "--include", "localhost:2,5"] and world == 2
    # ranks_per_node takes the first of the visible GPUs, never GPU 0..N-1 of the node
    cmd, world = _local(tmp_path, ["pretrain.ranks_per_node=1"], Machine(gpus=2, visible="2,5"))
    assert cmd == [*runner, "--include", "localhost:2"] and world == 1
    cmd, _ = _local(tmp_path, [], Machine(gpus=2, visible="2,5"), ranks=1)
    assert cmd == [*runner, "--include", "localhost:2"]
    # nothing chosen: every GPU, as before; a CPU-only machine: 2 ranks
    assert _local(tmp_path, [], Machine(gpus=4)) == ([*runner, "--num_gpus", "4"], 4)
    assert _local(tmp_path, [], Machine(gpus=0, visible="0,1")) == ([*runner, "--num_gpus", "2"], 2)


def test_include_and_exclude_pick_the_machines_gpus(tmp_path):
    runner = [sys.executable, "-m", "deepspeed.launcher.runner"]
    assert _local(tmp_path, ["pretrain.include=localhost:2,3"], Machine(gpus=8)) == (
        [*runner, "--include", "localhost:2,3"], 2)
    assert _local(tmp_path, ["pretrain.exclude=localhost:0,7"], Machine(gpus=8)) == (
        [*runner, "--include", "localhost:1,2,3,4,5,6"], 6)
    assert _local(tmp_path, ["pretrain.include=localhost"], Machine(gpus=3)) == (
        [*runner, "--include", "localhost:0,1,2"], 3)


@pytest.mark.parametrize("overrides, machine, message", [
    (["pretrain.include=localhost:8"], Machine(gpus=8), r"pretrain.include=localhost:8: No slot '8'"),
    (["pretrain.include=node-a:0"], Machine(gpus=8), r"pretrain.include=node-a:0: Hostname 'node-a' not found"),
    (["pretrain.exclude=localhost"], Machine(gpus=8), r"pretrain.exclude=localhost: leaves no device"),
    (["pretrain.include=localhost:1"], Machine(gpus=2, visible="0,1"), r"and CUDA_VISIBLE_DEVICES=0,1 both pick GPUs"),
    (["pretrain.include=localhost:1"], Machine(gpus=0), r"pretrain.include=localhost:1: picks GPUs, and this machine has none"),
    (["pretrain.ranks_per_node=3"], Machine(gpus=2, visible="4,5"), r"ranks_per_node=3 ranks, but CUDA_VISIBLE_DEVICES=4,5 gives 2 GPUs"),
    ([], Machine(gpus=1, visible="GPU-5f1c"), r"CUDA_VISIBLE_DEVICES=GPU-5f1c: names GPUs by UUID"),
])
def test_a_device_choice_that_cannot_run_is_one_line_before_launch(tmp_path, overrides, machine, message):
    with pytest.raises(HyperofaError, match=message):
        _local(tmp_path, overrides, machine)


@pytest.mark.parametrize("overrides, message", [
    (["pretrain.include=localhost:0", "pretrain.exclude=localhost:1"], "include and exclude are mutually exclusive"),
    (["hypernet.include=localhost:0", "hypernet.ranks_per_node=1"], "so ranks_per_node must be unset"),
    (["pretrain.exclude=a:0", "pretrain.num_nodes=1"], "so num_nodes must be unset"),
    (["pretrain.include=localhost:a,b"], "is not host"),
])
def test_contradictory_device_keys_are_refused_with_the_config(overrides, message):
    with pytest.raises(HyperofaError, match=message):
        load_config(None, overrides)


def test_multi_node_include_goes_to_the_runner_and_counts_the_ranks(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=4\nnode-b slots=4\n")
    p = load_config(None, [f"pretrain.hostfile={hostfile}", "pretrain.include=node-a@node-b:0,2"]).pretrain
    cmd = launch_command(p, tmp_path / "job.json", PRETRAIN)
    assert _flag(cmd, "--include") == "node-a@node-b:0,2" and cmd.index("--include") < cmd.index("--module")
    assert planned_world_size(p, "pretrain") == 6
    p = load_config(None, [f"pretrain.hostfile={hostfile}", "pretrain.exclude=node-b:3"]).pretrain
    assert _flag(launch_command(p, tmp_path / "job.json", PRETRAIN), "--exclude") == "node-b:3"
    assert planned_world_size(p, "pretrain") == 7
    p = load_config(None, [f"pretrain.hostfile={hostfile}", "pretrain.include=node-c"]).pretrain
    with pytest.raises(HyperofaError, match="pretrain.include=node-c: Hostname 'node-c' not found"):
        launch_command(p, tmp_path / "job.json", PRETRAIN)
