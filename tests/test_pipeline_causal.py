"""The pipeline end to end with causal sources: real Ray (prepare, mapping), real DeepSpeed (hypernet, pretraining),
on the generated world (hyperofa_dist.synthetic.demo) with a tiny untied Llama (Llama-3-style byte-level BPE) and a
tiny tied Qwen2 (Qwen2-style tokenizer, no BOS), through `hyperofa pipeline --config configs/demo-causal.yaml`.

One pipeline run per model kind, cut to a few steps (each DeepSpeed launch costs 10-20 s on 2 cores):
  llama  hyperofa (the hypernetwork on the untied [E_in | E_out] factorisation), MLflow on (the causal runs follow
         the masked ones' names and tags), compare;
  qwen2  ofa (no hypernetwork: the tied factorisation is the masked LMs'), tracking off; then its pretraining again
         through `hyperofa pretrain` in another run directory, SIGKILLed before step 3 and resumed: the pipeline's
         (uninterrupted) losses at every step.
The mean method and the four-method table are the demo's (`hyperofa demo-causal`); tests/test_init_causal.py has
each method on both kinds.
The job-level drills (ZeRO-3, offload, gradient checkpointing, warm-up) are tests/test_pretrain_causal_job.py's.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hyperofa_dist import synthetic
from hyperofa_dist.config import DEMO_CAUSAL_CONFIG
from hyperofa_dist.runtime.faults import FAULT_ENV
from hyperofa_dist.synthetic.demo import CausalWorldSpec, build_world

pytestmark = pytest.mark.slow

STEPS = 4
PRETRAIN = [
    f"pretrain.steps={STEPS}",
    "pretrain.save_every=2",
    "pretrain.eval_every=2",
    "pretrain.warmup_steps=1",
    "pretrain.micro_batch_size=4",
    "pretrain.eval_blocks=4",
    "pretrain.log_every=1",
]
SMALL = [
    "tokenizer.new_tokens=400",
    "tokenizer.sentences_per_language=1000",
    "tokenizer.fertility_sentences=100",
    "vectors.train.epochs=3",
    "hypernet.epochs=3",
    "hypernet.checkpoint_every=2",
    "evaluate.heldout_sentences=40",
    "evaluate.max_sentences=40",
    *PRETRAIN,
]
KINDS = {  # family, tokenizer, methods, extra overrides
    "llama": ("llama", "llama3", ("hyperofa",), ("tracking.experiment=causal",)),
    "qwen2": ("qwen2", "qwen2", ("ofa",), ("tracking.enabled=false", "pipeline.compare=false")),
}


def _hyperofa(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hyperofa_dist.cli", *args], capture_output=True, text=True,
                          timeout=900, env=env)


@pytest.fixture(scope="module", params=list(KINDS))
def pipeline_run(request, tmp_path_factory):
    family, tokenizer, methods, extra = KINDS[request.param]
    run_dir = tmp_path_factory.mktemp(f"causal_pipeline_{family}")
    spec = CausalWorldSpec(seed=0, n_concepts=200, source_sentences=1500, target_sentences=600, retrieval_pairs=40,
                           source_vocab=500, pretrain_steps=30, family=family, tokenizer=tokenizer)
    paths = build_world(run_dir, spec)
    args = ["pipeline", "--config", str(DEMO_CAUSAL_CONFIG), f"run.dir={run_dir}", f"source.model={paths.source_model}",
            f"corpus.path={paths.corpus}", f"evaluate.data_dir={paths.eval_data}",
            f"pipeline.methods=[{', '.join(methods)}]", *SMALL, *extra]
    out = _hyperofa(*args)
    assert out.returncode == 0, out.stderr[-4000:]
    return request.param, run_dir, paths, methods, out


def _losses(stage_dir: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in map(json.loads, (stage_dir / "train_log.jsonl").read_text().splitlines())}


def test_every_stage_runs_and_the_table_has_bits_per_byte(pipeline_run):
    kind, run_dir, _, methods, out = pipeline_run
    stages = ["tokenizer", "prepare", "vectors", "mapping"] + (["hypernet"] if "hyperofa" in methods else [])
    stages += [f"{s}/{m}" for m in methods for s in ("init", "pretrain")]
    stages += [f"evaluate/{s}-{m}" for m in methods for s in ("init", "pretrain")]
    for stage in stages:
        assert (run_dir / stage / "manifest.json").is_file(), stage
    for method in methods:
        assert json.loads((run_dir / "pretrain" / method / "manifest.json").read_text())["objective"] == "causal"
        results = json.loads((run_dir / "evaluate" / f"init-{method}" / "results.json").read_text())
        assert {"srt", "bpb", "fertility"} <= set(results)
        # Fertility: the extended tokenizer cuts the new languages' text into fewer pieces than the source's.
        fertility = results["fertility"]["average"]
        assert fertility["fertility_target"] < fertility["fertility_source"]
    with open(run_dir / "results" / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == list(methods)
    for row in rows:
        step0, final = float(row["bpb_step0"]), float(row["bpb_final"])
        assert math.isfinite(step0) and 0 < final < step0, row  # pretraining on the new languages lowers bpb
    assert "bpb_step0" in out.stdout.splitlines()[0]


def test_expanded_models_load_stock_and_the_init_gives_the_source_logits(pipeline_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kind, run_dir, paths, methods, _ = pipeline_run
    tied = synthetic.CAUSAL_FAMILIES[KINDS[kind][0]]
    source = AutoModelForCausalLM.from_pretrained(paths.source_model).eval()
    source_tok = AutoTokenizer.from_pretrained(paths.source_model)
    v_s = len(source_tok)
    lines = synthetic.read_lines(paths.corpus / "qaa_Latn.txt", 80)
    for method in methods:
        for stage in ("init", "pretrain"):
            model_dir = run_dir / stage / method / "model"
            model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
            tok = AutoTokenizer.from_pretrained(model_dir)
            assert type(model) is type(source) and model.config.tie_word_embeddings is tied
            assert model.config.vocab_size >= len(tok) > v_s
            assert tok.convert_ids_to_tokens(list(range(v_s))) == source_tok.convert_ids_to_tokens(list(range(v_s)))
        # The init model before any training: on source text that the extended tokenizer cuts as the source's did,
        # its logits over the source vocabulary are the source model's.
        model = AutoModelForCausalLM.from_pretrained(run_dir / "init" / method / "model").eval()
        tok = AutoTokenizer.from_pretrained(run_dir / "init" / method / "model")
        unchanged = [line for line in lines if tok(line)["input_ids"] == source_tok(line)["input_ids"]]
        assert len(unchanged) >= 5, (kind, method)
        with torch.no_grad():
            for line in unchanged[:5]:
                ids = torch.tensor([tok(line)["input_ids"]])
                torch.testing.assert_close(model(ids).logits[..., :v_s], source(ids).logits, rtol=0, atol=1e-5)


def test_causal_runs_are_named_and_tagged_as_masked_ones(pipeline_run):
    kind, run_dir, _, methods, _ = pipeline_run
    if kind != "llama":
        pytest.skip("tracking is on for the llama run only")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("causal").experiment_id], max_results=1000)
    by_name = {r.info.run_name: r for r in runs}
    for method in methods:
        init, pretrain = by_name[f"init/{method}"], by_name[f"pretrain/{method}"]
        assert init.data.tags["init.kind"] == "causal" and init.data.tags["init.method"] == method
        assert pretrain.data.tags["hyperofa.objective"] == "causal" and pretrain.data.tags["init.method"] == method
        assert len(client.get_metric_history(pretrain.info.run_id, "train/loss")) == STEPS
        assert sorted(m.step for m in client.get_metric_history(pretrain.info.run_id, "eval/loss")) == [0, 2, 4]
        for step in (0, STEPS):
            run = by_name[f"evaluate/{method}@{step}"]
            assert run.data.tags["hyperofa.step"] == str(step) and "bpb.average.bpb" in run.data.metrics
    assert "compare" in by_name and (run_dir / "compare" / "causal" / "table.csv").is_file()


def test_tied_pretraining_killed_then_resumed_repeats_the_pipeline_losses(pipeline_run, tmp_path):
    kind, run_dir, _, _, _ = pipeline_run
    if kind != "qwen2":
        pytest.skip("the untied kill-and-resume is tests/test_pretrain_causal_job.py's")
    args = ["pretrain", "--config", str(DEMO_CAUSAL_CONFIG), f"run.dir={tmp_path}", "pretrain.method=ofa",
            f"pretrain.model={run_dir / 'init' / 'ofa' / 'model'}", f"pretrain.shards={run_dir / 'prepare'}",
            "tracking.enabled=false", *PRETRAIN]
    killed = _hyperofa(*args, env=dict(os.environ, **{FAULT_ENV: "kill@3"}))
    assert killed.returncode == 2 and "step00000002" in killed.stderr, killed.stderr[-3000:]
    stage_dir = tmp_path / "pretrain" / "ofa"
    assert not (stage_dir / "manifest.json").exists()
    resumed = _hyperofa(*args, "pretrain.resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = _losses(run_dir / "pretrain" / "ofa"), _losses(stage_dir)
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-4), step
