"""OFA baseline: the chunked top-k implementation equals a brute-force dense one (docs/METHOD.md §2)."""

import numpy as np
import pytest

from hyperofa_dist.errors import HyperofaError
from hyperofa_dist.formats.mapping import Postings
from hyperofa_dist.method.ofa import ofa_for_tokens, ofa_predict, token_mean_vectors


def random_postings(rng, vocab, n_words, covered_share=0.7, max_len=9):
    lengths = np.where(rng.random(vocab) < covered_share, rng.integers(1, max_len, vocab), 0)
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    indices = np.concatenate(
        [np.sort(rng.choice(n_words, n, replace=False)) for n in lengths] or [np.zeros(0)]
    ).astype(np.int32)
    return indptr, indices


def dense_ofa(t_post, s_post, words, f_s, token_ids, top_k, temperature, exclude=()):
    """The method written the obvious way: float64, whole V_t x V_s similarity matrix, full argsort."""
    def means(indptr, indices, ids):
        out = np.zeros((len(ids), words.shape[1]))
        for row, t in enumerate(ids):
            members = indices[indptr[t] : indptr[t + 1]]
            if len(members):
                out[row] = words[members].astype(np.float64).mean(0)
        return out

    v_s = len(s_post[0]) - 1
    candidates = np.array([s for s in range(v_s) if s_post[0][s + 1] > s_post[0][s] and s not in set(exclude)])
    e_s = means(*s_post, candidates)
    e_t = means(*t_post, token_ids)
    sims = (e_t / np.linalg.norm(e_t, axis=1, keepdims=True)) @ (e_s / np.linalg.norm(e_s, axis=1, keepdims=True)).T
    out = np.zeros((len(token_ids), f_s.shape[1]))
    for row in range(len(token_ids)):
        top = np.argsort(-sims[row])[:top_k]
        w = np.exp(sims[row, top] / temperature)
        out[row] = (w / w.sum()) @ f_s[candidates[top]].astype(np.float64)
    return out


@pytest.fixture
def small_problem():
    rng = np.random.default_rng(3)
    n_words, dim, k = 300, 12, 6
    words = rng.standard_normal((n_words, dim)).astype(np.float32)
    s_post = random_postings(rng, 80, n_words)
    t_post = random_postings(rng, 130, n_words)
    f_s = rng.standard_normal((80, k)).astype(np.float32)
    covered_t = np.flatnonzero(np.diff(t_post[0]) > 0)
    return words, s_post, t_post, f_s, covered_t


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_chunked_ofa_equals_dense_bruteforce(small_problem, chunk_size):
    words, s_post, t_post, f_s, covered_t = small_problem
    got = ofa_for_tokens(Postings(*t_post), Postings(*s_post), words, f_s, covered_t, top_k=10, temperature=0.1, chunk_size=chunk_size)
    want = dense_ofa(t_post, s_post, words, f_s, covered_t, 10, 0.1)
    assert got.shape == (len(covered_t), f_s.shape[1])
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_excluded_sources_are_never_neighbours(small_problem):
    words, s_post, _, f_s, _ = small_problem
    covered_s = np.flatnonzero(np.diff(s_post[0]) > 0)
    test = covered_s[::5]
    got = ofa_for_tokens(Postings(*s_post), Postings(*s_post), words, f_s, test, exclude_sources=test, top_k=3, temperature=0.5,
                         chunk_size=4)
    want = dense_ofa(s_post, s_post, words, f_s, test, 3, 0.5, exclude=test)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # without the exclusion a token's own row dominates its estimate (it is its own nearest neighbour)
    own = ofa_for_tokens(Postings(*s_post), Postings(*s_post), words, f_s, test, top_k=3, temperature=0.01)
    np.testing.assert_allclose(own, f_s[test], atol=1e-4)
    assert not np.allclose(got, f_s[test], atol=1e-2)


def test_mean_vectors_bounded_gather_equals_plain_mean(small_problem):
    words, _, t_post, _, _ = small_problem
    ids = np.arange(len(t_post[0]) - 1)
    plain = np.array([
        words[t_post[1][t_post[0][t] : t_post[0][t + 1]]].mean(0) if t_post[0][t + 1] > t_post[0][t]
        else np.zeros(words.shape[1]) for t in ids
    ])
    for budget in (1, 3, 10_000):  # 1 and 3 force the block path for long posting lists
        np.testing.assert_allclose(token_mean_vectors(*t_post, words, ids, gather_entries=budget), plain, atol=1e-6)


def test_fewer_candidates_than_top_k_and_bad_settings():
    rng = np.random.default_rng(0)
    cand = rng.standard_normal((3, 4)).astype(np.float32)
    coords = rng.standard_normal((3, 2)).astype(np.float32)
    out = ofa_predict(cand[:1], cand, coords, top_k=10, temperature=1e6)  # huge temperature: plain mean of all 3
    np.testing.assert_allclose(out[0], coords.mean(0), atol=1e-5)
    with pytest.raises(HyperofaError, match="temperature"):
        ofa_predict(cand, cand, coords, temperature=0)
    with pytest.raises(HyperofaError, match="no candidate"):
        ofa_predict(cand, cand[:0], coords[:0])


def test_a_word_weighs_as_many_spellings_as_yield_the_token():
    """The reference's worked example: token T comes from word 0 through two spellings and from word 1 through one,
    so its mean is (2 v0 + v1) / 3; counted once per word it would be (v0 + v1) / 2."""
    words = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    target = Postings(np.array([0, 2]), np.array([0, 1], dtype=np.int32), np.array([2, 1], dtype=np.uint8))
    np.testing.assert_allclose(
        token_mean_vectors(target.indptr, target.indices, words, [0], weights=target.spellings), [[2 / 3, 1 / 3]]
    )
    np.testing.assert_allclose(token_mean_vectors(target.indptr, target.indices, words, [0]), [[0.5, 0.5]])
    # Two source tokens, one per word; OFA over both with temperature 0.1.
    source = Postings(np.array([0, 1, 2]), np.array([0, 1], dtype=np.int32), np.array([3, 1], dtype=np.uint8))
    f_s = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=np.float32)
    got = ofa_for_tokens(target, source, words, f_s, np.array([0]), top_k=2, temperature=0.1)
    sims = np.array([2, 1]) / np.sqrt(5)  # cosine of (2/3, 1/3) with (1, 0) and (0, 1)
    weights = np.exp(sims / 0.1) / np.exp(sims / 0.1).sum()
    np.testing.assert_allclose(got[0], weights @ f_s, atol=1e-6)
    assert weights[0] == pytest.approx(0.9887, abs=1e-4)
    unique = ofa_for_tokens(target, source, words, f_s, np.array([0]), top_k=2, temperature=0.1, weighting="unique")
    np.testing.assert_allclose(unique[0], [0.5, 0.5, 0.0], atol=1e-6)  # equal similarity to both neighbours
