"""Real `deepspeed` launches of causal-LM pretraining: 2 CPU ranks over gloo on real prepare shards (a Llama-3-style
byte-level BPE tokenizer over every language), a tiny untied Llama and a tiny Llama with tied embeddings (as Llama
3.2 1B has them; a tied Qwen2 directory does not load back through AutoTokenizer with a foreign tokenizer, see
conftest.PretrainKit.causal_model).

Per model, three launches (each 10-20 s of start-up, so checks are grouped):
  A  uninterrupted (llama: ZeRO-2; llama-tied: ZeRO-2 with the optimizer offloaded to the CPU), embedding warm-up: the
     warm-up moves only the new rows of the input and (untied) output embeddings; the export loads with stock
     AutoModelForCausalLM/AutoTokenizer and gives the engine's loss on a fixed held-out batch; MLflow (llama);
  B  (llama) the same run under ZeRO-3, SIGKILL on rank 0 after the step-2 checkpoint;
  C  B resumed: A's losses at every step (1e-4), the export again exact. The tied kill-and-resume runs inside the
     causal pipeline test (tests/test_pipeline_causal.py, Qwen2).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from hyperofa_dist.config import load_config
from hyperofa_dist.errors import HyperofaError
from hyperofa_dist.pretrain.export import consolidated_state_dict
from hyperofa_dist.pretrain.stage import run as run_pretrain_stage
from hyperofa_dist.runtime.faults import FAULT_ENV
from hyperofa_dist.tracking import make_tracker

pytestmark = pytest.mark.slow

COPIED = 300  # conftest.PretrainKit.COPIED
COMMON = [
    "pretrain.steps=4",
    "pretrain.save_every=2",
    "pretrain.eval_every=2",
    "pretrain.micro_batch_size=4",
    "pretrain.grad_accum=2",
    "pretrain.lr=0.005",
    "pretrain.num_workers=0",  # the loader's worker processes are the masked-LM job test's concern
    "pretrain.shuffle_buffer=16",
    "pretrain.eval_blocks=4",
    "pretrain.log_every=1",
    "pretrain.embedding_warmup_steps=2",
    "pretrain.loss_chunk=48",  # 128 tokens per micro-batch: three chunks, the last one short
    "pretrain.ranks_per_node=2",
]
TEMPLATES = {"llama": ("zero2", "zero3"), "llama-tied": ("zero2-offload", "zero3-offload")}
RESUMED_EXTRA = {"llama": (), "llama-tied": ("pretrain.gradient_checkpointing=true",)}
EMBEDDINGS = {"llama": ("model.embed_tokens.weight", "lm_head.weight"), "llama-tied": ("model.embed_tokens.weight",)}


@pytest.fixture(scope="module")
def causal_job_world(tmp_path_factory, small_corpus, pretrain_kit):
    assert pretrain_kit.COPIED == COPIED
    root = tmp_path_factory.mktemp("pretrain_causal_job")
    tok = pretrain_kit.causal_tokenizer(root, small_corpus)
    models = {family: pretrain_kit.causal_model(root / family, tok, family) for family in TEMPLATES}
    prepare = pretrain_kit.real_prepare(root / "prep_run", small_corpus, tok)
    return {"root": root, "models": models, "prepare": prepare}


def _config(world, family, name, *extra):
    return load_config(None, [f"run.dir={world['root'] / name}", f"pretrain.model={world['models'][family]}",
                              f"pretrain.shards={world['prepare']}", *COMMON, *extra])


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
    return {row["step"]: row["loss"] for row in map(json.loads, (stage_dir / "train_log.jsonl").read_text().splitlines())}


def _check_warmup(stage_dir: Path, model_dir: Path, family: str) -> None:
    from transformers import AutoModelForCausalLM

    start = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    warm = consolidated_state_dict(stage_dir / "checkpoints", "step00000002")
    for key in EMBEDDINGS[family]:
        assert torch.equal(warm[key][:COPIED], start[key][:COPIED]), key
        assert (warm[key][COPIED:] != start[key][COPIED:]).any(dim=1).float().mean() > 0.5, key
    frozen = [k for k in start if k not in EMBEDDINGS[family] and k != "lm_head.weight"]
    assert frozen and all(torch.equal(warm[k], start[k]) for k in frozen)
    after = consolidated_state_dict(stage_dir / "checkpoints", "step00000004")
    assert not torch.equal(after["model.layers.0.mlp.up_proj.weight"], start["model.layers.0.mlp.up_proj.weight"])


def _check_export(stage_dir: Path, family: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(stage_dir / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(stage_dir / "model")
    assert len(tokenizer) <= model.config.vocab_size
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == (family == "llama-tied")
    probe = torch.load(stage_dir / "probe.pt")
    assert probe["objective"] == "causal" and probe["attention_mask"].dim() == 4
    with torch.no_grad():
        stock = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"],
                      position_ids=probe["position_ids"], labels=probe["hf_labels"]).loss.item()
    assert stock == pytest.approx(probe["loss"], abs=1e-5)


@pytest.fixture(scope="module")
def uninterrupted(causal_job_world):
    out = {}
    for family, (template, _) in TEMPLATES.items():
        tracking = [] if family == "llama" else ["tracking.enabled=false"]
        config = _config(causal_job_world, family, f"a-{family}", f"pretrain.zero={template}", *tracking)
        assert _run(config) == 0
        out[family] = config.run_dir / "pretrain" / "hyperofa"
    return out


@pytest.mark.parametrize("family", list(TEMPLATES))
def test_causal_pretraining_learns_warms_up_and_exports_a_stock_causal_lm(uninterrupted, causal_job_world, family):
    stage_dir = uninterrupted[family]
    losses = _losses(stage_dir)
    assert sorted(losses) == [1, 2, 3, 4]
    assert losses[4] < losses[1]
    evals = [json.loads(line) for line in (stage_dir / "eval_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 2, 4] and len(evals[0]["loss"]) >= 4  # the starting model too
    assert sum(evals[2]["loss"].values()) < sum(evals[0]["loss"].values())
    _check_warmup(stage_dir, causal_job_world["models"][family], family)
    _check_export(stage_dir, family)
    manifest = json.loads((stage_dir / "manifest.json").read_text())
    assert manifest["objective"] == "causal" and manifest["embeddings"] == "full"
    assert manifest["inputs"]["objective"]["frame"]["pad"] is None


def test_causal_run_is_tracked_in_mlflow(uninterrupted):
    """A causal job follows the masked one's MLflow shape: one `pretrain/<method>` run holding rank 0's curves and
    the stage's tags (the objective among them), the export as its artifact and a registered version."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{uninterrupted['llama'].parents[1] / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    every = client.search_runs([client.get_experiment_by_name("hyperofa").experiment_id])
    assert sorted(r.info.run_name for r in every) == ["pretrain", "pretrain/hyperofa"]
    (run,) = [r for r in every if r.info.run_name == "pretrain/hyperofa"]
    assert run.data.tags["hyperofa.objective"] == "causal" and run.data.tags["init.method"] == "hyperofa"
    for key in ("train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s", "eval/qaa_Latn/loss", "eval/loss"):
        assert key in run.data.metrics, key
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "eval/loss")) == [0, 2, 4]
    assert "model/config.json" in [a.path for a in client.list_artifacts(run.info.run_id, "model")]
    assert client.get_model_version("hyperofa-hyperofa", "1").tags["hyperofa.step"] == "4"


# The untied model only: the tied kill-and-resume runs in tests/test_pipeline_causal.py (Qwen2, inside a pipeline).
@pytest.mark.parametrize("family", ["llama"])
def test_causal_zero3_killed_then_resumed_repeats_the_uninterrupted_losses(uninterrupted, causal_job_world, family):
    extra = (f"pretrain.zero={TEMPLATES[family][1]}", "tracking.enabled=false", *RESUMED_EXTRA[family])
    config = _config(causal_job_world, family, f"bc-{family}", *extra)
    stage_dir = config.run_dir / "pretrain" / "hyperofa"
    with pytest.raises(HyperofaError, match="exited with status .*last checkpoint is .*step00000002"):
        _run(config, fault="kill@3")
    assert not (stage_dir / "manifest.json").exists()
    resumed = _config(causal_job_world, family, f"bc-{family}", *extra, "pretrain.resume=true")
    assert _run(resumed) == 0
    expected, got = _losses(uninterrupted[family]), _losses(stage_dir)
    assert sorted(got) == sorted(expected)
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-4), step
    _check_export(stage_dir, family)
