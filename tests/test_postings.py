"""Token -> word postings: the batched chunk core and the Ray builder equal the method's per-word loop."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer

from data_prep.mapping import postings as P
from hyperofa_dist.formats.files import save_npz
from hyperofa_dist.formats.mapping import Postings
from hyperofa_dist.formats.tokenizer import backend_from_json, backend_json
from hyperofa_dist import synthetic


@pytest.fixture(scope="module")
def toks(source_tokenizers):
    return {fam: AutoTokenizer.from_pretrained(str(path)) for fam, path in source_tokenizers.items()}


@pytest.fixture(scope="module")
def keys(world):
    """A generated word vocabulary in three scripts, plus ColexNet+-style `$` n-grams and bare concepts."""
    out = [f"{lang.code[:3]}:{w}" for lang in world.languages for w in world.lexicon[lang.code][:150]]
    return out + ["otq:$ndöhi$", "deu:$haus", "fra:ab$", "water", "$Ölé", "ell:$αβ γδ$", "rus:дом"]


def test_spelling_variants_follow_the_method():
    assert P.spelling_variants("haus", False) == ("haus", " haus", " Haus")
    assert P.spelling_variants(" ndöhi ", True) == (" ndöhi ", "  ndöhi ", "Ndöhi ")
    assert P.key_variants(["otq:$ndöhi$", "deu:haus"]) == [" ndöhi ", "  ndöhi ", "Ndöhi ", "haus", " haus", " Haus"]


@pytest.mark.parametrize("family", synthetic.FAMILIES)
@pytest.mark.parametrize("words_per_task", [1, 97, 100_000])
def test_batched_chunks_equal_the_per_word_loop(toks, keys, family, words_per_task):
    tok = toks[family]
    postings = P.build_local(P.backend_encoder(backend_json(tok)), keys, len(tok), words_per_task)
    indptr, indices = postings.indptr, postings.indices
    assert indptr.dtype == np.int64 and indices.dtype == np.int32 and indptr.shape == (len(tok) + 1,)
    reference = P.reference_postings(tok, keys)
    assert P.csr_equals_lists(postings, reference)
    assert indptr[-1] > len(keys)  # non-trivial: most words give several postings
    assert postings.spellings.max() > 1  # a word often yields a token through several of its spellings


def test_csr_comparison_detects_a_difference(toks, keys):
    tok = toks["xlmr"]
    postings = P.build_local(P.backend_encoder(backend_json(tok)), keys, len(tok), 50)
    reference = P.reference_postings(tok, keys)
    token = next(t for t, words in reference.items() if len(set(words)) > 1)
    dropped = {**reference, token: [w for w in reference[token] if w != reference[token][-1]]}
    assert not P.csr_equals_lists(postings, dropped)  # a word missing
    repeated = next(t for t, words in reference.items() if len(words) > len(set(words)))
    once = {**reference, repeated: sorted(set(reference[repeated]))}
    assert not P.csr_equals_lists(postings, once)  # a word's spelling count wrong


def test_coverage_stats_count_what_the_lists_hold(toks, keys):
    tok = toks["bert"]
    postings = P.build_local(P.backend_encoder(backend_json(tok)), keys, len(tok), 200)
    reference = {t: sorted(set(words)) for t, words in P.reference_postings(tok, keys).items()}
    langs = sorted({k[:3] if k[3:4] == ":" else "eng" for k in keys})
    lang_ids = np.array([langs.index(k[:3] if k[3:4] == ":" else "eng") for k in keys], dtype=np.int32)
    stats = P.coverage_stats(postings, lang_ids, langs, specials=[tok.unk_token_id])
    lengths = [len(v) for v in reference.values()]
    assert stats["covered"] == len(reference) and stats["not_covered"] == len(tok) - len(reference)
    assert stats["postings"] == sum(lengths)
    assert stats["length_percentiles"]["50"] == np.percentile(lengths, 50)
    assert stats["length_percentiles"]["100"] == max(lengths)
    assert stats["covered_special"] == int(tok.unk_token_id in reference)
    for lang in langs:
        mine = {i for i, k in enumerate(keys) if lang_ids[i] == langs.index(lang)}
        per = stats["per_language"][lang]
        assert per["words"] == len(mine)
        assert per["postings"] == sum(len(set(v) & mine) for v in reference.values())
        assert per["tokens"] == sum(1 for v in reference.values() if set(v) & mine)


def test_npz_is_byte_deterministic_and_loadable(tmp_path):
    arrays = {"indptr": np.array([0, 1, 1, 3], dtype=np.int64), "indices": np.array([3, 1, 2], dtype=np.int32),
              "spellings": np.array([1, 3, 2], dtype=np.uint8)}
    a, b = save_npz(tmp_path / "a.npz", **arrays), save_npz(tmp_path / "b.npz", **arrays)
    assert a.read_bytes() == b.read_bytes()
    postings = Postings.load(a)
    indptr, indices = postings.indptr, postings.indices
    np.testing.assert_array_equal(indptr, arrays["indptr"])
    np.testing.assert_array_equal(indices, arrays["indices"])



def test_worker_tokenizer_keeps_unigram_scores_exact(world, tmp_path):
    """Rust's JSON reader can shift Unigram scores by an ulp and flip tied segmentations; workers must not."""
    import json

    from hyperofa_dist.bench.mapping import make_unigram_tokenizer

    words = [w for lang in world.languages for w in world.lexicon[lang.code][:400]]
    tok = AutoTokenizer.from_pretrained(str(make_unigram_tokenizer(words, 1500, tmp_path / "u")))
    rebuilt = backend_from_json(backend_json(tok))
    assert json.loads(rebuilt.to_str())["model"] == json.loads(tok.backend_tokenizer.to_str())["model"]
    keys = [f"{lang.code[:3]}:{w}" for lang in world.languages for w in world.lexicon[lang.code][400:700]]
    postings = P.build_local(P.backend_encoder(backend_json(tok)), keys, len(tok), 500)
    assert P.csr_equals_lists(postings, P.reference_postings(tok, keys))
