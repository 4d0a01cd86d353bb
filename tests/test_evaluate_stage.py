"""`hyperofa evaluate` end to end: flags, results JSON shape, MLflow metrics, up-to-date re-runs, bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from hyperofa_dist import synthetic
from hyperofa_dist.cli import main
from hyperofa_dist.tracking import default_tracking_uri

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, source_tokenizers, small_corpus, world, prepare_format):
    """A run directory with an init-stage model (init/random/model) and prepare held-out shards, plus data."""
    root = tmp_path_factory.mktemp("evalrun")
    model = synthetic.make_tiny_model("xlmr", source_tokenizers["xlmr"], root / "run" / "init" / "random" / "model")
    from hyperofa_dist.formats.tokenizer import load_tokenizer

    tok = load_tokenizer(model)
    blocks = {
        lang: {"heldout": prepare_format.framed_blocks(tok, synthetic.read_lines(small_corpus / f"{lang}.txt", limit=60), 32)[:6]}
        for lang in ("qaa_Latn", "qac_Latn")
    }
    prepare_format.write(root / "run" / "prepare", blocks, None, 32, blocks_per_sample=3, manifest=False)
    data = root / "data"
    synthetic.write_retrieval_data(data / "srt", world, "qaa_Latn", ["qab_Cyrl", "qac_Latn"], n=40)
    synthetic.write_retrieval_data(data / "bible", world, "qaa_Latn", ["qac_Latn"], n=30, prefix="bible", seed=1)
    synthetic.write_tagging_data(data / "ner", world, "ner", "qaa_Latn", ["qac_Latn"], sizes=(30, 10, 10))
    return root


def evaluate(root, *extra):
    return main(
        ["evaluate", "--model", "init/random", "--data", str(root / "data"), f"run.dir={root / 'run'}",
         "evaluate.layer=-1", "evaluate.tagging.epochs=1", "evaluate.tagging.max_length=64", *extra]
    )


def test_results_json_mlflow_and_rerun(run_dir, capsys):
    output = run_dir / "out" / "results.json"
    assert evaluate(run_dir, "--tasks", "srt,srb,ner,mlm", "--output", str(output), "evaluate.step=500") == 0
    results = json.loads(output.read_text())
    assert sorted(results) == ["mlm", "ner", "srb", "srt"]
    assert sorted(results["srt"]) == ["average", "qab_Cyrl", "qac_Latn"]
    assert sorted(results["ner"]) == ["average", "eng_Latn", "qac_Latn"]
    assert sorted(results["mlm"]) == ["average", "qaa_Latn", "qac_Latn"]
    for task, langs in results.items():
        per_lang = {k: v for k, v in langs.items() if k != "average"}
        for metric, value in langs["average"].items():
            assert value == pytest.approx(np.mean([v[metric] for v in per_lang.values()]))
    assert set(results["srb"]["qac_Latn"]) == {"top1", "top5", "top10"}
    assert set(results["mlm"]["qaa_Latn"]) == {"loss", "perplexity", "positions"}

    stage_dir = run_dir / "run" / "evaluate" / "init-random"
    assert json.loads((stage_dir / "results.json").read_text()) == results
    manifest = json.loads((stage_dir / "manifest.json").read_text())
    assert manifest["counts"] == {"srt": 2, "srb": 1, "ner": 2, "mlm": 2}

    client = MlflowClient(default_tracking_uri(run_dir / "run"))
    experiment = client.get_experiment_by_name("hyperofa")
    (run,) = client.search_runs([experiment.experiment_id], "tags.`hyperofa.stage` = 'evaluate'")
    assert run.data.tags["init.method"] == "random" and run.data.tags["hyperofa.step"] == "500"
    assert run.info.run_name == "evaluate/random@500"
    assert run.data.metrics["srt.average.top10"] == pytest.approx(results["srt"]["average"]["top10"])
    assert run.data.metrics["mlm.qac_Latn.loss"] == pytest.approx(results["mlm"]["qac_Latn"]["loss"])
    history = client.get_metric_history(run.info.run_id, "srt.average.top10")
    assert [m.step for m in history] == [500]
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["results.json"]

    before = (stage_dir / "manifest.json").read_bytes()
    capsys.readouterr()
    assert evaluate(run_dir, "--tasks", "srt,srb,ner,mlm", "--output", str(output), "evaluate.step=500") == 0
    assert "up to date" in capsys.readouterr().err
    assert (stage_dir / "manifest.json").read_bytes() == before


def test_missing_pair_is_listed_and_languages_filter(run_dir, capsys):
    data = run_dir / "data_missing"
    shutil.copytree(run_dir / "data", data)
    (data / "srt" / "tatoeba.qab_Cyrl-eng_Latn.qab_Cyrl").unlink()
    code = main(["evaluate", "--model", "init/random", "--data", str(data), "--tasks", "srt",
                 f"run.dir={run_dir / 'run'}", "evaluate.layer=-1", "evaluate.name=missing"])
    assert code == 0
    assert "srt: skipped qab_Cyrl (missing tatoeba.qab_Cyrl-eng_Latn.qab_Cyrl)" in capsys.readouterr().err
    results = json.loads((run_dir / "run" / "evaluate" / "missing" / "results.json").read_text())
    assert sorted(results["srt"]) == ["average", "qac_Latn"]
    manifest = json.loads((run_dir / "run" / "evaluate" / "missing" / "manifest.json").read_text())
    assert manifest["skipped"]["srt"] == {"qab_Cyrl": "missing tatoeba.qab_Cyrl-eng_Latn.qab_Cyrl"}


def one_line_error(capsys, code):
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("hyperofa")]
    assert code == 2 and len(err) == 1 and err[0].startswith("hyperofa evaluate: error: ")
    return err[0]


def test_tokenizer_larger_than_embedding_is_rejected(run_dir, source_tokenizers, capsys, tmp_path):
    model = tmp_path / "mismatch"
    shutil.copytree(run_dir / "run" / "init" / "random" / "model", model)
    # The RoBERTa-family tokenizer has 401 tokens; the XLM-R-family model has 400 embedding rows.
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source_tokenizers["roberta"] / name, model / name)
    code = main(["evaluate", "--model", str(model), "--tasks", "srt", "--data", str(run_dir / "data"),
                 f"run.dir={tmp_path / 'run'}", "evaluate.layer=-1", "tracking.enabled=false"])
    line = one_line_error(capsys, code)
    assert "tokenizer has 401 tokens but the model's input embedding has 400 rows" in line
    assert not (tmp_path / "run" / "evaluate").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "init/nothing"], "evaluate.model='init/nothing': no HF model directory"),
        (["--model", "init/random", "--tasks", "srt"], "evaluate.data_dir is unset but task srt needs"),
        (["--model", "init/random", "--tasks", "srt,pos", "--data", "DATA"], "no pos/ or udpos/ directory"),
        (["--model", "init/random", "--tasks", "srt", "--data", "DATA", "evaluate.layer=8"], "evaluate.layer=8 but"),
        (["--model", "init/random", "--tasks", "srt,bogus"], "config key evaluate.tasks.1"),
    ],
)
def test_bad_input_is_one_clear_line(run_dir, capsys, args, message):
    args = [str(run_dir / "data") if a == "DATA" else a for a in args]
    code = main(["evaluate", *args, f"run.dir={run_dir / 'run'}", "tracking.enabled=false", "evaluate.name=bad"])
    assert message in one_line_error(capsys, code)
    assert not (run_dir / "run" / "evaluate" / "bad" / "manifest.json").exists()


def test_one_lang_script_code_runs_retrieval_on_iso_named_files_and_mlm(run_dir, world, capsys):
    # XTREME/LASER names Tatoeba files with the ISO code alone (tatoeba.qac-eng.qac); the held-out shards use qac_Latn.
    data = run_dir / "data_xtreme"
    synthetic.write_retrieval_data(data / "srt", world, "qaa_Latn", ["qac_Latn", "qad_Grek"], n=40, naming="xtreme")
    assert (data / "srt" / "tatoeba.qac-eng.qac").is_file()
    code = main(["evaluate", "--model", "init/random", "--data", str(data), "--tasks", "srt,mlm",
                 f"run.dir={run_dir / 'run'}", "evaluate.layer=-1", "evaluate.name=one-code",
                 "evaluate.languages=[qac_Latn, qab_Cyrl]"])
    assert code == 0
    results = json.loads((run_dir / "run" / "evaluate" / "one-code" / "results.json").read_text())
    assert sorted(results["srt"]) == sorted(results["mlm"]) == ["average", "qac_Latn"]
    assert set(results["srt"]["qac_Latn"]) == {"top1", "top5", "top10"} and results["srt"]["qac_Latn"]["top10"] > 0
    assert results["mlm"]["qac_Latn"]["loss"] > 0
    manifest = json.loads((run_dir / "run" / "evaluate" / "one-code" / "manifest.json").read_text())
    # qab_Cyrl has neither retrieval files nor held-out shards here: listed under the requested code for both tasks.
    assert manifest["skipped"] == {"srt": {"qab_Cyrl": "no parallel files"}, "mlm": {"qab_Cyrl": "no held-out blocks"}}
    assert "srt: skipped qab_Cyrl (no parallel files)" in capsys.readouterr().err

    # The benchmark's own code is accepted as well: `qac` names the srt files and the one qac_* of the shards.
    assert main(["evaluate", "--model", "init/random", "--data", str(data), "--tasks", "srt,mlm",
                 f"run.dir={run_dir / 'run'}", "evaluate.layer=-1", "evaluate.name=own-code",
                 "evaluate.languages=[qac]"]) == 0
    own = json.loads((run_dir / "run" / "evaluate" / "own-code" / "results.json").read_text())
    assert own["srt"]["qac"] == results["srt"]["qac_Latn"] and own["mlm"]["qac"] == results["mlm"]["qac_Latn"]
