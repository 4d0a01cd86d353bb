"""`hyperofa hypernet` as a real 2-rank DeepSpeed job on CPU (gloo): completion, exact resume, disjoint data per
rank, checkpoints without the word table, MLflow stage run under the command's parent run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hyperofa_dist.formats.rundir import Stage
from hyperofa_dist.config import load_config
from hyperofa_dist.errors import HyperofaError
from hyperofa_dist.hypernet.stage import run as run_hypernet_stage
from hyperofa_dist.tracking import NullTracker

pytestmark = pytest.mark.slow

EPOCHS, STOP_AFTER = 4, 1
SELECT_EVERY = 3  # best-model candidates: epochs 2 and 3 (the last)
# A word table far larger than the model, so that a copy of it in a checkpoint could not go unnoticed.
SIZES = dict(n_words=40000, word_dim=16)


def hyperofa(*args: str) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "hyperofa_dist.cli", *args], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-4000:]
    return out


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "hypernet" / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, hypernet_kit):
    small_overrides = hypernet_kit.overrides
    root = tmp_path_factory.mktemp("hypernet_job")
    whole = hypernet_kit.mapping(root / "whole", **SIZES)
    split = hypernet_kit.mapping(root / "split", **SIZES)
    common = (f"hypernet.epochs={EPOCHS}", "hypernet.ranks_per_node=2", "tracking.enabled=true",
              f"hypernet.select_every={SELECT_EVERY}", "hypernet.shuffle_words=true")
    whole_args = small_overrides(whole, *common, "hypernet.data_audit=true")
    hyperofa("hypernet", *whole_args)
    stopped = hyperofa("hypernet", *small_overrides(split, *common, f"hypernet.stop_after_epoch={STOP_AFTER}"))
    stopped_metrics = metrics(split.run_dir)
    stopped_manifest = Stage(split.run_dir, "hypernet").manifest()
    hyperofa("hypernet", *small_overrides(split, *common, "hypernet.resume=true"))
    return dict(whole=whole, split=split, whole_args=whole_args, stopped=stopped, stopped_metrics=stopped_metrics,
                stopped_manifest=stopped_manifest)


def test_two_rank_run_writes_predictions_and_manifest(runs):
    whole = runs["whole"]
    out = whole.run_dir / "hypernet"
    manifest = Stage(whole.run_dir, "hypernet").manifest()
    assert manifest is not None and manifest["counts"]["world_size"] == 2
    assert manifest["counts"]["epochs_run"] == EPOCHS
    ids, rows = np.load(out / "predicted_ids.npy"), np.load(out / "predicted_coordinates.npy")
    with np.load(whole.run_dir / "mapping" / "postings_target.npz") as t, np.load(whole.run_dir / "mapping" / "overlap.npz") as o:
        covered = np.flatnonzero(np.diff(t["indptr"]) > 0)
        expected = np.setdiff1d(covered, o["target_ids"])
    assert np.array_equal(ids, expected) and rows.shape == (len(expected), whole.k) and np.isfinite(rows).all()
    test = json.loads((out / "test_metrics.json").read_text())
    assert test["test_count"] == len(np.load(out / "test_ids.npy"))
    # It learned: the generated targets are a function of the words.
    assert metrics(whole.run_dir)[-1]["val_cosine"] > metrics(whole.run_dir)[0]["val_cosine"] + 0.2
    assert test["test_mean_cosine"] > 0.6


def test_stopped_then_resumed_run_matches_uninterrupted_run(runs):
    assert "stopped after epoch 1" in runs["stopped"].stderr
    assert runs["stopped_manifest"] is None  # an interrupted run never looks complete
    assert [r["epoch"] for r in runs["stopped_metrics"]] == list(range(STOP_AFTER + 1))
    whole, resumed = metrics(runs["whole"].run_dir), metrics(runs["split"].run_dir)
    assert [r["epoch"] for r in resumed] == list(range(EPOCHS))
    for a, b in zip(whole, resumed):
        for key in ("val_loss", "val_cosine", "val_l1", "val_contrastive", "train_loss"):
            assert abs(a[key] - b[key]) <= 1e-5, (a["epoch"], key, a[key], b[key])
    w, r = (np.load(run.run_dir / "hypernet" / "predicted_coordinates.npy") for run in (runs["whole"], runs["split"]))
    assert np.allclose(w, r, atol=1e-5)


def test_best_model_is_the_lowest_validation_loss_among_the_candidate_epochs(runs):
    from hyperofa_dist.formats.hypernet import read_train_state

    for name in ("whole", "split"):  # the resumed run selects as the uninterrupted one
        run_dir = runs[name].run_dir
        candidates = [r for r in metrics(run_dir) if r["epoch"] in (2, 3)]
        best = min(candidates, key=lambda r: r["val_loss"])
        state = read_train_state(run_dir / "hypernet")
        assert (state["best_epoch"], state["best_val_loss"]) == (best["epoch"], best["val_loss"])


def test_ranks_see_disjoint_samples_each_epoch(runs):
    audit = runs["whole"].run_dir / "hypernet" / "audit"
    with np.load(runs["whole"].run_dir / "mapping" / "split.npz") as split:
        train = set(split["train"].tolist())
    for epoch in range(EPOCHS):
        a, b = (np.load(audit / f"epoch{epoch:05d}_rank{r}.npy") for r in (0, 1))
        assert len(a) == len(b) > 0  # the same number of batches on both ranks
        assert not set(a.tolist()) & set(b.tolist())
        assert set(a.tolist()) | set(b.tolist()) <= train
        assert len(set(a.tolist()) | set(b.tolist())) == len(a) + len(b)


def test_checkpoints_hold_no_copy_of_the_word_table(runs):
    whole = runs["whole"]
    table_bytes = whole.n_words * whole.word_dim * 4
    ckpt = whole.run_dir / "hypernet" / "checkpoints"
    files = [*ckpt.rglob("*.pt"), *ckpt.rglob("*.npz"), whole.run_dir / "hypernet" / "model.pt"]
    assert len(files) >= 4  # model states, one RNG state per rank (arrays, no pickle), the best model
    for path in files:
        assert path.stat().st_size < table_bytes / 4, path
    states = torch.load(next(ckpt.rglob("mp_rank_00_model_states.pt")), map_location="cpu", weights_only=False)
    shapes = [tuple(t.shape) for t in states["module"].values()]
    assert all(whole.n_words not in s for s in shapes)


def test_stage_run_is_logged_under_the_commands_parent_run(runs):
    from mlflow.tracking import MlflowClient

    run_dir = runs["whole"].run_dir
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("hyperofa")
    found = client.search_runs([exp.experiment_id])
    parents = [r for r in found if r.data.tags.get("hyperofa.command") == "hypernet"]
    stages = [r for r in found if r.data.tags.get("hyperofa.stage") == "hypernet"]
    assert len(parents) == 1 and len(stages) == 1 and len(found) == 2  # the job's rank 0 opened no run of its own
    assert stages[0].info.run_name == "hypernet" and stages[0].info.status == "FINISHED"
    assert stages[0].data.tags["mlflow.parentRunId"] == parents[0].info.run_id
    history = client.get_metric_history(stages[0].info.run_id, "val_cosine")
    assert sorted(m.step for m in history) == list(range(EPOCHS))
    assert stages[0].data.params["trainable_params"] != ""
    assert "test_mean_cosine" in stages[0].data.metrics


def test_resumed_job_continues_the_stopped_run(runs):
    """Stopped after epoch 1, then resumed: one `hypernet` run with every epoch, marked as resumed once."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{runs['split'].run_dir / 'mlflow.db'}")
    found = client.search_runs([client.get_experiment_by_name("hyperofa").experiment_id])
    stages = [r for r in found if r.data.tags.get("hyperofa.stage") == "hypernet"]
    assert len(stages) == 1 and stages[0].data.tags["hyperofa.resumed"] == "1"
    history = client.get_metric_history(stages[0].info.run_id, "val_cosine")
    assert sorted(m.step for m in history) == list(range(EPOCHS))


