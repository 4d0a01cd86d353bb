"""Every init method on a BERT-family (WordPiece) source, the mean of WordPiece pieces, and the row statistics of
the expanded embeddings (quality.json, manifest, MLflow)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hyperofa_dist import synthetic
from hyperofa_dist.cli import main as cli_main
from hyperofa_dist.errors import HyperofaError
from hyperofa_dist.formats import init as init_format
from hyperofa_dist.formats.mapping import load_mapping
from hyperofa_dist.formats.rundir import Stage
from hyperofa_dist.method import assemble as asm
from hyperofa_dist.init.mean import wordpiece_split
from hyperofa_dist.init.rows import row_metrics, row_statistics

METHODS = ("random", "ofa", "hyperofa", "mean")


def test_wordpiece_split_continues_a_word_for_continuation_tokens():
    vocab = {"[UNK]": 0, "a": 1, "ab": 2, "abc": 3, "##a": 4, "##ab": 5, "##c": 6, "c": 7, "##b": 8}
    split = wordpiece_split(vocab, 0)
    assert split("abc") == [3]  # longest match first
    assert split("abca") == [3, 4]  # after the first piece every piece is a continuation piece
    assert split("##abc") == [5, 6]  # a continuation token: `##ab`, not the word-initial `abc`
    assert split("##cab") == [6, 5]
    assert split("##a") == [4] and split("a") == [1]
    assert split("abx") == [0] and split("##x") == [0]  # a character no piece covers: the unknown token
    assert wordpiece_split(vocab, 0, max_chars=3)("abca") == [0]  # over max_input_chars_per_word, as WordPiece


def test_wordpiece_split_of_a_word_is_the_source_models_own(source_tokenizers, small_corpus):
    from transformers import AutoTokenizer

    from hyperofa_dist.init.mean import piece_splitter

    tok = AutoTokenizer.from_pretrained(str(source_tokenizers["bert"]))
    split = piece_splitter(tok, tok)
    model = tok.backend_tokenizer.model
    words = sorted({w for line in synthetic.read_lines(small_corpus / "qab_Cyrl.txt.gz", 100) for w in line.split()}
                   | {w for line in synthetic.read_lines(small_corpus / "qaa_Latn.txt", 100) for w in line.split()})
    checked = 0
    for word in words:
        word = tok.backend_tokenizer.normalizer.normalize_str(word)
        if not word.isalpha():
            continue
        assert split(word) == [t.id for t in model.tokenize(word)], word
        checked += 1
    assert checked > 100


def test_all_four_methods_run_on_a_bert_source(init_worlds, prepare_format, small_corpus, tmp_path, one_thread):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    w = init_worlds.fresh_run(init_worlds.get("bert", k=8), tmp_path / "run")
    tok = AutoTokenizer.from_pretrained(str(w.target_tokenizer))
    source_tok = AutoTokenizer.from_pretrained(str(w.source_model))
    langs = ("qac_Latn", "qad_Grek")
    lines = {lang: synthetic.read_lines(small_corpus / f"{lang}.txt", 80) for lang in langs}
    blocks = {lang: {"heldout": prepare_format.framed_blocks(tok, lines[lang], 32)[:4]} for lang in langs}
    prepare_format.write(w.run_dir / "prepare", blocks, w.target_tokenizer, 32)
    assert init_worlds.hyperofa_predictions(w.run_dir) > 50
    code = {"ofa": asm.OFA, "hyperofa": asm.HYPEROFA, "mean": asm.MEAN, "random": asm.RANDOM}
    mapping = load_mapping(w.run_dir)
    for method in METHODS:
        assert cli_main(["init", *w.overrides(f"init.method={method}", "init.heldout_blocks=4")]) == 0, method
        out = init_format.model_dir(w.run_dir, method)
        model = AutoModelForMaskedLM.from_pretrained(str(out)).eval()
        assert model.config.model_type == "bert" and model.config.vocab_size == len(tok)
        provenance = np.load(out.parent / init_format.PROVENANCE)
        assert (provenance == code[method]).sum() > 50, method
        quality = json.loads((out.parent / init_format.QUALITY).read_text())
        loss = quality["new_token_mlm"]["loss"]
        assert set(loss) == {*langs, "average"} and all(np.isfinite(v) for v in loss.values())
        assert {"copy", "new", method} <= set(quality["rows"])
        assert quality["rows"]["new"]["rows"] == int((provenance != asm.COPY).sum())

    # mean: word-initial and continuation tokens alike are the mean of the source's pieces for them
    coordinates = np.load(w.run_dir / "init" / "mean" / init_format.COORDINATES)
    provenance = np.load(w.run_dir / "init" / "mean" / init_format.PROVENANCE)
    means = np.flatnonzero(provenance == asm.MEAN)
    strings = tok.convert_ids_to_tokens([int(i) for i in means])
    continuation = [i for i, s in zip(means, strings) if s.startswith("##")]
    initial = [i for i, s in zip(means, strings) if not s.startswith("##")]
    assert len(continuation) > 20 and len(initial) > 20
    source_vocab = source_tok.get_vocab()
    for token_id in continuation[::7] + initial[::7]:
        text = tok.convert_ids_to_tokens(int(token_id))
        pieces = wordpiece_split(source_vocab, source_tok.unk_token_id)(text)
        names = source_tok.convert_ids_to_tokens(pieces)
        assert "".join(n.removeprefix("##") for n in names) == text.removeprefix("##")
        assert all(n.startswith("##") for n in names[1:])
        assert names[0].startswith("##") == text.startswith("##")
        np.testing.assert_allclose(coordinates[token_id], mapping.source_coordinates[pieces].mean(0), atol=1e-6)


# --- row statistics --------------------------------------------------------------------------------------------


def test_row_statistics_of_a_hand_built_example():
    # P scales the first coordinate by 2: E rows are copy (1, 0), (0, 2); hyperofa (3, 0) twice; random (0, -1).
    primitives = np.array([[2.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    coordinates = np.array([[0.5, 0], [1.5, 0], [0, -1], [0, 2], [1.5, 0]], dtype=np.float32)
    provenance = np.array([asm.COPY, asm.HYPEROFA, asm.RANDOM, asm.COPY, asm.HYPEROFA], dtype=np.uint8)
    for chunk in (2, 100):  # chunk boundaries do not change the sums
        stats = row_statistics(coordinates, primitives, provenance, chunk=chunk)
        assert list(stats) == ["copy", "new", "hyperofa", "random"]
        copy, new, hyper, rand = stats["copy"], stats["new"], stats["hyperofa"], stats["random"]
        assert copy == pytest.approx({"rows": 2, "norm_mean": 1.5, "norm_sd": 0.5, "mean_norm": np.sqrt(1.25),
                                      "mean_share": 0.5})
        assert hyper == pytest.approx({"rows": 2, "norm_mean": 3.0, "norm_sd": 0.0, "mean_norm": 3.0,
                                       "mean_share": 1.0, "cosine_to_copy_mean": 1 / np.sqrt(5)})
        assert rand == pytest.approx({"rows": 1, "norm_mean": 1.0, "norm_sd": 0.0, "mean_norm": 1.0,
                                      "mean_share": 1.0, "cosine_to_copy_mean": -2 / np.sqrt(5)})
        # new: (3, 0), (3, 0), (0, -1): norms 3, 3, 1; mean row (2, -1/3)
        assert new == pytest.approx({"rows": 3, "norm_mean": 7 / 3, "norm_sd": np.sqrt(8) / 3,
                                     "mean_norm": np.sqrt(37) / 3, "mean_share": 37 / 57,
                                     "cosine_to_copy_mean": (2 / 3) / (np.sqrt(37) / 3 * np.sqrt(1.25))})
    metrics = row_metrics(stats)
    assert metrics["rows/new/mean_norm"] == pytest.approx(np.sqrt(37) / 3) and metrics["rows/copy/rows"] == 2
    assert "rows/copy/cosine_to_copy_mean" not in metrics


def test_init_writes_row_statistics_to_quality_manifest_and_mlflow(init_worlds, tmp_path, one_thread, capsys):
    from mlflow.tracking import MlflowClient

    w = init_worlds.fresh_run(init_worlds.get("xlmr", k=8), tmp_path / "run")
    assert cli_main(["init", *w.overrides("init.method=random", "tracking.enabled=true")]) == 0
    out = w.run_dir / "init" / "random"
    expected = row_statistics(np.load(out / init_format.COORDINATES), np.load(out / init_format.PRIMITIVES),
                              np.load(out / init_format.PROVENANCE))
    assert set(expected) == {"copy", "new", "random"}
    flat = row_metrics(expected)
    assert row_metrics(json.loads((out / init_format.QUALITY).read_text())["rows"]) == pytest.approx(flat)
    assert row_metrics(Stage(w.run_dir, "init/random").require()["rows"]) == pytest.approx(flat)
    client = MlflowClient(tracking_uri=f"sqlite:///{w.run_dir / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("hyperofa").experiment_id],
                             filter_string="attributes.run_name = 'init/random'")[0]
    for name, value in flat.items():
        assert run.data.metrics[name] == pytest.approx(value)
    new = expected["new"]
    assert f"new rows: norm {new['norm_mean']:.3g} ± {new['norm_sd']:.3g}" in capsys.readouterr().err


# --- init.recentre ---------------------------------------------------------------------------------------------


def test_recentre_moves_the_predicted_rows_mean_onto_the_copied_rows_mean():
    coordinates = np.array([[1, 1], [3, 1], [10, 0], [12, 4], [5, 5]], dtype=np.float32)
    provenance = np.array([asm.COPY, asm.COPY, asm.OFA, asm.OFA, asm.RANDOM], dtype=np.uint8)
    shift = asm.recentre(coordinates, provenance, asm.OFA)
    np.testing.assert_allclose(shift, [-9, -1])  # copied mean (2, 1) minus OFA mean (11, 2)
    np.testing.assert_allclose(coordinates, [[1, 1], [3, 1], [1, -1], [3, 3], [5, 5]])  # others untouched
    assert not asm.recentre(coordinates, provenance, asm.HYPEROFA).any()  # no such rows: nothing moves


def _world_with_predictions(init_worlds, tmp_path):
    """A fresh xlmr run with hypernet predictions for every token HyperOFA predicts: (world, ids, rows)."""
    from hyperofa_dist.method.hypernet.predict import tokens_to_predict

    w = init_worlds.fresh_run(init_worlds.get("xlmr", k=8), tmp_path / "run")
    mapping = load_mapping(w.run_dir)
    ids = tokens_to_predict(mapping.target_postings, mapping.overlap_target)
    rows = np.random.default_rng(0).standard_normal((len(ids), w.k)).astype(np.float32) * 0.05 + 0.2
    init_worlds.write_hypernet(w.run_dir, ids, rows)
    return w, ids, rows


def test_init_recentre_shifts_only_the_predicted_rows(init_worlds, tmp_path, one_thread):
    w, ids, rows = _world_with_predictions(init_worlds, tmp_path)
    plain, moved = init_worlds.fresh_run(w, tmp_path / "plain"), w
    init_worlds.write_hypernet(plain.run_dir, ids, rows)
    assert cli_main(["init", *plain.overrides("init.method=hyperofa", "init.ofa_centre=false")]) == 0
    assert cli_main(["init", *moved.overrides("init.method=hyperofa", "init.recentre=true", "init.ofa_centre=false")]) == 0
    (a, pa), (b, pb) = ((np.load(r.run_dir / "init/hyperofa" / init_format.COORDINATES),
                         np.load(r.run_dir / "init/hyperofa" / init_format.PROVENANCE)) for r in (plain, moved))
    np.testing.assert_array_equal(pa, pb)
    predicted, copied = pa == asm.HYPEROFA, pa == asm.COPY
    np.testing.assert_array_equal(a[~predicted], b[~predicted])
    shift = b[predicted] - a[predicted]
    np.testing.assert_allclose(shift, np.broadcast_to(shift[0], shift.shape), atol=1e-6)  # one shift for all
    np.testing.assert_allclose(b[predicted].mean(0), b[copied].mean(0), atol=1e-6)
    stats = {name: json.loads((r.run_dir / "init/hyperofa" / init_format.QUALITY).read_text())["rows"]
             for name, r in (("plain", plain), ("moved", moved))}
    assert stats["plain"]["hyperofa"]["cosine_to_copy_mean"] < 0.9
    assert stats["moved"]["hyperofa"]["cosine_to_copy_mean"] == pytest.approx(1.0, abs=1e-5)
    assert stats["moved"]["hyperofa"]["mean_norm"] == pytest.approx(stats["moved"]["copy"]["mean_norm"], rel=1e-4)
    manifest = Stage(moved.run_dir, "init/hyperofa").require()
    assert manifest["recentre_shift_norm"] == pytest.approx(float(np.linalg.norm(shift[0])), rel=1e-5)


# --- init.ofa_blend --------------------------------------------------------------------------------------------


def test_blend_mixes_each_predicted_row_with_the_other_methods_row_of_the_same_token():
    ids = np.array([7, 3, 9])
    rows = np.array([[1, 0], [0, 1], [2, 2]], dtype=np.float32)
    other_ids = np.array([9, 7, 3, 5])  # another order, and a token without a prediction
    other = np.array([[0, 0], [3, 4], [2, -1], [9, 9]], dtype=np.float32)
    np.testing.assert_allclose(asm.blend(ids, rows, other_ids, other, 0.25), [[1.5, 1], [0.5, 0.5], [1.5, 1.5]])
    np.testing.assert_allclose(asm.blend(ids, rows, other_ids, other, 0.0), rows)
    with pytest.raises(HyperofaError, match="init.ofa_blend: token 9"):
        asm.blend(ids, rows, other_ids[1:], other[1:], 0.5)


def test_init_ofa_blend_averages_hyperofa_rows_with_ofa_rows(init_worlds, tmp_path, one_thread):
    w, ids, rows = _world_with_predictions(init_worlds, tmp_path)
    assert cli_main(["init", *w.overrides("init.method=ofa")]) == 0
    assert cli_main(["init", *w.overrides("init.method=hyperofa", "init.ofa_centre=false")]) == 0
    plain = np.load(w.run_dir / "init/hyperofa" / init_format.COORDINATES)
    assert cli_main(["init", *w.overrides("init.method=hyperofa", "init.ofa_blend=0.5", "init.ofa_centre=false")]) == 0
    blended = np.load(w.run_dir / "init/hyperofa" / init_format.COORDINATES)
    ofa = np.load(w.run_dir / "init/ofa" / init_format.COORDINATES)
    provenance = np.load(w.run_dir / "init/hyperofa" / init_format.PROVENANCE)
    ofa_provenance = np.load(w.run_dir / "init/ofa" / init_format.PROVENANCE)
    predicted = provenance == asm.HYPEROFA
    assert predicted.sum() > 10
    np.testing.assert_array_equal(ofa_provenance[predicted], asm.OFA)  # OFA initialises the same tokens
    np.testing.assert_allclose(blended[predicted], 0.5 * plain[predicted] + 0.5 * ofa[predicted], atol=1e-6)
    np.testing.assert_array_equal(blended[~predicted], plain[~predicted])  # copies and random rows unchanged
    assert not np.allclose(blended[predicted], plain[predicted])


# --- init.ofa_centre -------------------------------------------------------------------------------------------


def test_centre_on_moves_rows_onto_the_other_rows_mean_and_keeps_their_offsets():
    rows = np.array([[1, 0], [3, 2]], dtype=np.float32)  # mean (2, 1)
    other = np.array([[10, 10], [0, 0], [-4, 5]], dtype=np.float32)  # mean (2, 5)
    np.testing.assert_allclose(asm.centre_on(rows, other), [[1, 4], [3, 6]])


def test_init_ofa_centre_gives_hyperofa_rows_ofas_mean_and_the_hypernetworks_offsets(init_worlds, tmp_path, one_thread):
    w, ids, rows = _world_with_predictions(init_worlds, tmp_path)
    assert cli_main(["init", *w.overrides("init.method=ofa")]) == 0
    assert cli_main(["init", *w.overrides("init.method=hyperofa", "init.ofa_centre=false")]) == 0
    plain = np.load(w.run_dir / "init/hyperofa" / init_format.COORDINATES)
    assert cli_main(["init", *w.overrides("init.method=hyperofa", "init.ofa_centre=true")]) == 0
    centred = np.load(w.run_dir / "init/hyperofa" / init_format.COORDINATES)
    ofa = np.load(w.run_dir / "init/ofa" / init_format.COORDINATES)
    predicted = np.load(w.run_dir / "init/hyperofa" / init_format.PROVENANCE) == asm.HYPEROFA
    assert predicted.sum() > 10
    np.testing.assert_allclose(centred[predicted].mean(0), ofa[predicted].mean(0), atol=1e-5)
    offsets = centred[predicted] - plain[predicted]
    np.testing.assert_allclose(offsets, np.broadcast_to(offsets[0], offsets.shape), atol=1e-5)  # one shift for all
    assert np.linalg.norm(offsets[0]) > 0.05  # the generated predictions sit at 0.2, away from OFA's mean
    np.testing.assert_array_equal(centred[~predicted], plain[~predicted])  # copies and random rows unchanged


def test_hyperofa_rows_blends_then_centres_and_needs_ofa_only_when_combining():
    ids = np.array([4, 2])
    predicted = np.array([[1, 0], [3, 2]], dtype=np.float32)
    ofa = np.array([[5, 5], [1, 1]], dtype=np.float32)  # mean (3, 3)
    assert asm.hyperofa_rows(ids, predicted, None, 0.0, False) is predicted  # the reference: untouched
    np.testing.assert_allclose(asm.hyperofa_rows(ids, predicted, ofa, 0.5, False), [[3, 2.5], [2, 1.5]])
    np.testing.assert_allclose(asm.hyperofa_rows(ids, predicted, ofa, 0.0, True), [[2, 2], [4, 4]])
    np.testing.assert_allclose(asm.hyperofa_rows(ids, predicted, ofa, 0.5, True), [[3.5, 3.5], [2.5, 2.5]])
    with pytest.raises(HyperofaError, match="needs OFA's rows"):
        asm.hyperofa_rows(ids, predicted, None, 0.0, True)
