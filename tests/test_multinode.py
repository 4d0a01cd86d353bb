"""Multi-node: the no-ssh launch (`<stage>.launcher=nossh`, launch/nossh_node.sh) and the two-node drills.

Fast: the launcher command of a no-ssh node, the command the node script runs, and its one-line errors.
Slow: launch/multinode_drill.py run as a user runs it, two network namespaces joined by a veth pair as two nodes:
  ray        a two-node Ray cluster runs `hyperofa prepare` and `hyperofa mapping` from the head node, which has no
             CPU: every task ran on the other node, and both stages' outputs are byte-identical to a single-node run;
  deepspeed  `hyperofa pretrain` over both nodes (one gloo rank each), node B killed after the step-4 checkpoint,
             both resumed: the losses of every step equal an uninterrupted single-node 2-rank run's (1e-4).
The drills skip only where this machine cannot create network namespaces (not root, no iproute2, no CAP_SYS_ADMIN).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

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


# --- the drills --------------------------------------------------------------------------------------------


def _namespaces_unavailable() -> str:
    """Why this machine cannot create a network namespace ("" when it can): the drills' only reason to skip."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    name = f"hyoprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return ""


def _drill(tmp_path: Path, name: str) -> dict:
    why = _namespaces_unavailable()
    if why:
        pytest.skip(f"two-node drill needs network namespaces: {why}")
    report = tmp_path / "report.json"
    proc = subprocess.Popen([sys.executable, str(LAUNCH / "multinode_drill.py"), name, "--work", str(tmp_path / "work"),
                             "--report", str(report)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, stderr = proc.communicate(timeout=840)
    assert report.is_file(), stderr[-3000:]
    result = json.loads(report.read_text())
    print(json.dumps({k: result.get(k) for k in ("wall_s", "checks", "error")}, indent=1))  # kept in CI logs
    assert proc.returncode == 0 and result["passed"], json.dumps(result, indent=1)[-6000:]
    # Nothing of the drill is left: its namespaces (named after its pid), their /etc/netns entries, Ray's files.
    ours = f"hyod{proc.pid}"
    assert not [n for n in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
                if n.startswith(ours)]
    assert not list(Path("/etc/netns").glob(f"{ours}*")) and not list(Path("/tmp").glob(f"{ours}-*"))
    return result


@pytest.mark.slow
def test_two_node_ray_cluster_runs_prepare_and_mapping_across_nodes_byte_identical(tmp_path):
    r = _drill(tmp_path, "ray")
    assert r["cluster_nodes"] == ["10.77.0.1", "10.77.0.2"]
    for stage in ("prepare", "mapping"):
        tasks = r["tasks"][stage]
        assert tasks["not_finished"] == 0 and tasks["tasks"] == sum(tasks["by_node"].values())
        # the head (A, the driver's node) has no CPU, so Ray must run every task on B and send results across
        assert tasks["by_node"] == {"10.77.0.1": 0, "10.77.0.2": tasks["tasks"]}, tasks
        same = r["outputs"][stage]
        assert same["files"] >= (100 if stage == "prepare" else 9) and same["bytes"] > 100_000
        assert same["files_identical"] and same["manifest_outputs_identical"] and same["inputs_digest_identical"]
    assert r["tasks"]["prepare"]["tasks"] >= 10  # the corpus was cut into enough chunks to spread
    b = r["processes_seen"]["B"]["processes"]
    assert b["raylet"] >= 1 and b["gcs_server"] == 0 and b["hyperofa_driver"] == 0  # B is a worker node
    assert r["veth_bytes_node_b"]["rx"] > 0 and r["veth_bytes_node_b"]["tx"] > 0


@pytest.mark.slow
def test_two_node_pretrain_killed_on_one_node_resumes_to_the_uninterrupted_losses(tmp_path):
    r = _drill(tmp_path, "deepspeed")
    assert r["after_kill"]["latest"] == "step00000004" and not r["after_kill"]["manifest"]
    assert any(k["rank"] == "1" for k in r["killed_on_node_b"])  # the node's rank was among what was killed
    assert r["node_a_exit_after_kill"] == 2 and r["node_a_error"].startswith("hyperofa pretrain: error: ")
    assert r["left_on_node_a_after_kill"] == [] and r["resume_exit_codes"] == [0, 0]
    expected, got = r["losses_single_node"], r["losses_two_nodes_resumed"]
    assert sorted(got, key=int) == sorted(expected, key=int) == [str(s) for s in range(1, 9)]
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, abs=1e-4), step
    assert r["processes_seen"]["A"]["ranks"] == [0] and r["processes_seen"]["B"]["ranks"] == [1]
    assert r["processes_seen"]["B"]["processes"]["hyperofa_driver"] == 0  # node B only ever ran its own ranks
    assert sorted((s["rank"], s["world_size"]) for s in r["rank_summaries"]) == [(0, 2), (1, 2)]
    assert r["veth_bytes_node_b"]["rx"] > 100_000  # gradients crossed the link