def test_rerun_with_same_inputs_is_a_no_op(runs, capsys):
    manifest = Stage(runs["whole"].run_dir, "hypernet").manifest_path
    before = manifest.stat().st_mtime_ns
    assert run_hypernet_stage(load_config(None, runs["whole_args"]), NullTracker()) == 0
    assert "up to date" in capsys.readouterr().err
    assert manifest.stat().st_mtime_ns == before


def test_a_relative_copy_of_the_run_under_a_new_name_is_up_to_date(runs, tmp_path, monkeypatch, capsys):
    """Issue 24: inputs are recorded by content, so a copy spelled relative to another working directory is the
    same run (the stage checks its fingerprint and launches nothing)."""
    whole = runs["whole"].run_dir
    shutil.copytree(whole, tmp_path / "copy")
    monkeypatch.chdir(tmp_path)
    args = [arg.replace(str(whole), "copy") for arg in runs["whole_args"]]
    assert any(arg == "run.dir=copy" for arg in args)
    capsys.readouterr()
    assert run_hypernet_stage(load_config(None, args), NullTracker()) == 0
    assert capsys.readouterr().err.strip() == f"hyperofa hypernet: up to date ({tmp_path}/copy/hypernet/manifest.json)"


def test_a_diverging_run_stops_with_one_line_and_writes_no_manifest(tmp_path, hypernet_kit):
    """Issue 24: lr=inf is refused by the config; a finite lr that still diverges (here 1e30) gave NaN predictions
    and a manifest. The job now stops on the first non-finite epoch loss, like pretrain."""
    m = hypernet_kit.mapping(tmp_path / "run", n_words=2000)
    config = hypernet_kit.config(m, "hypernet.lr=1e30", "hypernet.epochs=2", "hypernet.ranks_per_node=1")
    with pytest.raises(HyperofaError, match=r"^hypernet train loss became (nan|inf|-inf) in epoch 0 \(lr 1e\+30\); "
                       r"stopped without saving, no checkpoint had been written yet: lower hypernet.lr"):
        run_hypernet_stage(config, NullTracker())
    out = m.run_dir / "hypernet"
    assert not (out / "manifest.json").exists()
    assert not (out / "predicted_coordinates.npy").exists() and not (out / "model.pt").exists()
    assert json.loads((out / "failure.json").read_text())["reason"] == "non-finite loss"
