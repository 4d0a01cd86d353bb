"""`hyperofa init` end to end: outputs, manifest, MLflow metrics, held-out quality, and bad input."""

import json

import numpy as np
import pytest

from hyperofa_dist.formats.rundir import Stage
from hyperofa_dist.cli import main
from hyperofa_dist.method import assemble as asm
from hyperofa_dist.bench.init import BenchScale, run_bench


@pytest.fixture
def xlmr(tmp_path, init_worlds):
    return init_worlds.fresh_run(init_worlds.get("xlmr", k=8), tmp_path / "run")


def run_init(w, *extra):
    return main(["init", *w.overrides(*extra)])


def mlflow_run(run_dir, run_name):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("hyperofa")
    runs = client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{run_name}'")
    assert len(runs) == 1
    return runs[0]


def mlflow_metrics(run_dir, run_name):
    return mlflow_run(run_dir, run_name).data.metrics


@pytest.mark.slow
def test_ofa_and_hyperofa_stage_outputs_and_mlflow(xlmr, init_worlds, capsys):
    w = xlmr
    assert run_init(w, "init.method=ofa", "tracking.enabled=true", "init.pad_to_multiple_of=64") == 0
    out = w.run_dir / "init" / "ofa"
    manifest = Stage(w.run_dir, "init/ofa").require()
    provenance = np.load(out / "provenance.npy")
    v_t = manifest["counts"]["V_t"]
    assert len(provenance) == v_t == sum(manifest["counts"][f"provenance_{n}"] for n in asm.PROVENANCE_NAMES)
    assert manifest["counts"]["provenance_ofa"] > 0 and manifest["counts"]["provenance_hyperofa"] == 0
    f_t = np.load(out / "F_t.npy")
    assert f_t.shape == (v_t, w.k) and np.load(out / "P.npy").shape == (w.k, w.hidden)
    counts = json.loads((out / "provenance_counts.json").read_text())
    assert counts["overall"] == asm.provenance_counts(provenance)
    assert {"qab", "qad"} <= set(counts["by_language"]) and {"Latn", "Cyrl", "Grek"} <= set(counts["by_script"])
    assert manifest["padded_rows"][0] == v_t and manifest["padded_rows"][1] % 64 == 0
    assert {o["path"] for o in manifest["outputs"]} >= {"F_t.npy", "model/config.json", "model/tokenizer.json"}
    metrics = mlflow_metrics(w.run_dir, "init/ofa")
    assert metrics["provenance/total"] == v_t and metrics["provenance/ofa"] == manifest["counts"]["provenance_ofa"]
    assert "heldout_cosine/ofa" in metrics and metrics["heldout_cosine"] == metrics["heldout_cosine/ofa"]
    tags = mlflow_run(w.run_dir, "init/ofa").data.tags  # the expanded model: a registered version of hyperofa-ofa
    assert tags["init.method"] == "ofa" and tags["hyperofa.stage"] == "init"
    assert tags["hyperofa.model_version"] == "hyperofa-ofa/1" and tags["hyperofa.model_dir"] == str(out / "model")
    # re-running with the same inputs does nothing
    before = (out / "manifest.json").read_bytes()
    assert run_init(w, "init.method=ofa", "init.pad_to_multiple_of=64") == 0
    assert "up to date" in capsys.readouterr().err and (out / "manifest.json").read_bytes() == before

    # HyperOFA: predictions for the OFA set; test-split predictions equal to the truth give cosine 1
    ofa_ids = np.flatnonzero(provenance == asm.OFA)
    rows = np.random.default_rng(0).standard_normal((len(ofa_ids), w.k)).astype(np.float32)
    test = np.load(w.run_dir / "mapping" / "split.npz")["test"]
    truth = np.load(w.run_dir / "mapping" / "coordinates_source.npy")[test]
    init_worlds.write_hypernet(w.run_dir, ofa_ids, rows, test[::-1], truth[::-1])
    assert run_init(w, "init.method=hyperofa", "tracking.enabled=true") == 0
    hyper = w.run_dir / "init" / "hyperofa"
    hprov = np.load(hyper / "provenance.npy")
    np.testing.assert_array_equal(hprov == asm.HYPEROFA, provenance == asm.OFA)
    # init.ofa_centre (the default): the predictions moved onto OFA's mean over the same tokens
    np.testing.assert_allclose(np.load(hyper / "F_t.npy")[ofa_ids], rows - rows.mean(0) + f_t[ofa_ids].mean(0),
                               atol=1e-5)
    # rows that are random in both runs are the same rows (methods comparable row for row)
    both = (hprov == asm.RANDOM) & (provenance == asm.RANDOM)
    np.testing.assert_array_equal(np.load(hyper / "F_t.npy")[both], f_t[both])
    quality = json.loads((hyper / "quality.json").read_text())["heldout_cosine"]
    assert quality["hyperofa"] == pytest.approx(1.0)
    assert quality["ofa"] == json.loads((out / "quality.json").read_text())["heldout_cosine"]["ofa"]
    assert mlflow_metrics(w.run_dir, "init/hyperofa")["heldout_cosine"] == pytest.approx(1.0)


