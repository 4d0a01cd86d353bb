"""Joined tokenizer calls: every string gets exactly the tokens it gets alone, and a wrong split is caught."""

from __future__ import annotations

import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from data_prep.mapping import joined_encoding as J
from data_prep.mapping import postings as P
from hyperofa_dist.formats.tokenizer import backend_from_json, backend_json
from hyperofa_dist import synthetic

# ColexNet+-style keys whose variants stress a split: `$` boundaries (inner, leading and trailing spaces),
# characters that normalise to several (ﬁ, Ⅻ, İ, ß, ǅ, full-width), combining marks, Greek final sigma, CJK
# (BERT pads it with spaces), characters no test vocabulary holds, and text of added tokens.
TRICKY_KEYS = [
    "otq:$ndöhi$", "deu:$haus", "fra:ab$", "ell:$αβ γδ$", "ell:ΟΔΟΣ", "ell:$οδος", "deu:straße", "tur:İstanbul",
    "eng:ﬁsh", "eng:$ﬁre$fly", "lat:Ⅻ", "hrv:ǅemal", "eng:ＡＢＣ", "fra:e\u0301te\u0301", "fra:\u0301e", "zho:漢字",
    "zho:$漢 字$", "eng:☃snow", "eng:𝔘𝔫", "eng:x\u00a0y", "eng:a\tb", "eng:<s>", "eng:$<mask>x", "eng:[UNK]",
    "eng:[MASK]$a", "fra:l'eau", "eng:12,5", "eng:…", "water", "$Ölé", "rus:дом", "eng:a$b$c$d",
]


@pytest.fixture(scope="module")
def toks(source_tokenizers):
    return {fam: AutoTokenizer.from_pretrained(str(path)) for fam, path in source_tokenizers.items()}


@pytest.fixture(scope="module")
def keys(world):
    return TRICKY_KEYS + [f"{lang.code[:3]}:{w}" for lang in world.languages for w in world.lexicon[lang.code][:120]]


def _rows(flat: J.FlatEncoding, n: int) -> list[list[int]]:
    ids, owner = flat
    return [ids[owner == i].tolist() for i in range(n)]


@pytest.mark.parametrize("family", synthetic.FAMILIES)
@pytest.mark.parametrize("per_sequence", [J.STRINGS_PER_SEQUENCE, 50])
def test_joined_calls_give_each_string_its_own_tokens(toks, keys, family, per_sequence, monkeypatch):
    monkeypatch.setattr(J, "STRINGS_PER_SEQUENCE", per_sequence)  # one joined sequence, and many in one call
    tok = toks[family]
    encoder = J.JoinedEncoder(backend_from_json(backend_json(tok)))
    texts = list(dict.fromkeys(P.key_variants(keys))) + list(J.PROBES)
    got = encoder(texts)
    assert encoder.joined  # the joined path itself was checked, not the fallback
    assert np.all(np.diff(got[1]) >= 0)  # tokens grouped by string, in order
    assert _rows(got, len(texts)) == [tok.encode(t, add_special_tokens=False) for t in texts]


@pytest.mark.parametrize("family", synthetic.FAMILIES)
@pytest.mark.parametrize("words_per_task", [7, 100_000])
def test_postings_of_tricky_words_equal_the_per_word_loop(toks, keys, family, words_per_task):
    tok = toks[family]
    postings = P.build_local(P.backend_encoder(backend_json(tok)), keys, len(tok), words_per_task)
    assert P.csr_equals_lists(postings, P.reference_postings(tok, keys))


def _space_joined(tok, texts):
    """The tempting shortcut: one text joined by spaces, tokens cut back by character offsets."""
    encoding = tok.encode(" ".join(texts), add_special_tokens=False)
    ends = np.cumsum([len(t) + 1 for t in texts])
    owner = np.searchsorted(ends, [start for start, _ in encoding.offsets], side="right")
    return np.asarray(encoding.ids, dtype=np.int64), np.minimum(owner, len(texts) - 1).astype(np.int64)


def _wrong_in_context(tok, texts):
    """Right on short inputs (the probes), wrong for the strings of a long call: loses each string's last token."""
    ids, owner = J.one_sequence(tok, texts)
    if len(texts) <= len(J.PROBES):
        return ids, owner
    last = np.r_[owner[1:] != owner[:-1], True]
    return ids[~last], owner[~last]


@pytest.mark.parametrize("family", synthetic.FAMILIES)
def test_a_wrong_split_is_caught_and_encoding_falls_back(toks, keys, family, caplog):
    tok = toks[family]
    rust = backend_from_json(backend_json(tok))
    texts = list(dict.fromkeys(P.key_variants(keys)))
    want = _rows(J.per_string(rust, texts), len(texts))

    # Byte-level BPE keeps the space (`Ġhaus` vs `haus`): the shortcut is wrong there and the probes say so.
    # Where the pre-tokenizer drops whitespace first (these Metaspace and BERT pipelines) it happens to be right.
    shortcut = J.JoinedEncoder(rust, bulk=_space_joined)
    if family == "roberta":
        assert not shortcut.joined and "probe strings" in caplog.text
    assert _rows(shortcut(texts), len(texts)) == want

    sneaky = J.JoinedEncoder(rust, bulk=_wrong_in_context)
    assert sneaky.joined  # the probes pass ...
    assert _rows(sneaky(texts), len(texts)) == want  # ... the chunk's sample does not, and the chunk is redone
    assert not sneaky.joined and "sample of a chunk" in caplog.text


