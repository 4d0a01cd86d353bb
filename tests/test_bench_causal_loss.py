"""`hyperofa bench causal-loss` at a toy shape: one JSON line, both losses equal, the chunked peak below the full one."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_bench_causal_loss_prints_one_json_line_with_both_peaks(tmp_path):
    shape = ["pretrain.bench.loss_vocab_size=20000", "pretrain.bench.loss_tokens=1024",
             "pretrain.bench.loss_hidden_size=32", "pretrain.loss_chunk=64", f"run.dir={tmp_path}"]
    out = subprocess.run([sys.executable, "-m", "hyperofa_dist.cli", "bench", "causal-loss", *shape],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, out.stdout
    result = json.loads(lines[0])
    assert (result["vocab_size"], result["tokens"], result["hidden_size"], result["chunk"]) == (20000, 1024, 32, 64)
    assert result["precision"] == "fp32" and result["device"] == "cpu"
    assert result["loss_relative_difference"] < 1e-5 and result["loss"] == pytest.approx(result["baseline_loss"], rel=1e-5)
    # Full logits: three [1024 x 20000] fp32 buffers (logits, log-softmax, its gradient), about 230 MiB; chunks of
    # 64 tokens hold about 5 MiB each.
    assert result["baseline_peak_memory_gib"] > 0.15
    assert result["peak_memory_gib"] < result["baseline_peak_memory_gib"] / 4
    assert result["memory_ratio"] == pytest.approx(result["peak_memory_gib"] / result["baseline_peak_memory_gib"])
