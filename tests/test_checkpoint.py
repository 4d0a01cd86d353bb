"""runtime/checkpoint.py alone: tag names, save and commit, keep-last-k, the start plan (resume, rank count, a
fresh run over old checkpoints), a full disk; and both stages following the plan before they launch anything.

The engine here is a stand-in with DeepSpeed's two calls (`save_checkpoint`, `load_checkpoint`) writing and reading
a torch file per rank, so the checkpointer's own logic runs on one process in milliseconds; the real engine is in
tests/test_hypernet_job.py and tests/test_pretrain_job.py."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from hyperofa_dist.errors import HyperofaError
from hyperofa_dist.formats.jobdir import (
    CHECKPOINT_HASHES, CLIENT_INFO, LATEST, read_client_info, verify_checkpoint, write_checkpoint_hashes,
    write_client_info, write_latest,
)
from hyperofa_dist.runtime.checkpoint import Checkpointer, checkpoints_to_write, universal_tag
from hyperofa_dist.runtime.job import fresh_provenance


class FileEngine:
    """DeepSpeed's checkpoint calls over one torch file per tag: `payload` bytes of weights and the client state."""

    def __init__(self, payload: int = 64, fail: OSError | None = None):
        self.payload, self.fail = payload, fail

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert save_latest is False  # `latest` is the checkpointer's commit, never DeepSpeed's
        path = Path(save_dir) / tag / "mp_rank_00_model_states.pt"
        torch.save({"module": {"w": torch.zeros(self.payload // 4)}, **client_state}, path)
        if self.fail is not None:
            raise self.fail

    def load_checkpoint(self, load_dir, tag, **options):
        path = Path(load_dir) / tag / "mp_rank_00_model_states.pt"
        state = torch.load(path)  # the checkpointer forces weights-only loads around this
        return str(path), {k: v for k, v in state.items() if k != "module"}


PROVENANCE = fresh_provenance({"pretrain.lr": 0.001})


def saved(out: Path, section: str, positions, *, keep=None, world=2) -> Checkpointer:
    ckpt = Checkpointer(out, section, keep=keep)
    for position in positions:
        client = {"step": position, "world_size": world}
        ckpt.save(FileEngine(), position, client, info=client, provenance=PROVENANCE)
    return ckpt


def test_tag_names_are_the_checkpointers_and_listing_orders_by_position(tmp_path):
    hypernet, pretrain = Checkpointer(tmp_path / "h", "hypernet"), Checkpointer(tmp_path / "p", "pretrain")
    assert (hypernet.tag(7), pretrain.tag(40)) == ("epoch00007", "step00000040")
    assert (hypernet.position("epoch00007"), pretrain.position("step00000040")) == (7, 40)
    assert pretrain.position("step00000040_universal") is None and pretrain.position("epoch00001") is None
    for name in ("step00000100", "step00000020", "step00000020_universal", "stepxx", ".step00000030.tmp"):
        (pretrain.dir / name).mkdir(parents=True)
    (pretrain.dir / LATEST).write_text("step00000100")
    assert pretrain.tags() == ["step00000020", "step00000100"]  # by number, conversions and strays left out
    assert pretrain.latest() == "step00000100" and universal_tag("step00000020") == "step00000020_universal"


def test_save_commits_hashes_then_latest_and_keeps_the_newest_k(tmp_path):
    ckpt = saved(tmp_path, "pretrain", [10, 20, 30], keep=2)
    assert ckpt.tags() == ["step00000020", "step00000030"] and ckpt.latest() == "step00000030"
    for tag in ckpt.tags():
        verify_checkpoint(ckpt.dir, tag)  # every file of the tag listed with its sha256
        assert read_client_info(ckpt.dir, tag) == {"step": ckpt.position(tag), "world_size": 2,
                                                   "provenance": PROVENANCE}
    every = saved(tmp_path / "all", "pretrain", [10, 20, 30])  # unset: every checkpoint stays (pretrain's default)
    assert every.tags() == ["step00000010", "step00000020", "step00000030"]
    hypernet = saved(tmp_path / "h", "hypernet", [0, 1, 2], keep=1)
    assert hypernet.tags() == ["epoch00002"] and hypernet.latest() == "epoch00002"


def test_keep_removes_a_tags_universal_conversion_and_never_the_tag_latest_names(tmp_path):
    ckpt = saved(tmp_path, "pretrain", [10], keep=1)
    (ckpt.dir / universal_tag("step00000010")).mkdir()
    (ckpt.dir / "step00000030").mkdir()  # a newer tag whose save never committed (a killed run)
    ckpt.save(FileEngine(), 20, {"step": 20}, info={"step": 20}, provenance=PROVENANCE)
    assert sorted(p.name for p in ckpt.dir.iterdir()) == [LATEST, "step00000020", "step00000030"]
    assert ckpt.latest() == "step00000020"


def test_checkpoints_on_disk_at_once_with_and_without_keep():
    assert checkpoints_to_write(10, 0, None) == 10 and checkpoints_to_write(0, 3, None) == 0
    assert checkpoints_to_write(10, 0, 2) == 3  # two kept and the newest being written
    assert checkpoints_to_write(10, 2, 2) == 1 and checkpoints_to_write(10, 5, 2) == 1
    assert checkpoints_to_write(2, 0, 4) == 2


def test_resume_plan_names_the_verified_latest_tag_and_refuses_another_rank_count(tmp_path):
    fingerprint = PROVENANCE["fingerprint"]
    plan_args = dict(finished=False, fingerprint=fingerprint, allow_change=False)
    pretrain = Checkpointer(tmp_path / "p", "pretrain")
    with pytest.raises(HyperofaError, match=r"checkpoints: no checkpoint to resume from \(pretrain.resume=true\)$"):
        pretrain.plan_start(resume=True, world=2, **plan_args)
    saved(tmp_path / "p", "pretrain", [4, 8])
    plan = pretrain.plan_start(resume=True, world=2, **plan_args)
    assert (plan.resume_tag, plan.universal, plan.clear) == ("step00000008", False, False)
    assert plan.provenance == {"fingerprint": fingerprint, "changes": []}
    with pytest.raises(HyperofaError, match=r"step00000008: written by 2 ranks, this launch has 4; set "
                                            r"pretrain.universal=true to resume through a universal checkpoint$"):
        pretrain.plan_start(resume=True, world=4, **plan_args)
    converted = []
    plan = pretrain.plan_start(resume=True, world=4, universal=True,
                               convert=lambda d, tag: converted.append(tag) or universal_tag(tag), **plan_args)
    assert converted == ["step00000008"] and (plan.resume_tag, plan.universal) == ("step00000008_universal", True)

    hypernet = saved(tmp_path / "h", "hypernet", [1])
    with pytest.raises(HyperofaError, match=r"epoch00001: written by 2 ranks, this launch has 1; resume with 2 ranks$"):
        hypernet.plan_start(resume=True, world=1, universal=True, convert=lambda d, t: t, **plan_args)
    (hypernet.dir / "epoch00001" / "mp_rank_00_model_states.pt").write_bytes(b"changed")
    with pytest.raises(HyperofaError, match="differs from the sha256 recorded"):
        hypernet.plan_start(resume=True, world=2, **plan_args)


@pytest.mark.parametrize("section", ["hypernet", "pretrain"])
def test_a_fresh_run_refuses_an_unfinished_runs_checkpoints_and_clears_a_finished_runs(tmp_path, section):
    ckpt = saved(tmp_path, section, [1, 2])
    args = dict(resume=False, world=2, fingerprint=PROVENANCE["fingerprint"], allow_change=False)
    with pytest.raises(HyperofaError, match=rf"checkpoints of an earlier run exist and it did not finish .*set "
                                            rf"{section}.resume=true to continue it, or remove the directory"):
        ckpt.plan_start(finished=False, **args)
    assert len(ckpt.tags()) == 2  # nothing removed
    plan = ckpt.plan_start(finished=True, **args)
    assert (plan.resume_tag, plan.clear, plan.provenance["changes"]) == (None, True, [])
    (ckpt.dir / LATEST).unlink()  # tags no `latest` names were never committed: nothing to keep
    assert ckpt.plan_start(finished=False, **args).clear


def test_resume_loads_the_planned_tag_weights_only_and_rechecks_the_rank_count(tmp_path):
    ckpt = saved(tmp_path, "pretrain", [4, 8])
    tag, client = ckpt.load(FileEngine(), "step00000004", 2)
    assert (tag, client) == ("step00000004", {"step": 4, "world_size": 2})
    assert ckpt.load(FileEngine(), None, 2)[0] == "step00000008"  # a launch by hand: `latest`
    with pytest.raises(HyperofaError, match="written by 2 ranks, this launch has 3"):
        ckpt.load(FileEngine(), "step00000004", 3)


def _full_disk_asserts(error: HyperofaError, ckpt: Checkpointer, tag: str, kept: str) -> None:
    message = str(error)
    assert "\n" not in message and message.startswith(f"{ckpt.dir / tag}: cannot write the checkpoint: no space "
                                                       "left on device (")
    assert " bytes free); `latest` still names " + str(ckpt.dir / kept) in message
    assert ckpt.latest() == kept and not (ckpt.dir / tag / CHECKPOINT_HASHES).exists()


def test_a_write_refused_for_space_is_one_line_and_latest_keeps_the_last_whole_checkpoint(tmp_path):
    ckpt = saved(tmp_path, "pretrain", [10])
    full = FileEngine(fail=OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(HyperofaError) as error:
        ckpt.save(full, 20, {"step": 20}, info={"step": 20}, provenance=PROVENANCE)
    _full_disk_asserts(error.value, ckpt, "step00000020", "step00000010")
    with pytest.raises(OSError, match="Input/output error"):  # any other failure passes unchanged
        ckpt.save(FileEngine(fail=OSError(errno.EIO, "Input/output error")), 30, {}, info={}, provenance=None)


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str):
    where.mkdir(parents=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root and mount (a small tmpfs)")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_a_checkpoint_that_fills_a_real_filesystem_is_one_line(tmp_path):
    with small_tmpfs(tmp_path / "disk", "256k") as disk:
        ckpt = saved(disk, "hypernet", [0])
        with pytest.raises(HyperofaError) as error:
            ckpt.save(FileEngine(payload=1 << 20), 1, {"epoch": 1}, info={"epoch": 1}, provenance=PROVENANCE,
                      rng={"torch": torch.zeros(4, dtype=torch.uint8).numpy()})
        _full_disk_asserts(error.value, ckpt, "epoch00001", "epoch00000")


# --- both stages follow the plan before anything is launched -----------------------------------------------------


def fake_checkpoint(ckpt_dir: Path, tag: str, world: int, **info) -> None:
    write_client_info(ckpt_dir, tag, {"world_size": world, **info})
    write_checkpoint_hashes(ckpt_dir, tag)
    write_latest(ckpt_dir, tag)


def test_hypernet_stage_plans_before_launch_like_pretrain(tmp_path, hypernet_kit):
    """A resume on another rank count and a fresh run over an unfinished run's checkpoints are refused by the
    stage, before a job file is written or a rank started (pretrain: tests/test_pretrain_core.py)."""
    from hyperofa_dist.hypernet.stage import run
    from hyperofa_dist.tracking import NullTracker

    m = hypernet_kit.mapping(tmp_path / "run")
    out = m.run_dir / "hypernet"
    fake_checkpoint(out / "checkpoints", "epoch00001", 4, epoch=1)
    with pytest.raises(HyperofaError, match=r"epoch00001: written by 4 ranks, this launch has 2; resume with 4 ranks"):
        run(hypernet_kit.config(m, "hypernet.resume=true", "hypernet.allow_config_change=true",
                                "hypernet.ranks_per_node=2"), NullTracker())
    with pytest.raises(HyperofaError, match="checkpoints of an earlier run exist and it did not finish"):
        run(hypernet_kit.config(m, "hypernet.ranks_per_node=2"), NullTracker())
    assert not (out / "job.json").exists() and (out / "checkpoints" / "epoch00001" / CLIENT_INFO).is_file()
    assert json.loads((out / "checkpoints" / "epoch00001" / CLIENT_INFO).read_text())["world_size"] == 4


class NoLaunch:
    """In place of the DeepSpeed launcher: records what the job directory held when the stage launched, and
    reports a failed job (no ranks are started: what is under test is the stage's plan, not the job)."""

    def __init__(self, out: Path):
        self.out, self.seen = out, None

    def __call__(self, cmd):
        self.seen = {"checkpoints": sorted(p.name for p in (self.out / "checkpoints").glob("*")),
                     "job": json.loads((self.out / "job.json").read_text())}
        return subprocess.CompletedProcess(cmd, 1)


def test_hypernet_stage_rebuilding_a_finished_run_removes_its_checkpoints_before_launch(tmp_path, hypernet_kit,
                                                                                        monkeypatch):
    from hyperofa_dist.hypernet import stage
    from hyperofa_dist.tracking import NullTracker

    m = hypernet_kit.mapping(tmp_path / "run")
    out = m.run_dir / "hypernet"
    fake_checkpoint(out / "checkpoints", "epoch00003", 2, epoch=3)
    (out / "manifest.json").write_text(json.dumps({"inputs_digest": "of the finished run, with other inputs"}))
    launcher = NoLaunch(out)
    monkeypatch.setattr(stage, "run_launcher", launcher)
    with pytest.raises(HyperofaError, match=r"^the hypernet training job exited with status 1$"):
        stage.run(hypernet_kit.config(m, "hypernet.ranks_per_node=2"), NullTracker())
    assert launcher.seen["checkpoints"] == []
    assert (launcher.seen["job"]["resume"], launcher.seen["job"]["resume_tag"]) == (False, None)
