"""SVD factorisation: F_s P reconstructs E_s, error falls with k, k = D is the identity path, bad k is rejected."""

from __future__ import annotations

import numpy as np
import pytest

from hyperofa_dist.errors import HyperofaError
from hyperofa_dist.factorize import factorize


@pytest.fixture(scope="module")
def embeddings():
    rng = np.random.default_rng(3)
    # Decaying spectrum, as trained embedding matrices have.
    return (rng.normal(size=(300, 24)) * np.geomspace(3.0, 0.05, 24)).astype(np.float32)


def test_k_equal_d_is_no_factorisation(embeddings):
    f = factorize(embeddings, 24)
    assert not f.factorized and f.k == 24 and f.relative_error == 0.0
    np.testing.assert_array_equal(f.coordinates, embeddings)
    np.testing.assert_array_equal(f.primitives, np.eye(24, dtype=np.float32))
    np.testing.assert_array_equal(f.coordinates @ f.primitives, embeddings)


def test_reconstruction_error_decreases_with_k(embeddings):
    errors = []
    for k in (1, 2, 4, 8, 16, 23):
        f = factorize(embeddings, k)
        assert f.factorized and f.coordinates.shape == (300, k) and f.primitives.shape == (k, 24)
        assert f.coordinates.dtype == f.primitives.dtype == np.float32
        np.testing.assert_allclose(f.coordinates.T @ f.coordinates, np.eye(k), atol=1e-4)  # orthonormal columns
        s = np.linalg.svd(embeddings.astype(np.float64), compute_uv=False)
        assert f.relative_error == pytest.approx(np.sqrt(np.sum(s[k:] ** 2) / np.sum(s**2)), rel=1e-3, abs=1e-5)
        errors.append(f.relative_error)
    assert all(a > b for a, b in zip(errors, errors[1:]))


def test_full_rank_svd_reproduces_to_float32_tolerance(embeddings):
    f = factorize(embeddings, 24 - 1)
    full = factorize(embeddings[:, :23], 23)  # k = D of a 23-wide matrix: exact
    np.testing.assert_array_equal(full.coordinates, embeddings[:, :23])
    small = factorize(embeddings[:30], 20)  # rank-20 SVD of a 30x24 matrix, k < D
    assert small.relative_error < 0.02
    assert f.relative_error < 0.01


def test_signs_are_canonical_and_runs_identical(embeddings):
    a, b = factorize(embeddings, 8), factorize(embeddings.copy(), 8)
    assert a.coordinates.tobytes() == b.coordinates.tobytes() and a.primitives.tobytes() == b.primitives.tobytes()
    peak = a.coordinates[np.argmax(np.abs(a.coordinates), axis=0), np.arange(8)]
    assert np.all(peak > 0)
    flipped = factorize(-embeddings, 8)
    np.testing.assert_allclose(flipped.coordinates, a.coordinates, atol=1e-5)
    np.testing.assert_allclose(flipped.primitives, -a.primitives, atol=1e-4)


@pytest.mark.parametrize("k", [0, -3, 25])
def test_bad_k_is_rejected_with_the_config_key(embeddings, k):
    with pytest.raises(HyperofaError, match=f"mapping.num_primitives={k}: must be between 1 and the source hidden size 24"):
        factorize(embeddings, k)


def test_k_above_the_row_count_is_rejected():
    with pytest.raises(HyperofaError, match="larger than the 5 source embedding rows"):
        factorize(np.ones((5, 8), dtype=np.float32), 6)


def test_two_blocks_are_scaled_alike_before_the_svd_and_p_carries_the_scales_back():
    rng = np.random.default_rng(0)
    e_in = rng.standard_normal((300, 12))
    e_out = 50.0 * rng.standard_normal((300, 12))  # a much larger matrix must not take the whole rank
    both = factorize(np.concatenate([e_in, e_out], axis=1), 12, blocks=2)
    plain = factorize(np.concatenate([e_in, e_out], axis=1), 12)
    approx = both.coordinates.astype(np.float64) @ both.primitives
    error = lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(b)  # noqa: E731
    # scaled: the rank is shared (0.63 and 0.60 relative error); unscaled, E_out takes it all (0.98 and 0.0001)
    assert error(approx[:, :12], e_in) < 0.7 and error(approx[:, 12:], e_out) < 0.7
    plain_approx = plain.coordinates.astype(np.float64) @ plain.primitives
    assert error(plain_approx[:, :12], e_in) > 0.95 and error(plain_approx[:, 12:], e_out) < 0.01
    # P carries the scales: the same coordinates as the SVD of the scaled matrix, columns multiplied back
    scaled = np.concatenate([e_in / np.sqrt((e_in ** 2).sum(1).mean()), e_out / np.sqrt((e_out ** 2).sum(1).mean())], 1)
    np.testing.assert_allclose(np.abs(both.coordinates), np.abs(factorize(scaled, 12).coordinates), atol=1e-4)
    assert factorize(np.concatenate([e_in, e_out], axis=1), 24, blocks=2).primitives.shape == (24, 24)  # k = 2D
