"""Assembly of F_t: copy -> predicted -> random, provenance, seeded random rows, bad predictions (docs/METHOD.md §1.9, §1.12)."""

import numpy as np
import pytest

from hyperofa_dist.errors import HyperofaError
from hyperofa_dist.method import assemble as asm
from hyperofa_dist.method.random import RANDOM_BLOCK, column_stats, random_rows


@pytest.fixture
def sources():
    rng = np.random.default_rng(1)
    f_s = rng.standard_normal((50, 4)).astype(np.float32)
    f_s[7] = 0.0  # a legitimately all-zero source row (e.g. a zero-initialised pad embedding)
    return f_s


def build(f_s, predicted_ids=None, predicted_rows=None, kind="ofa", seed=0, vocab=40):
    mean, std = column_stats(f_s)
    return asm.assemble_coordinates(
        vocab, f_s, np.array([0, 3, 5]), np.array([7, 1, 2]), predicted_ids, predicted_rows, kind, mean, std, seed
    )


def test_copy_then_predicted_then_random(sources):
    pred_ids = np.array([5, 6, 10])  # 5 is copied: the copy wins
    pred_rows = np.full((3, 4), 9.0, dtype=np.float32)
    a = build(sources, pred_ids, pred_rows, "hyperofa")
    np.testing.assert_array_equal(a.coordinates[[0, 3, 5]], sources[[7, 1, 2]])
    assert not a.coordinates[0].any() and a.provenance[0] == asm.COPY  # zero row stays copied, no sentinel
    np.testing.assert_array_equal(a.coordinates[[6, 10]], pred_rows[1:])
    assert a.provenance[6] == a.provenance[10] == asm.HYPEROFA
    assert a.predictions_overridden == 1
    counts = asm.provenance_counts(a.provenance)
    assert counts == {"copy": 3, "hyperofa": 2, "ofa": 0, "random": 35, "mean": 0}
    assert sum(counts.values()) == 40
    rest = np.flatnonzero(a.provenance == asm.RANDOM)
    assert np.all(np.abs(a.coordinates[rest]).sum(1) > 0)


def test_random_rows_are_seeded_and_independent_of_the_method(sources):
    ofa = build(sources, np.array([6]), np.ones((1, 4), np.float32), "ofa", seed=4)
    rnd = build(sources, None, None, None, seed=4)
    other = build(sources, None, None, None, seed=5)
    both_random = np.flatnonzero((ofa.provenance == asm.RANDOM) & (rnd.provenance == asm.RANDOM))
    np.testing.assert_array_equal(ofa.coordinates[both_random], rnd.coordinates[both_random])
    assert not np.allclose(rnd.coordinates[both_random], other.coordinates[both_random])
    assert rnd.coordinates.tobytes() == build(sources, None, None, None, seed=4).coordinates.tobytes()


def test_random_rows_follow_source_column_statistics():
    rng = np.random.default_rng(2)
    f_s = (rng.standard_normal((5000, 3)) * [1.0, 0.1, 3.0] + [0.0, 5.0, -2.0]).astype(np.float32)
    mean, std = column_stats(f_s)
    np.testing.assert_allclose(mean, f_s.astype(np.float64).mean(0), atol=1e-9)
    np.testing.assert_allclose(std, f_s.astype(np.float64).std(0), atol=1e-9)
    ids = np.arange(0, 3 * RANDOM_BLOCK, 7)  # spans several random streams
    rows = random_rows(ids, mean, std, seed=0)
    np.testing.assert_allclose(rows.mean(0), mean, atol=0.05 * std.max())
    np.testing.assert_allclose(rows.std(0), std, rtol=0.02)
    # a row depends only on (seed, id), not on the other ids requested
    np.testing.assert_array_equal(random_rows(ids[5:9], mean, std, 0), rows[5:9])


@pytest.mark.parametrize(
    "ids, rows, message",
    [
        (np.array([6, 7]), np.ones((2, 3), np.float32), "dimension 3 but the mapping's k is 4"),
        (np.array([6, 40]), np.ones((2, 4), np.float32), "id 40 is out of range"),
        (np.array([-1, 6]), np.ones((2, 4), np.float32), "id -1 is out of range"),
        (np.array([6, 6]), np.ones((2, 4), np.float32), "appears twice"),
        (np.array([6]), np.full((1, 4), np.nan, np.float32), "NaN"),
        (np.array([6, 7]), np.ones((3, 4), np.float32), "expected ids"),
    ],
)
def test_bad_predictions_are_refused(sources, ids, rows, message):
    with pytest.raises(HyperofaError, match=message):
        build(sources, ids, rows, "hyperofa")


def test_full_embeddings_product_or_identity():
    rng = np.random.default_rng(0)
    f_t = rng.standard_normal((70_000, 3)).astype(np.float32)  # more rows than one product chunk
    p = rng.standard_normal((3, 5)).astype(np.float32)
    np.testing.assert_allclose(asm.full_embeddings(f_t, p), f_t @ p, rtol=1e-6, atol=1e-6)
    f_d = rng.standard_normal((10, 4)).astype(np.float32)
    same = asm.full_embeddings(f_d, np.eye(4, dtype=np.float32))
    assert same.tobytes() == f_d.tobytes() and same is not f_d
    with pytest.raises(HyperofaError, match="columns"):
        asm.full_embeddings(f_d, p)


def test_provenance_by_language_and_script():
    words = ["qaa:bara", "qab:дома", "eng:house", "concept", "xyz:ωμέγα"]  # iso:word keys; bare keys are 'eng'
    lang_codes, lang_names = asm.group_codes(asm.word_language(w) for w in words)
    script_codes, script_names = asm.group_codes(asm.word_script(w) for w in words)
    assert lang_names == ["eng", "qaa", "qab", "xyz"]
    assert script_names == ["Cyrl", "Grek", "Latn"]
    # token 0: words 0, 2 (qaa, eng; Latn); token 1: words 1, 4 (qab Cyrl, xyz Grek); token 2: no words;
    # token 3: word 3 (eng, Latn)
    indptr = np.array([0, 2, 4, 4, 5])
    indices = np.array([0, 2, 1, 4, 3])
    provenance = np.array([asm.COPY, asm.OFA, asm.RANDOM, asm.OFA], dtype=np.uint8)
    by_lang = asm.provenance_by_group(provenance, indptr, indices, lang_codes, lang_names, chunk=3)
    assert by_lang["qaa"] == {"copy": 1, "hyperofa": 0, "ofa": 0, "random": 0, "mean": 0}
    assert by_lang["eng"] == {"copy": 1, "hyperofa": 0, "ofa": 1, "random": 0, "mean": 0}
    assert by_lang["xyz"]["ofa"] == 1 and by_lang["qab"]["ofa"] == 1
    assert by_lang[asm.NO_WORDS] == {"copy": 0, "hyperofa": 0, "ofa": 0, "random": 1, "mean": 0}
    by_script = asm.provenance_by_group(provenance, indptr, indices, script_codes, script_names)
    assert by_script["Latn"] == {"copy": 1, "hyperofa": 0, "ofa": 1, "random": 0, "mean": 0}
    assert by_script["Grek"]["ofa"] == by_script["Cyrl"]["ofa"] == 1
    total = sum(c for group in by_script.values() for c in group.values())
    assert total == 5  # token 1 counts in both Cyrl and Grek


def test_mean_cosine():
    a = np.array([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    b = np.array([[2.0, 0.0], [0.0, -1.0], [1.0, 1.0]])
    assert asm.mean_cosine(a, b) == pytest.approx((1 - 1 + 0) / 3)
