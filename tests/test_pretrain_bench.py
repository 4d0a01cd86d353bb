"""`hyperofa bench pretrain` at a toy shape: one JSON line on stdout with the issue's fields, both loops timed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_bench_pretrain_prints_one_json_line_with_both_loops(tmp_path):
    shape = ["pretrain.bench.vocab_size=3000", "pretrain.bench.hidden_size=32", "pretrain.bench.num_layers=1",
             "pretrain.bench.seq_len=64", "pretrain.bench.micro_batch_size=2", "pretrain.bench.steps=2",
             "pretrain.bench.warmup=1", "pretrain.bench.grad_accum=3", f"run.dir={tmp_path}"]
    out = subprocess.run([sys.executable, "-m", "hyperofa_dist.cli", "bench", "pretrain", *shape],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, out.stdout  # DeepSpeed's own prints go to stderr
    result = json.loads(lines[0])
    assert (result["vocab_size"], result["hidden_size"], result["num_layers"], result["seq_len"]) == (3000, 32, 1, 64)
    assert result["grad_accum"] == 3 and result["zero"] == "zero2" and result["precision"] == "fp32"
    assert result["tokens_per_s"] > 0 and result["baseline_tokens_per_s"] > 0
    assert result["speedup"] == pytest.approx(result["tokens_per_s"] / result["baseline_tokens_per_s"])
    assert 0.1 < result["predicted_share"] < 0.2  # 15% of the non-special positions
    assert "mfu" not in result  # MFU needs a GPU's peak


def test_bench_pretrain_factorised_against_full_rank_in_fresh_processes(tmp_path):
    shape = ["pretrain.bench.vocab_size=100000", "pretrain.bench.hidden_size=64", "pretrain.bench.num_layers=1",
             "pretrain.bench.seq_len=64", "pretrain.bench.micro_batch_size=2", "pretrain.bench.steps=2",
             "pretrain.bench.warmup=1", "pretrain.bench.rank=8", "pretrain.embeddings=factorised", f"run.dir={tmp_path}"]
    out = subprocess.run([sys.executable, "-m", "hyperofa_dist.cli", "bench", "pretrain", *shape],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, out.stdout
    result = json.loads(lines[0])
    v, d, k = 100000, 64, 8
    assert result["parameters_embeddings"] == v * k + k * d and result["baseline_parameters_embeddings"] == v * d
    assert result["baseline_parameters_total"] - result["parameters_total"] == v * d - (v * k + k * d)
    assert result["tokens_per_s"] > 0 and result["baseline_tokens_per_s"] > 0
    assert result["speedup"] == pytest.approx(result["tokens_per_s"] / result["baseline_tokens_per_s"])
    assert result["memory_ratio"] == pytest.approx(result["peak_memory_gib"] / result["baseline_peak_memory_gib"])
    # 100,000 x 64 fp32 full-rank state (weights, grads, two Adam moments: ~100 MB) against ~13 MB factorised: the
    # fresh processes' peaks must show the difference.
    assert result["peak_memory_gib"] < result["baseline_peak_memory_gib"]