def _error_case(w, capsys, *extra):
    code = run_init(w, *extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert not (w.run_dir / "init").exists()  # nothing written
    return err[-1]


def test_predictions_with_wrong_k_or_ids_out_of_range(xlmr, init_worlds, capsys):
    w = xlmr
    init_worlds.write_hypernet(w.run_dir, np.array([5, 6]), np.ones((2, w.k + 1), np.float32))
    assert "rows have dimension 9 but the mapping's k is 8" in _error_case(w, capsys, "init.method=hyperofa")
    init_worlds.write_hypernet(w.run_dir, np.array([5, 10**6]), np.ones((2, w.k), np.float32))
    assert "id 1000000 is out of range" in _error_case(w, capsys, "init.method=hyperofa")


def test_mapping_built_for_another_source_model(xlmr, init_worlds, tmp_path, capsys):
    from hyperofa_dist import synthetic

    other = synthetic.make_tiny_model("xlmr", xlmr.source_model, tmp_path / "other", hidden_size=16)
    message = _error_case(xlmr, capsys, "init.method=random", f"source.model={other}")
    assert "mapping was built for another source model" in message


def test_target_tokenizer_whose_special_tokens_cannot_be_mapped(xlmr, init_worlds, tmp_path, capsys):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(xlmr.target_tokenizer))
    tok.mask_token = None  # same vocabulary (so the mapping still fits) but no mask token
    tok.save_pretrained(tmp_path / "nomask")
    xlmr.target_tokenizer = tmp_path / "nomask"
    message = _error_case(xlmr, capsys, "init.method=random")
    assert "has no mask_token" in message


def test_bench_small_scale_prints_the_fields(tmp_path):
    scale = BenchScale(target_vocab=3000, source_vocab=2000, source_covered=800, copied=1500, predicted=600,
                       n_words=5000, word_dim=16, k=8, baseline_tokens=64)
    settings = {"top_k": 10, "temperature": 0.1, "chunk_size": 256, "device": "cpu"}
    result = run_bench(scale, settings, tmp_path, seed=0)
    assert result["tokens_predicted"] == 600
    assert sum(result["provenance"].values()) == 3000 and result["provenance"]["ofa"] == 600
    # peak RSS is the process's lifetime peak: inside pytest it includes earlier tests, so only its presence is
    # checked here; `hyperofa bench init` measures it in a fresh process against the 4 GiB target.
    assert result["seconds"] > 0 and result["peak_rss_gib"] > 0
    assert result["baseline_dense_f64_seconds_extrapolated"] > 0


def test_new_token_loss_counts_only_masked_new_tokens_of_held_out_text(xlmr, prepare_format, small_corpus):
    """Held-out shards of the target tokenizer in the run: init reports the masked-LM loss over masked positions whose
    label is a new token, equal to the stock HF loss with every other label ignored."""
    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from hyperofa_dist import synthetic
    from hyperofa_dist.models.mlm import mask_tokens
    from hyperofa_dist.runtime.seeds import HELDOUT, mix_seed

    tok = AutoTokenizer.from_pretrained(str(xlmr.target_tokenizer))
    langs = ("qac_Latn", "qad_Grek")
    blocks = {
        lang: {"heldout": prepare_format.framed_blocks(tok, synthetic.read_lines(small_corpus / f"{lang}.txt", 80), 32)[:6]}
        for lang in langs
    }
    prepare_format.write(xlmr.run_dir / "prepare", blocks, xlmr.target_tokenizer, 32)
    assert run_init(xlmr, "init.method=random", "init.heldout_blocks=5") == 0
    out = xlmr.run_dir / "init" / "random"
    reported = json.loads((out / "quality.json").read_text())["new_token_mlm"]
    assert set(reported["loss"]) == {*langs, "average"}
    model = AutoModelForMaskedLM.from_pretrained(str(out / "model")).eval()
    provenance = np.load(out / "provenance.npy")
    special = torch.tensor(sorted(set(tok.all_special_ids)))
    for lang in langs:
        ids = torch.from_numpy(blocks[lang]["heldout"][:5].astype(np.int64))
        gen = torch.Generator().manual_seed(mix_seed(0, HELDOUT, lang))
        inputs, labels = mask_tokens(ids, special, tok.mask_token_id, len(tok), gen)
        copied = torch.from_numpy(provenance == asm.COPY)
        labels[(labels >= 0) & copied[labels.clamp(min=0)]] = -100
        with torch.no_grad():
            expected = float(model(input_ids=inputs, labels=labels).loss)
        assert reported["loss"][lang] == pytest.approx(expected, abs=1e-4)
        assert reported["positions"][lang] == int((labels >= 0).sum()) > 0
    manifest = Stage(xlmr.run_dir, "init/random").require()
    assert manifest["new_token_mlm_loss"]["average"] == pytest.approx(np.mean([reported["loss"][l] for l in langs]))


