"""Pointing the system at shared or hostile files: names that would leave the run directory, secrets in the
tracking URI, symbolic links planted under the names the system writes, crafted checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hyperofa_dist import cli
from hyperofa_dist.errors import HyperofaError
from hyperofa_dist.formats.rundir import Stage


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# --- names that become paths -----------------------------------------------------------------------------------


@pytest.mark.parametrize("override", ["evaluate.name=../x", "evaluate.name=..", "evaluate.name=a/b",
                                      "pretrain.method=../../y", "pretrain.method=."])
def test_a_name_that_would_leave_the_run_dir_is_refused_at_config_time(tmp_path, capsys, override):
    command = override.split(".")[0]
    argv = [command, f"run.dir={tmp_path / 'run'}", "tracking.enabled=false", override]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    key = override.split("=")[0]
    assert len(err) == 1 and f"config key {key}: must be one directory name inside the run directory" in err[0]
    assert _files(tmp_path) == []


def test_stage_names_and_deletions_stay_inside_the_stage(tmp_path):
    for bad in ("..", "evaluate/../..", "a/./b", "x\ny"):
        with pytest.raises(HyperofaError, match="stage directory name"):
            Stage(tmp_path, bad)
    outside = tmp_path / "outside"
    (outside / "model").mkdir(parents=True)
    (outside / "model" / "keep.bin").write_text("keep")
    run = tmp_path / "run"
    (run / "pretrain").mkdir(parents=True)
    os.symlink(outside, run / "pretrain" / "ofa")  # the stage's directory planted as a link out of the run dir
    with pytest.raises(HyperofaError, match="refusing to delete"):
        Stage(run / "pretrain", "ofa").clear(["model"])
    assert (outside / "model" / "keep.bin").exists()
    own = Stage(run / "pretrain", "hyperofa")
    own.path.mkdir()
    os.symlink(outside / "model", own.path / "model")  # an entry planted as a link: the link goes, not its target
    (own.path / "audit").mkdir()
    (own.path / "audit" / "rank0.jsonl").write_text("{}")
    own.clear(["model", "audit", "failure.json"])
    assert _files(own.path) == [] and (outside / "model" / "keep.bin").exists()


# --- pdsh: the job's arguments through a remote shell ---------------------------------------------------------


@pytest.mark.parametrize("job_dir", ["r;touch${{IFS}}{marker};x", "a b/$(touch {marker})", "c `touch {marker}` \"d\" \\e",
                                     "plain"])
def test_pdsh_launch_arguments_reach_the_remote_shell_unchanged(tmp_path, job_dir, monkeypatch):
    """The arguments as DeepSpeed's pdsh runner really processes them, then read by a shell as pdsh's remote
    command is: each comes back as it was, and none of the planted commands runs."""
    import subprocess
    from types import SimpleNamespace

    from deepspeed.launcher.multinode_runner import PDSHRunner

    from hyperofa_dist.config import load_config
    from hyperofa_dist.runtime.launch import LaunchTarget, launch_command, remote_shell_arguments

    marker = tmp_path / "ran"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node1 slots=1\nnode2 slots=1\n")
    job = tmp_path / job_dir.format(marker=marker) / "job.json"
    launch = load_config(None, [f"pretrain.hostfile={hostfile}", "pretrain.launcher=pdsh"]).pretrain
    monkeypatch.chdir(tmp_path)
    cmd = launch_command(launch, job, LaunchTarget("hyperofa_dist.pretrain.train", "pretrain"))
    sent = remote_shell_arguments(cmd)
    user_args = sent[sent.index("--module") + 2:]  # what the runner hands pdsh after the module
    processed = PDSHRunner.parse_user_args(SimpleNamespace(args=SimpleNamespace(user_args=user_args)))
    out = subprocess.run(["sh", "-c", "printf '%s\\n' " + " ".join(processed)], capture_output=True, text=True)
    assert out.stdout.splitlines() == cmd[cmd.index("--module") + 2:]
    assert str(job) in out.stdout.splitlines() and not marker.exists()


def test_pdsh_launch_from_a_directory_a_shell_would_misread_is_refused(tmp_path, monkeypatch):
    from hyperofa_dist.runtime.launch import remote_shell_arguments

    unsafe = tmp_path / "x;touch y"
    unsafe.mkdir()
    monkeypatch.chdir(unsafe)
    cmd = ["python", "-m", "deepspeed.launcher.runner", "--launcher", "pdsh", "--module", "m", "--job", "j"]
    with pytest.raises(HyperofaError, match="passes the working directory unquoted"):
        remote_shell_arguments(cmd)
    assert remote_shell_arguments([c for c in cmd if c not in ("--launcher", "pdsh")])[-1] == "j"  # local: as is


# --- lock and temporary files never follow a planted symbolic link -------------------------------------------


def test_a_symlink_planted_under_a_temporary_or_lock_name_is_never_written_through(tmp_path):
    import numpy as np

    from hyperofa_dist.formats.files import atomic_write_bytes, npy_writer, tmp_name
    from hyperofa_dist.formats.journal import Journal

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "run" / "stage"
    out.mkdir(parents=True)
    target = out / "manifest.json"
    os.symlink(victim, tmp_name(target))  # the temporary name this process will use
    atomic_write_bytes(target, b"{}")
    assert target.read_bytes() == b"{}" and not target.is_symlink() and victim.read_text() == "precious"

    array = out / "big.npy"
    os.symlink(victim, tmp_name(array))
    with npy_writer(array, np.float32, (3,)) as table:
        table[:] = 1
    assert np.load(array).tolist() == [1, 1, 1] and victim.read_text() == "precious"

    stage = Stage(tmp_path / "run", "stage")
    os.symlink(victim, tmp_path / "run" / ".stage.lock")
    with pytest.raises(HyperofaError, match="the stage lock is a symbolic link"):
        stage.lock("test").acquire()
    assert victim.read_text() == "precious"

    journal = Journal.create(tmp_path / "run" / "tracking", "store")  # predictable name: O_EXCL refuses a planted one
    journal.close()
    assert victim.read_text() == "precious"
