"""Multi-node: the no-ssh launch (`<stage>.launcher=nossh`, launch/nossh_node.sh).

Fast: the launcher command of a no-ssh node, the command the node script runs, and its one-line errors.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


from hyperofa_dist.config import load_config
from hyperofa_dist.runtime.launch import LaunchTarget, launch_command

LAUNCH = Path(__file__).resolve().parents[1] / "launch"
PRETRAIN = LaunchTarget("hyperofa_dist.pretrain.train", "pretrain")


def _flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


# --- the no-ssh launch -------------------------------------------------------------------------------------


def test_nossh_launch_starts_this_nodes_ranks_with_the_first_host_as_rank_0(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("gpu-7 slots=8\ngpu-9 slots=8\n")
    p = load_config(None, [f"pretrain.hostfile={hostfile}", "pretrain.launcher=nossh", "pretrain.num_nodes=2"]).pretrain
    first = launch_command(p, tmp_path / "job.json", PRETRAIN)
    second = launch_command(p, tmp_path / "job.json", PRETRAIN, node_rank=1)
    for node_rank, cmd in enumerate((first, second)):
        assert "--no_ssh" in cmd and "--launcher" not in cmd  # DeepSpeed's launcher backends all need ssh or mpirun
        assert _flag(cmd, "--node_rank") == str(node_rank) and _flag(cmd, "--master_addr") == "gpu-7"
        assert _flag(cmd, "--master_port") == "29500" and _flag(cmd, "--hostfile") == str(hostfile.resolve())
        assert max(cmd.index(f) for f in ("--no_ssh", "--node_rank", "--master_addr", "--num_nodes")) < cmd.index(
            "--module")
    assert [a for a in first if a != "0"] == [a for a in second if a != "1"]  # the same launch apart from the rank


def _node_script(tmp_path: Path, stage: str, node_rank: str, *overrides: str, **env: str) -> subprocess.CompletedProcess:
    hostfile, config = tmp_path / "hostfile", tmp_path / "my.yaml"
    hostfile.write_text("127.0.0.1 slots=1\nnode-b slots=1\n")
    config.write_text("tracking:\n  enabled: false\n")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **env}
    return subprocess.run(["bash", str(LAUNCH / "nossh_node.sh"), stage, node_rank, str(config), str(hostfile),
                           f"run.dir={tmp_path / 'run'}", *overrides], capture_output=True, text=True, env=env,
                          timeout=120)


def test_node_script_runs_node_0s_launch_with_its_own_node_rank(tmp_path):
    """What node 1 runs is the launch node 0's `hyperofa <stage>` runs, job file and resume flag included."""
    from hyperofa_dist.hypernet.stage import TARGET as HYPERNET

    for stage, target, job, extra in (
        ("pretrain", PRETRAIN, tmp_path / "run" / "pretrain" / "ofa" / "job.json", ["pretrain.method=ofa"]),
        ("hypernet", HYPERNET, tmp_path / "run" / "hypernet" / "job.json", ["hypernet.resume=true"]),
    ):
        printed = [_node_script(tmp_path, stage, rank, *extra, HYPEROFA_NODE_PRINT="1") for rank in ("0", "1")]
        assert all(out.returncode == 0 for out in printed), printed
        section = getattr(load_config(None, [f"{stage}.hostfile={tmp_path / 'hostfile'}", f"{stage}.launcher=nossh",
                                             *extra]), stage)
        resume = ("--resume",) if stage == "hypernet" else ()
        for rank, out in enumerate(printed):
            assert out.stdout.split() == launch_command(section, job, target, extra=resume, node_rank=rank), stage
        assert printed[1].stdout.split()[-1] == ("--resume" if stage == "hypernet" else str(job))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_node_script_waits_for_rank_0_then_gives_up_with_one_line(tmp_path):
    port = _free_port()  # nothing listens there: node 0 never came up
    out = _node_script(tmp_path, "pretrain", "1", f"pretrain.master_port={port}", HYPEROFA_NODE_WAIT_S="1")
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hyperofa pretrain (node 1): error: "), out.stderr
    assert f"rank 0 never listened on 127.0.0.1:{port} in 1s" in lines[0]
    assert not (tmp_path / "run").exists()  # a waiting node writes nothing


def test_node_script_refuses_a_node_rank_outside_the_hostfile(tmp_path):
    out = _node_script(tmp_path, "hypernet", "2")
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr
    assert out.stderr.startswith("hyperofa hypernet (node 2): error: node rank 2 is not a node of")
    assert "(0 .. 1 here)" in out.stderr
