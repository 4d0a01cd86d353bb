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
