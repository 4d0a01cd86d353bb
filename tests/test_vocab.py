"""Tokenizer families, standardisation and overlap against a brute-force check; special tokens by role."""

from __future__ import annotations

import itertools

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from hyperofa_dist import synthetic
from hyperofa_dist.vocab import (
    KIND_EXACT,
    KIND_FUZZY,
    KIND_SPECIAL,
    compute_overlap,
    detect_family,
    same_vocabulary,
    special_ids,
    standardised_pieces,
)

FAMILY_OF = {"xlmr": "sentencepiece", "roberta": "bytelevel", "bert": "wordpiece"}


@pytest.fixture(scope="module")
def toks(source_tokenizers, small_corpus, tmp_path_factory):
    """The three source families plus a multilingual SentencePiece-style target."""
    out = {fam: AutoTokenizer.from_pretrained(str(path)) for fam, path in source_tokenizers.items()}
    texts = [line for p in sorted(small_corpus.iterdir()) for line in synthetic.read_lines(p, limit=150)]
    target = synthetic.train_source_tokenizer("xlmr", texts, 500, tmp_path_factory.mktemp("tgt") / "t")
    out["target"] = AutoTokenizer.from_pretrained(str(target))
    return out


def test_family_detection(toks):
    for fam, expected in FAMILY_OF.items():
        assert detect_family(toks[fam]) == expected
    assert detect_family(toks["target"]) == "sentencepiece"


def test_standardisation_per_family(toks):
    xlmr = toks["xlmr"]
    strings = standardised_pieces(xlmr)
    for token_id in range(len(xlmr)):
        piece = xlmr.convert_ids_to_tokens(token_id)
        expected = None if token_id in special_ids(xlmr) else piece.replace("\u2581", " ")
        assert strings[token_id] == expected
    bert = toks["bert"]
    strings = standardised_pieces(bert)
    for token_id in range(len(bert)):
        piece = bert.convert_ids_to_tokens(token_id)
        if token_id not in special_ids(bert):
            assert strings[token_id] == (piece[2:] if piece.startswith("##") else " " + piece)
    roberta = toks["roberta"]
    strings = standardised_pieces(roberta)
    for token_id in range(len(roberta)):
        if token_id not in special_ids(roberta):
            assert strings[token_id] == roberta.decode([token_id])  # the method's byte-level rule


def brute_force_overlap(target, source):
    """Independent, quadratic restatement of the rules: specials by role, exact (lowest/same-piece source id),
    fuzzy (lowercase; among source strings the lexicographically last wins)."""
    s_str, t_str = standardised_pieces(source), standardised_pieces(target)
    expected = {}
    roles = {"cls": "bos", "bos": "cls", "sep": "eos", "eos": "sep", "pad": None, "unk": None, "mask": None}
    for role in ("cls", "bos", "sep", "eos", "pad", "unk", "mask"):
        t_id = getattr(target, f"{role}_token_id")
        if t_id is None or t_id in expected:
            continue
        s_id = getattr(source, f"{role}_token_id")
        if s_id is None and roles[role]:
            s_id = getattr(source, f"{roles[role]}_token_id")
        if s_id is not None:
            expected[t_id] = (s_id, KIND_SPECIAL)
    same = detect_family(source) == detect_family(target)
    for t_id, t in enumerate(t_str):
        if t is None:
            continue
        exact = [s_id for s_id, s in enumerate(s_str) if s == t]
        if exact:
            piece = [s for s in exact if same and source.convert_ids_to_tokens(s) == target.convert_ids_to_tokens(t_id)]
            expected[t_id] = ((piece or exact)[0] if len(exact) > 1 else exact[0], KIND_EXACT)
            continue
        reps = {}
        for s_id, s in enumerate(s_str):
            if s is not None and s not in reps:
                reps[s] = s_id
        lowered = [(s, i) for s, i in reps.items() if s.lower() == t.lower()]
        if lowered:
            expected[t_id] = (max(lowered)[1], KIND_FUZZY)
    return expected


@pytest.mark.parametrize("target_name,source_name", list(itertools.product(["target", "xlmr", "roberta", "bert"], ["xlmr", "roberta", "bert"])))
def test_overlap_equals_brute_force(toks, target_name, source_name):
    target, source = toks[target_name], toks[source_name]
    overlap = compute_overlap(target, source)
    got = {int(t): (int(s), int(k)) for t, s, k in zip(overlap.target_ids, overlap.source_ids, overlap.kinds)}
    assert got == brute_force_overlap(target, source)
    assert list(overlap.target_ids) == sorted(got)
    assert overlap.target_ids.dtype.name == overlap.source_ids.dtype.name == "int64"
    assert overlap.stats["exact"] + overlap.stats["fuzzy"] + overlap.stats["special"] == len(overlap)
    if target_name == source_name:
        assert got == {i: (i, got[i][1]) for i in range(len(target))}  # a tokenizer overlaps itself as identity


def test_specials_pair_by_role_not_by_spelling(toks):
    bert, xlmr = toks["bert"], toks["xlmr"]
    pairs = {int(t): int(s) for t, s, k in zip(*[getattr(compute_overlap(bert, xlmr), a) for a in ("target_ids", "source_ids", "kinds")]) if k == KIND_SPECIAL}
    assert pairs == {
        bert.cls_token_id: xlmr.cls_token_id,
        bert.sep_token_id: xlmr.sep_token_id,
        bert.pad_token_id: xlmr.pad_token_id,
        bert.unk_token_id: xlmr.unk_token_id,
        bert.mask_token_id: xlmr.mask_token_id,
    }


def _unigram(pieces, specials=()):
    tok = Tokenizer(models.Unigram([(p, -1.0) for p in pieces]))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok)
    return hf


def test_fuzzy_match_on_source_id_zero_is_kept():
    source = _unigram(["\u2581Haus", "\u2581der", "a", "b"])  # id 0 is a real word piece
    target = _unigram(["x", "\u2581haus", "\u2581Der", "\u2581der"])
    overlap = compute_overlap(target, source)
    got = {int(t): (int(s), int(k)) for t, s, k in zip(overlap.target_ids, overlap.source_ids, overlap.kinds)}
    assert got == {1: (0, KIND_FUZZY), 2: (1, KIND_FUZZY), 3: (1, KIND_EXACT)}


def test_byte_fragment_collisions_are_counted_and_resolved_to_the_lowest_id(toks):
    roberta = toks["roberta"]
    strings = standardised_pieces(roberta)
    fffd = [i for i, s in enumerate(strings) if s is not None and "\ufffd" in s]
    assert len(fffd) > 1  # lone UTF-8 lead/continuation bytes all decode to U+FFFD
    overlap = compute_overlap(toks["target"], roberta)
    shared = overlap.stats["source_collisions"]
    assert shared["strings"] >= 1 and shared["ids_shadowed"] >= len([i for i in fffd if strings[i] == "\ufffd"]) - 1


def test_same_vocabulary(toks):
    assert same_vocabulary(toks["xlmr"], AutoTokenizer.from_pretrained(toks["xlmr"].name_or_path))
    assert not same_vocabulary(toks["xlmr"], toks["target"])
