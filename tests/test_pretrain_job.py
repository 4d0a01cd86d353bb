"""Real `deepspeed` launches of the pretraining job: 2 CPU ranks over gloo on real prepare shards.

Four launches cover the acceptance points (each costs 10-20 s of start-up, so checks are grouped):
  A  ZeRO-2, uninterrupted, embedding warm-up, data audit, MLflow: loss decreases, ranks disjoint and in step,
     warm-up freezes copied rows and the encoder, export reproduces the engine's loss.
  B  ZeRO-3, same run killed (SIGKILL on rank 0) after the step-4 checkpoint;
  C  ZeRO-3, resumed: the same losses at the same steps as A (1e-4), warm-up again exact, export again exact.
  D  1 rank resuming A's 2-rank checkpoint through a universal checkpoint, then a NaN loss stops it.
  E  ZeRO-2, factorised embeddings (F_t P of rank 8, the model's own embeddings being that product): the first
     step's loss equals A's, the embeddings have V k + k D parameters, the export holds E = F_t P and the factors;
  F  ZeRO-3 factorised, killed after the step-4 checkpoint, and G resumed: E's losses (1e-4).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from hyperofa_dist.config import load_config
from hyperofa_dist.errors import HyperofaError
from hyperofa_dist.pretrain.export import consolidated_state_dict
from hyperofa_dist.pretrain.stage import run as run_pretrain_stage
from hyperofa_dist.runtime.faults import FAULT_ENV
from hyperofa_dist.runtime.launch import free_port
from hyperofa_dist.tracking import make_tracker

COPIED = 300  # conftest.PretrainKit.COPIED: rows [0, COPIED) play the copied tokens

pytestmark = pytest.mark.slow

EMB = "roberta.embeddings.word_embeddings.weight"
COMMON = [
    "pretrain.steps=6",
    "pretrain.save_every=2",
    "pretrain.eval_every=3",
    "pretrain.micro_batch_size=4",
    "pretrain.grad_accum=2",
    "pretrain.lr=0.005",
    "pretrain.warmup_steps=0",
    "pretrain.num_workers=1",
    "pretrain.prefetch_factor=2",
    "pretrain.shuffle_buffer=16",
    "pretrain.eval_blocks=8",
    "pretrain.log_every=1",
    "pretrain.embedding_warmup_steps=2",
    "pretrain.data_audit=true",
    "pretrain.ranks_per_node=2",
]


SHM = Path("/dev/shm")


@pytest.fixture(scope="module")
def job_world(tmp_path_factory, small_corpus, pretrain_kit):
    assert pretrain_kit.COPIED == COPIED
    root = tmp_path_factory.mktemp("pretrain_job")
    tok, model = pretrain_kit.tokenizer_and_model(root, small_corpus)
    prepare = pretrain_kit.real_prepare(root / "prep_run", small_corpus, tok)
    return {"root": root, "model": model, "prepare": prepare}


def _config(job_world, name, *extra, model=None):
    return load_config(None, [f"run.dir={job_world['root'] / name}", f"pretrain.model={model or job_world['model']}",
                              f"pretrain.shards={job_world['prepare']}", *COMMON, *extra])


def _run(config, fault=None):
    if fault:
        os.environ[FAULT_ENV] = fault
    try:
        tracker = make_tracker(config)
        with tracker.session("pretrain", config):
            return run_pretrain_stage(config, tracker)
    finally:
        os.environ.pop(FAULT_ENV, None)


def _losses(stage_dir: Path) -> dict[int, float]:
    out = {}
    for line in (stage_dir / "train_log.jsonl").read_text().splitlines():
        row = json.loads(line)
        out[row["step"]] = row["loss"]  # a resumed run re-logs nothing before its checkpoint; last one wins
    return out


def _check_warmup(stage_dir: Path, model_dir: Path) -> None:
    from transformers import AutoModelForMaskedLM

    start = AutoModelForMaskedLM.from_pretrained(model_dir).state_dict()
    warm = consolidated_state_dict(stage_dir / "checkpoints", "step00000002")
    assert torch.equal(warm[EMB][:COPIED], start[EMB][:COPIED])
    assert (warm[EMB][COPIED:] != start[EMB][COPIED:]).any(dim=1).float().mean() > 0.9
    frozen = [k for k in warm if k not in (EMB, "lm_head.decoder.weight")]
    assert frozen and all(torch.equal(warm[k], start[k]) for k in frozen)
    after = consolidated_state_dict(stage_dir / "checkpoints", "step00000004")
    assert not torch.equal(after["roberta.encoder.layer.0.output.dense.weight"],
                           start["roberta.encoder.layer.0.output.dense.weight"])
    assert not torch.equal(after[EMB][:COPIED], start[EMB][:COPIED])


def _check_export(stage_dir: Path) -> None:
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    model = AutoModelForMaskedLM.from_pretrained(stage_dir / "model").eval()
    AutoTokenizer.from_pretrained(stage_dir / "model")
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    probe = torch.load(stage_dir / "probe.pt")
    with torch.no_grad():
        stock = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"],
                      labels=probe["labels"]).loss.item()
    assert stock == pytest.approx(probe["loss"], abs=1e-5)


@pytest.fixture(scope="module")
def run_a(job_world):
    # A port of its own names this launch's all-reduce segments (other jobs on the machine make theirs meanwhile).
    port = free_port()
    config = _config(job_world, "a", "pretrain.zero=zero2", f"pretrain.master_port={port}")
    assert _run(config) == 0
    job_world["shm_left"] = set(SHM.glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    return config.run_dir / "pretrain" / "hyperofa"


def test_zero2_two_ranks_learn_on_disjoint_data_in_step(run_a, job_world):
    losses = _losses(run_a)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert np.mean([losses[5], losses[6]]) < np.mean([losses[1], losses[2]]) - 0.02
    evals = [json.loads(line) for line in (run_a / "eval_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 3, 6] and len(evals[0]["loss"]) == 6  # the starting model too
    assert np.mean(list(evals[2]["loss"].values())) < np.mean(list(evals[0]["loss"].values()))
    ranks = [json.loads((run_a / "ranks" / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["steps"] for r in ranks] == [6, 6] and [r["micro_steps"] for r in ranks] == [12, 12]
    seen = []
    for r in range(2):
        rows = [json.loads(line) for line in (run_a / "audit" / f"rank{r}.jsonl").read_text().splitlines()]
        assert len(rows) == 12 and all(len(row["blocks"]) == 4 for row in rows)
        seen.append({b for row in rows for b in row["blocks"]})
    assert seen[0].isdisjoint(seen[1])
    assert len({b.split("/")[0] for b in seen[0] | seen[1]}) >= 4  # languages are mixed
    _check_warmup(run_a, job_world["model"])
    _check_export(run_a)
    manifest = json.loads((run_a / "manifest.json").read_text())
    assert manifest["counts"]["steps"] == 6 and any(o["path"] == "model/config.json" for o in manifest["outputs"])
    assert job_world["shm_left"] == set()  # the ranks' CPU all-reduce segments are unlinked after the launch


def test_zero2_run_is_tracked_in_mlflow(run_a):
    """One run per method holds the job's curves: the stage shell's `pretrain/<method>` run, which rank 0 attached to
    (no nested run), under the command's parent run; the exported model is its `model/` artifact and a version of
    the registered model `<experiment>-<method>`."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{run_a.parents[1] / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    every = client.search_runs([client.get_experiment_by_name("hyperofa").experiment_id])
    assert sorted(r.info.run_name for r in every) == ["pretrain", "pretrain/hyperofa"]
    (run,) = [r for r in every if r.info.run_name == "pretrain/hyperofa"]
    assert run.data.tags["init.method"] == "hyperofa" and run.data.tags["hyperofa.stage"] == "pretrain"
    metrics = run.data.metrics
    for key in ("train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s", "perf/samples_per_s",
                "perf/memory_gb", "eval/qaa_Latn/loss", "eval/loss"):
        assert key in metrics, key
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6]
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "eval/loss")) == [0, 3, 6]
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.info.run_name == "pretrain"
    assert "model/config.json" in [a.path for a in client.list_artifacts(run.info.run_id, "model")]
    version = client.get_model_version("hyperofa-hyperofa", "1")
    assert version.run_id == run.info.run_id and version.tags["hyperofa.step"] == "6"