def test_a_length_limit_left_in_the_tokenizer_does_not_cut_words(toks, keys):
    """HF calls can leave truncation in the backend's JSON; a joined call must not inherit it."""
    tok = toks["xlmr"]
    blob = json.loads(backend_json(tok))
    blob["truncation"] = {"direction": "Right", "max_length": 3, "strategy": "LongestFirst", "stride": 0}
    postings = P.build_local(P.backend_encoder(json.dumps(blob)), keys, len(tok), 50)
    assert P.csr_equals_lists(postings, P.reference_postings(tok, keys))
    from tokenizers import Tokenizer

    with pytest.raises(ValueError, match="truncation"):
        J.JoinedEncoder(Tokenizer.from_str(json.dumps(blob)))


def _with_pre_tokenizer(tok, **metaspace) -> str:
    """The tokenizer's JSON with its Metaspace step changed (the xlmr fixture: WhitespaceSplit, then Metaspace)."""
    blob = json.loads(backend_json(tok))
    parts = blob["pre_tokenizer"]["pretokenizers"]
    assert [p["type"] for p in parts] == ["WhitespaceSplit", "Metaspace"]
    parts[1].update(metaspace)
    return json.dumps(blob)


def _differs_with_a_leading_space(rust, texts) -> bool:
    return any(rust.encode(" " + t, add_special_tokens=False).ids != rust.encode(t, add_special_tokens=False).ids for t in texts)


@pytest.mark.parametrize("family", synthetic.FAMILIES)
def test_leading_space_reuse_only_where_the_pipeline_drops_it(toks, keys, family):
    tok = toks[family]
    rust = backend_from_json(backend_json(tok))
    texts = list(dict.fromkeys(P.key_variants(keys))) + list(J.PROBES)
    encoder = J.JoinedEncoder(rust)
    # Whitespace-dropping pipelines (these Metaspace "always" and BERT ones) reuse; byte-level BPE keeps `Ġ`.
    assert encoder.strips_leading_spaces == (family != "roberta")
    assert _differs_with_a_leading_space(rust, texts) == (family == "roberta")
    postings = P.build_local(encoder, keys, len(tok), 60)
    assert encoder.strips_leading_spaces == (family != "roberta")
    assert P.csr_equals_lists(postings, P.reference_postings(tok, keys))


def test_pipelines_where_a_leading_space_matters_are_not_allowed(toks, keys):
    tok = toks["xlmr"]
    texts = list(dict.fromkeys(P.key_variants(keys)))
    # Metaspace "first" prepends only at offset 0, which ' ' + s moves: the reuse would be wrong there.
    first = backend_from_json(_with_pre_tokenizer(tok, prepend_scheme="first"))
    assert _differs_with_a_leading_space(first, texts)
    assert not J.drops_leading_spaces(first) and not J.JoinedEncoder(first).strips_leading_spaces
    assert J.drops_leading_spaces(backend_from_json(_with_pre_tokenizer(tok, prepend_scheme="never")))
    for change in (
        {"normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}},
        {"normalizer": {"type": "Prepend", "prepend": "\u2581"}},
        {"pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True}},
    ):
        blob = json.loads(backend_json(tok))
        blob.update(change)
        assert not J.drops_leading_spaces(backend_from_json(json.dumps(blob))), change
    blob = json.loads(backend_json(tok))
    blob["added_tokens"].append({**blob["added_tokens"][-1], "id": len(tok), "content": " <x>"})
    assert not J.drops_leading_spaces(backend_from_json(json.dumps(blob)))


def test_a_wrong_leading_space_reuse_is_caught(toks, keys, monkeypatch, caplog):
    """Forced onto Metaspace "first": the probes refuse it; without probes, the chunk's sample does."""
    from transformers import PreTrainedTokenizerFast

    first_json = _with_pre_tokenizer(toks["xlmr"], prepend_scheme="first")
    first = backend_from_json(first_json)
    reference = P.reference_postings(PreTrainedTokenizerFast(tokenizer_object=backend_from_json(first_json)), keys)
    monkeypatch.setattr(J, "drops_leading_spaces", lambda tok: True)

    refused = J.JoinedEncoder(first)
    assert not refused.strips_leading_spaces and "leading space changes the tokens of probe strings" in caplog.text
    assert P.csr_equals_lists(P.build_local(refused, keys, first.get_vocab_size(), 60), reference)

    monkeypatch.setattr(J, "PROBES", ())
    sneaky = J.JoinedEncoder(first)
    assert sneaky.strips_leading_spaces and sneaky.joined
    assert P.csr_equals_lists(P.build_local(sneaky, keys, first.get_vocab_size(), 60), reference)
    assert not sneaky.strips_leading_spaces and "on a sample of a chunk" in caplog.text
