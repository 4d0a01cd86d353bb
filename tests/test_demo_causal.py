"""The causal demo's wiring: its packaged config, its default-config command, and the results table in bits per byte."""

from __future__ import annotations

import pytest

from hyperofa_dist.config import DEFAULT_CONFIGS, DEMO_CAUSAL_CONFIG, load_config
from hyperofa_dist.formats import results as results_format
from hyperofa_dist.pipeline import markdown, results_table
from hyperofa_dist.registry import command


def test_demo_causal_runs_its_packaged_config():
    assert DEFAULT_CONFIGS["demo-causal"] == DEMO_CAUSAL_CONFIG
    assert command("demo-causal").target == "hyperofa_dist.pipeline:run_demo_causal"
    config = load_config(DEMO_CAUSAL_CONFIG)
    assert config.pipeline.methods == ["random", "mean", "ofa", "hyperofa"]
    assert {"bpb", "fertility"} <= set(config.evaluate.tasks) and "qaa_Latn" not in config.evaluate.languages
    assert config.vectors.train.prefix_aligned  # the generated corpus's smaller languages are prefixes of the larger


@pytest.mark.parametrize("causal", [True, False])
def test_results_table_reports_bits_per_byte_for_causal_runs(tmp_path, causal):
    config = load_config(None, [f"run.dir={tmp_path}", "pipeline.methods=[random, ofa]"])
    task, metric = ("bpb", "bpb") if causal else ("mlm", "loss")
    for i, method in enumerate(("random", "ofa")):
        for when, value in (("init", 5.0 - i), ("pretrain", 3.0 - i)):
            results_format.write_results(results_format.stage_of(tmp_path, f"{when}-{method}").path / "results.json", {
                "srt": {"average": {"top1": 10.0, "top10": 40.0 + i}}, task: {"average": {metric: value}}})
    def read(config, method, source):  # the table's layout alone: whether results are current is test_pipeline's
        return results_format.read_results(results_format.stage_of(tmp_path, f"{source}-{method}").path / "results.json")

    rows = results_table(config, read)
    prefix = "bpb" if causal else "mlm_loss"
    assert [r["method"] for r in rows] == ["random", "ofa"]
    assert [(r[f"{prefix}_step0"], r[f"{prefix}_final"]) for r in rows] == [(5.0, 3.0), (4.0, 2.0)]
    header = markdown(rows).splitlines()[0]
    assert header == f"| method | srt_top10_step0 | srt_top1_step0 | {prefix}_step0 | {prefix}_final |"
