"""Zero-shot tagging: readers, > 90% on generated English, zero-shot scores for other languages, seeding, errors."""

from __future__ import annotations

import pytest

from hyperofa_dist import synthetic
from hyperofa_dist.errors import HyperofaError
from hyperofa_dist.evaluate import tagging
from hyperofa_dist.formats.tokenizer import load_tokenizer
from hyperofa_dist.models import sep_token_extra

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


def test_reference_frame_and_budget_253_of_256(tagger_model):
    """XLM-R/RoBERTa: `<s> words </s></s>`, 253 one-piece words per piece of 256; BERT: one `[SEP]`, 254."""
    tok = load_tokenizer(tagger_model)
    assert len(tok("dyha", add_special_tokens=False)["input_ids"]) == 1
    sentence = tagging.Sentence(["dyha"] * 600, ["O"] * 600)
    pieces, counts = tagging.to_pieces([sentence], tok, max_length=256, extra_sep=True)
    assert counts == [3] and [len(p.positions) for p in pieces] == [253, 253, 94]
    assert [len(p.input_ids) for p in pieces] == [256, 256, 97]
    assert all(p.input_ids[0] == tok.cls_token_id and p.input_ids[-2:] == [tok.sep_token_id] * 2 for p in pieces)
    assert pieces[0].positions == list(range(1, 254))
    single, _ = tagging.to_pieces([sentence], tok, max_length=256, extra_sep=False)
    assert [len(p.positions) for p in single] == [254, 254, 92] and single[0].input_ids[-2] != tok.sep_token_id
    assert sep_token_extra("xlm-roberta") and sep_token_extra("roberta")
    assert not sep_token_extra("bert")


def test_pieces_are_scored_as_sequences_unless_sentences_are_asked_for():
    # One sentence "Anna Maria lebt" cut after "Anna": the PER chunk crosses the cut.
    gold = [["B-PER"], ["I-PER", "O"]]
    pred = [["B-PER"], ["I-PER", "O"]]
    by_piece = tagging._score_sequences([2], gold, "piece")
    assert by_piece == gold  # two sequences: seqeval sees two PER chunks, each right
    assert tagging.tagging_scores(by_piece, tagging._score_sequences([2], pred, "piece"), False)["f1"] == 100.0
    by_sentence = tagging._score_sequences([2], gold, "sentence")
    assert by_sentence == [["B-PER", "I-PER", "O"]]
    # A prediction that misses the second half scores 100 per piece (chunk B-PER alone) but 0 per sentence.
    half = [["B-PER"], ["O", "O"]]
    assert tagging.tagging_scores(gold[:1], half[:1], False)["f1"] == 100.0
    assert tagging.tagging_scores(by_sentence, tagging._score_sequences([2], half, "sentence"), False)["f1"] == 0.0


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
    assert outcome.dev_f1 > 90.0 and outcome.candidates[outcome.best_step] == outcome.dev_f1
    assert outcome.steps in outcome.candidates and not outcome.factorised


def test_dev_selection_every_n_steps_keeps_the_earliest_best(tmp_path, world, tagger_model):
    synthetic.write_tagging_data(tmp_path, world, "ner", "qaa_Latn", ["qac_Latn"], sizes=(64, 20, 10))
    settings = tagging.TaggingSettings(epochs=3, lr=3e-3, batch_size=16, max_length=64, seed=0, select_every=3)
    outcome = tagging.evaluate_tagging(tagger_model, load_tokenizer(tagger_model), tmp_path, "ner", settings=settings)
    assert outcome.steps == 12  # 64 sentences / 16 x 3 epochs
    assert sorted(outcome.candidates) == [3, 6, 9, 12]
    best = max(outcome.candidates.values())
    assert outcome.best_step == min(s for s, f1 in outcome.candidates.items() if f1 == best)
    assert outcome.dev_f1 == best
    assert tagging.SELECT_EVERY == {"ner": 1000, "pos": 500}


def test_a_model_with_its_factors_beside_fine_tunes_factorised(tmp_path, world, tagger_model, pretrain_kit):
    factorised = pretrain_kit.factorised_model(tmp_path / "fact", tagger_model, k=24)  # of hidden 32
    synthetic.write_tagging_data(tmp_path / "data", world, "ner", "qaa_Latn", ["qac_Latn"], sizes=(200, 40, 60))
    settings = tagging.TaggingSettings(epochs=6, lr=3e-3, batch_size=16, max_length=64, seed=5,
                                       factors_dir=factorised.parent)
    tok = load_tokenizer(factorised)
    fact = tagging.evaluate_tagging(factorised, tok, tmp_path / "data", "ner", settings=settings)
    settings = tagging.TaggingSettings(epochs=6, lr=3e-3, batch_size=16, max_length=64, seed=5)
    full = tagging.evaluate_tagging(factorised, tok, tmp_path / "data", "ner", settings=settings)
    assert fact.factorised and not full.factorised
    # Same model, same head seed and batches: only the parameterisation differs, and with it the updates.
    assert fact.dev_f1 > 50.0 and full.dev_f1 > 50.0, (fact.dev_f1, full.dev_f1)
    assert fact.per_language != full.per_language


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
