"""Random baseline rows: Gaussian with the per-column mean and population std of F_s (docs/METHOD.md §1.12).

Rows are drawn in fixed blocks of target ids, each block from its own stream `default_rng([seed, block])`, so a
token's random row depends only on (seed, token id): the same token gets the same random row whichever method
(HyperOFA, OFA, random) left it without a prediction, which keeps the three methods comparable row for row, and the
result does not depend on any chunk size in the config.
"""

from __future__ import annotations

import numpy as np

# Rows per random stream. Fixed: changing it changes every random row.
RANDOM_BLOCK = 1 << 16
# Rows of F_s read at once for the column statistics.
_STATS_CHUNK = 1 << 16


def column_stats(source_coordinates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and population std (ddof=0) of F_s, accumulated in float64 over row chunks."""
    n = len(source_coordinates)
    if n == 0:
        raise ValueError("F_s has no rows")
    total = np.zeros(source_coordinates.shape[1], dtype=np.float64)
    for a in range(0, n, _STATS_CHUNK):
        total += np.asarray(source_coordinates[a : a + _STATS_CHUNK], dtype=np.float64).sum(0)
    mean = total / n
    squares = np.zeros_like(mean)
    for a in range(0, n, _STATS_CHUNK):
        centred = np.asarray(source_coordinates[a : a + _STATS_CHUNK], dtype=np.float64) - mean
        squares += (centred * centred).sum(0)
    return mean, np.sqrt(squares / n)


def random_rows(token_ids: np.ndarray, mean: np.ndarray, std: np.ndarray, seed: int) -> np.ndarray:
    """float32 [len(token_ids), k]: row i is N(mean, std) drawn from the stream of token_ids[i]'s block."""
    token_ids = np.asarray(token_ids, dtype=np.int64)
    out = np.empty((len(token_ids), len(mean)), dtype=np.float32)
    if len(token_ids) == 0:
        return out
    blocks = token_ids // RANDOM_BLOCK
    for block in np.unique(blocks):
        where = np.flatnonzero(blocks == block)
        rng = np.random.default_rng([int(seed), int(block)])
        # Draw the whole block so a row never depends on which other rows of the block are requested.
        draws = rng.standard_normal((RANDOM_BLOCK, len(mean)), dtype=np.float32)
        local = token_ids[where] - block * RANDOM_BLOCK
        out[where] = (draws[local] * std + mean).astype(np.float32)
    return out
