"""The hypernetwork's train/val/test split of covered source tokens."""

from __future__ import annotations

import numpy as np


def split_tokens(covered: np.ndarray, shares: list[float], seed: int) -> dict[str, np.ndarray]:
    """Train/val/test ids: sorted before a seeded shuffle, so the split does not depend on the order a tokenizer
    lists its vocabulary in (the reference shuffled dict order); test takes the rounding rest."""
    ids = np.sort(np.asarray(covered, dtype=np.int64))
    order = np.random.default_rng(seed).permutation(ids.size)
    shuffled = ids[order]
    n_train = int(shares[0] * ids.size)
    n_val = int(shares[1] * ids.size)
    return {
        "train": shuffled[:n_train],
        "val": shuffled[n_train : n_train + n_val],
        "test": shuffled[n_train + n_val :],
    }