def _head(model_dir):
    """The MLM-head weights of a saved model (everything under lm_head./cls. except the tied decoder weight)."""
    from safetensors.torch import load_file

    state = load_file(str(model_dir / "model.safetensors"))
    return {k: v for k, v in state.items() if k.startswith(("lm_head.", "cls.")) and not k.endswith("decoder.weight")}


def test_headless_source_gets_one_seeded_head_for_every_method(tmp_path, init_worlds, capsys):
    import torch

    w = init_worlds.fresh_run(init_worlds.headless("xlmr", k=8), tmp_path / "run")
    assert run_init(w, "init.method=random") == 0
    assert run_init(w, "init.method=ofa") == 0
    random_head, ofa_head = _head(w.run_dir / "init/random/model"), _head(w.run_dir / "init/ofa/model")
    assert {"lm_head.dense.weight", "lm_head.layer_norm.weight"} <= set(random_head)
    assert random_head.keys() == ofa_head.keys()
    for name in random_head:
        torch.testing.assert_close(random_head[name], ofa_head[name], rtol=0, atol=0)
    dense = random_head["lm_head.dense.weight"]
    assert 0.01 < float(dense.std()) < 0.03  # N(0, initializer_range=0.02), not left at zero
    err = capsys.readouterr().err
    assert "warning: the source model" in err and "has no MLM head (missing lm_head.bias" in err
    assert "lm_head.dense.weight" in err and "made from run.seed=0" in err
    manifest = Stage(w.run_dir, "init/ofa").require()
    assert manifest["mlm_head"]["origin"] == "seeded" and manifest["mlm_head"]["seed"] == 0
    assert "lm_head.dense.weight" in manifest["mlm_head"]["missing"]

    # Another run.seed gives another head: the head follows run.seed, not chance.
    other = init_worlds.fresh_run(w, tmp_path / "other")
    assert run_init(other, "init.method=random", "run.seed=1") == 0
    assert not torch.equal(_head(other.run_dir / "init/random/model")["lm_head.dense.weight"], dense)


def test_headless_source_copies_the_head_of_source_mlm_head(tmp_path, init_worlds, capsys):
    import torch

    with_head = init_worlds.get("xlmr", k=8).source_model
    w = init_worlds.fresh_run(init_worlds.headless("xlmr", k=8), tmp_path / "run")
    assert run_init(w, "init.method=random", f"source.mlm_head={with_head}") == 0
    assert f"copied from source.mlm_head={with_head}" in capsys.readouterr().err
    ours, donor = _head(w.run_dir / "init/random/model"), _head(with_head)
    for name in ("lm_head.dense.weight", "lm_head.dense.bias", "lm_head.layer_norm.weight"):
        torch.testing.assert_close(ours[name], donor[name], rtol=0, atol=0)
    manifest = Stage(w.run_dir, "init/random").require()
    assert manifest["mlm_head"] == {"origin": "copied", "donor": str(with_head),
                                    "missing": manifest["mlm_head"]["missing"]}

    # A donor of another family is refused before anything is written.
    bert = init_worlds.get("bert").source_model
    message = _error_case(init_worlds.fresh_run(w, tmp_path / "bad"), capsys, "init.method=random",
                          f"source.mlm_head={bert}")
    assert "source.mlm_head" in message and "cannot give its head" in message