def test_zero3_killed_then_resumed_repeats_the_uninterrupted_losses(run_a, job_world, capfd):
    config = _config(job_world, "bc", "pretrain.zero=zero3", "tracking.enabled=false")
    stage_dir = config.run_dir / "pretrain" / "hyperofa"
    capfd.readouterr()
    with pytest.raises(HyperofaError, match="exited with status .*last checkpoint is .*step00000004"):
        _run(config, fault="kill@5")
    # the driver names the rank that died, how, and where its output is
    log = stage_dir / "logs" / "rank0.log"
    said = [line for line in capfd.readouterr().err.splitlines() if line.startswith("hyperofa: rank 0 (pid ")]
    assert len(said) == 1 and "was killed by SIGKILL" in said[0] and said[0].endswith(f"its output: {log}"), said
    assert "hyperofa pretrain: step 4/6 loss" in log.read_text()  # rank 0's own output, up to its death
    assert (stage_dir / "checkpoints" / "latest").read_text().strip() == "step00000004"
    assert not (stage_dir / "manifest.json").exists()
    # a result-changing key differs from the checkpoint's: refused before anything is launched
    with pytest.raises(HyperofaError, match=r"step00000004: resume refused.*pretrain\.lr 0\.005 -> 0\.001.*"
                                            r"pretrain\.allow_config_change=true"):
        _run(_config(job_world, "bc", "pretrain.zero=zero3", "tracking.enabled=false", "pretrain.resume=true",
                     "pretrain.lr=0.001"))
    # execution-only keys (logging cadence, port) never count
    resumed = _config(job_world, "bc", "pretrain.zero=zero3", "tracking.enabled=false", "pretrain.resume=true",
                      "pretrain.log_every=2", "pretrain.master_port=29731")
    assert _run(resumed) == 0
    assert json.loads((stage_dir / "manifest.json").read_text())["config_changes"] == []
    expected, got = _losses(run_a), _losses(stage_dir)
    assert sorted(got) == sorted(expected)
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-4), step
    ranks = [json.loads((stage_dir / "ranks" / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["steps"] for r in ranks] == [6, 6]
    _check_warmup(stage_dir, job_world["model"])
    _check_export(stage_dir)


def test_two_rank_checkpoint_resumes_on_one_rank_then_nan_stops_keeping_the_last_good(run_a, job_world):
    config = _config(job_world, "d", "pretrain.zero=zero2", "tracking.enabled=false", "pretrain.resume=true",
                     "pretrain.universal=true", "pretrain.ranks_per_node=1", "pretrain.steps=9",
                     "pretrain.save_every=1", "pretrain.eval_every=100")
    stage_dir = config.run_dir / "pretrain" / "hyperofa"
    shutil.copytree(run_a / "checkpoints", stage_dir / "checkpoints")
    with pytest.raises(HyperofaError, match=r"differ from the ones this checkpoint was trained with: "
                                            r"pretrain\.save_every 2 -> 1, pretrain\.steps 6 -> 9; "):
        _run(config)
    config = config.with_changes({"pretrain.allow_config_change": True})
    with pytest.raises(HyperofaError, match=r"loss became nan at step 9 .*last good checkpoint is .*step00000008"):
        _run(config, fault="nan@9")
    ckpt = stage_dir / "checkpoints"
    assert (ckpt / "step00000006_universal").is_dir()
    assert (ckpt / "latest").read_text().strip() == "step00000008"
    assert not (ckpt / "step00000009").exists() and not (stage_dir / "manifest.json").exists()
    rows = [json.loads(line) for line in (stage_dir / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [7, 8]
    tokens_at_6 = json.loads((run_a / "checkpoints" / "step00000006" / "hyperofa.json").read_text())["tokens_seen"]
    assert rows[0]["tokens_seen"] == tokens_at_6 + 2 * 4 * 32  # one step of one rank: GA x micro x block
    assert all(np.isfinite(r["loss"]) for r in rows)
    info = json.loads((ckpt / "step00000008" / "hyperofa.json").read_text())
    assert info["world_size"] == 1 and info["step"] == 8
    # the checkpoints written after the allowed change carry it: which keys, from what to what, at which step
    assert info["provenance"]["changes"] == [{"step": 6, "tag": "step00000006", "changed": {
        "pretrain.save_every": [2, 1], "pretrain.steps": [6, 9]}}]


# --- factorised embeddings ----------------------------------------------------------------------------------

K = 8


@pytest.fixture(scope="module")
def factorised_model(job_world, pretrain_kit):
    return pretrain_kit.factorised_model(job_world["root"] / "fact", job_world["model"], k=K)


@pytest.fixture(scope="module")
def run_e(job_world, factorised_model):
    config = _config(job_world, "e", "pretrain.zero=zero2", "tracking.enabled=false", model=factorised_model)
    assert config.pretrain.embeddings == "auto"  # factors beside the model, k < D: factorised
    assert _run(config) == 0
    return config.run_dir / "pretrain" / "hyperofa"


def _check_factorised_export(stage_dir: Path) -> None:
    from hyperofa_dist.formats.init import load_factors
    from hyperofa_dist.formats.models import load_model

    coordinates, primitives = load_factors(stage_dir)
    model = load_model(stage_dir / "model")
    weight = model.get_input_embeddings().weight.detach().numpy()
    assert coordinates.shape == (weight.shape[0], K) and primitives.shape == (K, weight.shape[1])
    np.testing.assert_allclose(weight, coordinates.astype(np.float64) @ primitives.astype(np.float64), atol=1e-6)
    _check_export(stage_dir)  # the stock model gives the engine's loss on the probe batch


def test_factorised_zero2_starts_at_the_full_rank_loss_with_vk_plus_kd_embedding_parameters(run_a, run_e, job_world):
    from transformers import AutoConfig

    full, fact = _losses(run_a), _losses(run_e)
    # The model's embeddings are F_t P, so the first step sees the same model in both forms ...
    start = json.loads((run_e / "manifest.json").read_text())
    assert start["embeddings"] == "factorised"
    # ... and A's model is the full-rank original, not the rank-8 product: compare with a full-rank run of E's model.
    cfg = AutoConfig.from_pretrained(job_world["model"])
    vocab, hidden = cfg.vocab_size, cfg.hidden_size
    assert start["counts"]["parameters_embeddings"] == vocab * K + K * hidden
    params = json.loads((run_a / "parameters.json").read_text())
    assert params["parameters_embeddings"] == vocab * hidden
    assert params["parameters_total"] - start["counts"]["parameters_total"] == vocab * hidden - (vocab * K + K * hidden)
    assert sorted(fact) == sorted(full) and np.mean([fact[5], fact[6]]) < np.mean([fact[1], fact[2]]) - 0.02
    _check_factorised_export(run_e)


def test_factorised_first_loss_equals_the_full_rank_first_loss(run_e, job_world, factorised_model):
    config = _config(job_world, "e_full", "pretrain.zero=zero2", "tracking.enabled=false", "pretrain.steps=1",
                     "pretrain.embeddings=full", model=factorised_model)
    assert _run(config) == 0
    stage_dir = config.run_dir / "pretrain" / "hyperofa"
    assert json.loads((stage_dir / "manifest.json").read_text())["embeddings"] == "full"
    assert _losses(stage_dir)[1] == pytest.approx(_losses(run_e)[1], abs=1e-5)


def test_factorised_zero3_killed_then_resumed_repeats_the_uninterrupted_losses(run_e, job_world, factorised_model):
    args = ("pretrain.zero=zero3", "tracking.enabled=false")
    config = _config(job_world, "fg", *args, model=factorised_model)
    stage_dir = config.run_dir / "pretrain" / "hyperofa"
    with pytest.raises(HyperofaError, match="exited with status .*last checkpoint is .*step00000004"):
        _run(config, fault="kill@5")
    resumed = _config(job_world, "fg", *args, "pretrain.resume=true", model=factorised_model)
    assert _run(resumed) == 0
    expected, got = _losses(run_e), _losses(stage_dir)
    assert sorted(got) == sorted(expected)
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-4), step
    _check_factorised_export(stage_dir)
    # the warm-up trained only new coordinate rows: copied rows and P are unchanged at step 2
    from hyperofa_dist.formats.init import load_factors

    warm = consolidated_state_dict(stage_dir / "checkpoints", "step00000002")
    coordinates, primitives = load_factors(factorised_model.parent)
    f_t = warm["roberta.embeddings.word_embeddings.coordinates.weight"]
    assert torch.equal(f_t[:COPIED], torch.from_numpy(np.array(coordinates[:COPIED])))
    assert (f_t[COPIED:len(coordinates)] != torch.from_numpy(np.array(coordinates[COPIED:]))).any(dim=1).float().mean() > 0.9
    assert torch.equal(warm["roberta.embeddings.word_embeddings.primitives"], torch.from_numpy(primitives))
