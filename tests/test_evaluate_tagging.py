"""Zero-shot tagging: readers, > 90% on generated English, zero-shot scores for other languages, seeding, errors."""

from __future__ import annotations

import pytest

from hyperofa_dist import synthetic
from hyperofa_dist.errors import HyperofaError
from hyperofa_dist.evaluate import tagging
from hyperofa_dist.formats.tokenizer import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tagger_model(tmp_path_factory, small_corpus):
    # A 1000-piece tokenizer keeps most generated words whole, so the first subword names the word and a tiny
    # randomly initialised model can learn the tags in a few epochs.
    root = tmp_path_factory.mktemp("tagger")
    texts = synthetic.read_lines(small_corpus / "qaa_Latn.txt")
    tok = synthetic.train_source_tokenizer("xlmr", texts, 1000, root / "tok")
    return synthetic.make_tiny_model("xlmr", tok, root / "model")


SETTINGS = tagging.TaggingSettings(epochs=6, lr=3e-3, batch_size=16, max_length=64, seed=0)


def test_conllu_reader_keeps_words_and_upos(tmp_path):
    path = tmp_path / "test-xx.conllu"
    path.write_text(
        "# text = Im Haus.\n1-2\tIm\t_\t_\t_\t_\t_\t_\t_\t_\n1\tIn\tin\tADP\t_\t_\t_\t_\t_\t_\n"
        "2\tdem\tder\tDET\t_\t_\t_\t_\t_\t_\n3\tHaus\tHaus\tNOUN\t_\t_\t_\t_\t_\t_\n3.1\tx\t_\t_\t_\t_\t_\t_\t_\t_\n\n"
        "1\tJa\tja\t_\t_\t_\t_\t_\t_\t_\n",
        encoding="utf-8",
    )
    sentences = tagging.read_conllu(path)
    assert [(s.words, s.labels) for s in sentences] == [
        (["In", "dem", "Haus"], ["ADP", "DET", "NOUN"]),
        (["Ja"], ["X"]),
    ]


def test_token_label_reader_fills_missing_labels(tmp_path):
    path = tmp_path / "test-xx.tsv"
    path.write_text("Anna\tB-PER\nlebt\nin\tO\n\n\nBerlin\tB-LOC\n", encoding="utf-8")
    sentences = tagging.read_token_label(path, "O")
    assert [(s.words, s.labels) for s in sentences] == [
        (["Anna", "lebt", "in"], ["B-PER", "O", "O"]),
        (["Berlin"], ["B-LOC"]),
    ]


def test_pieces_respect_the_length_budget(tagger_model):
    tok = load_tokenizer(tagger_model)
    sentence = tagging.Sentence(["dyha"] * 30, ["O"] * 30)
    pieces, counts = tagging.to_pieces([sentence], tok, max_length=12)
    assert counts == [len(pieces)] and len(pieces) > 1
    assert all(len(p.input_ids) <= 12 for p in pieces)
    assert sum(len(p.positions) for p in pieces) == 30
    assert all(p.input_ids[0] == tok.cls_token_id and p.input_ids[-1] == tok.sep_token_id for p in pieces)


@pytest.mark.parametrize("task", ["pos", "ner"])
def test_english_above_90_and_zero_shot_reported(tmp_path, world, tagger_model, task):
    synthetic.write_tagging_data(tmp_path, world, task, "qaa_Latn", ["qac_Latn", "qab_Cyrl"], sizes=(200, 40, 60))
    outcome = tagging.evaluate_tagging(
        tagger_model, load_tokenizer(tagger_model), tmp_path, task, settings=SETTINGS
    )
    assert sorted(outcome.per_language) == ["eng_Latn", "qab_Cyrl", "qac_Latn"]
    english = outcome.per_language["eng_Latn"]
    assert english["f1"] > 90.0
    expected = {"f1", "precision", "recall"} | ({"accuracy"} if task == "pos" else set())
    for lang, scores in outcome.per_language.items():
        assert set(scores) == expected
        assert all(0.0 <= v <= 100.0 for v in scores.values())
    if task == "pos":
        assert english["accuracy"] > 90.0
    # Zero-shot is far below English for an untrained encoder: no cross-lingual alignment to transfer through.
    assert outcome.per_language["qab_Cyrl"]["f1"] < english["f1"] - 30
    assert 1 <= outcome.best_epoch <= SETTINGS.epochs and outcome.dev_f1 > 90.0


def test_seeded_runs_are_identical(tmp_path, world, tagger_model):
    synthetic.write_tagging_data(tmp_path, world, "ner", "qaa_Latn", ["qac_Latn"], sizes=(40, 10, 10))
    settings = tagging.TaggingSettings(epochs=1, lr=3e-3, batch_size=8, max_length=64, seed=5)
    tok = load_tokenizer(tagger_model)
    first = tagging.evaluate_tagging(tagger_model, tok, tmp_path, "ner", settings=settings)
    second = tagging.evaluate_tagging(tagger_model, tok, tmp_path, "ner", settings=settings)
    assert first.per_language == second.per_language and first.dev_f1 == second.dev_f1


def test_missing_english_dev_is_an_error(tmp_path, world, tagger_model):
    paths = synthetic.write_tagging_data(tmp_path, world, "pos", "qaa_Latn", [], sizes=(5, 5, 5))
    paths["eng_Latn"]["dev"].unlink()
    with pytest.raises(HyperofaError, match="dev-eng_Latn is missing"):
        tagging.evaluate_tagging(tagger_model, load_tokenizer(tagger_model), tmp_path, "pos", settings=SETTINGS)
