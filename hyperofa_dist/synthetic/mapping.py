"""A generated `<run_dir>/mapping/` (the mapping contract) whose targets are a learnable function of the words.

Used by the hypernetwork tests and `hyperofa bench hypernet`, so that both run without the mapping stage. Each
source token's coordinates are a fixed linear map of the mean of its words' vectors; a hypernetwork that learns
the map reaches a validation cosine near 1, and one with a broken model, loss or data pipeline does not.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..formats.files import atomic_write_bytes, fingerprint_path
from ..formats.mapping import STAGE, MappingParts, Postings, write_mapping
from ..formats.rundir import Stage


@dataclass
class SyntheticMapping:
    run_dir: Path
    vectors_file: Path
    k: int
    word_dim: int
    n_words: int
    v_source: int
    v_target: int
    weights: np.ndarray  # [word_dim, k]: coordinates = mean(word vectors) @ weights


def _postings(rng: np.random.Generator, n_tokens: int, n_words: int, max_len: int, empty_share: float):
    lengths = np.minimum(rng.geometric(0.18, size=n_tokens), max_len)
    lengths[rng.random(n_tokens) < empty_share] = 0
    indptr = np.zeros(n_tokens + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    lists = [np.sort(rng.choice(n_words, size=n, replace=False)) for n in lengths]
    indices = np.concatenate(lists).astype(np.int32) if indptr[-1] else np.zeros(0, np.int32)
    return indptr, indices


def make_mapping(
    run_dir: str | Path,
    *,
    n_words: int = 3000,
    word_dim: int = 16,
    v_source: int = 1200,
    v_target: int = 1600,
    k: int = 8,
    max_len: int = 40,
    split: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    vectors_file: Optional[str | Path] = None,
) -> SyntheticMapping:
    """Write `<run_dir>/mapping/` with a manifest (and a stand-in word-vector file to fingerprint)."""
    run_dir = Path(run_dir)
    rng = np.random.default_rng(seed)
    table = rng.normal(size=(n_words, word_dim)).astype(np.float32)
    weights = rng.normal(size=(word_dim, k)).astype(np.float32) / np.sqrt(word_dim)

    src_indptr, src_indices = _postings(rng, v_source, n_words, max_len, empty_share=0.1)
    coords = rng.normal(scale=0.05, size=(v_source, k)).astype(np.float32)  # uncovered tokens: unrelated rows
    for t in range(v_source):
        words = src_indices[src_indptr[t] : src_indptr[t + 1]]
        if len(words):
            coords[t] = table[words].mean(axis=0) @ weights
    tgt_indptr, tgt_indices = _postings(rng, v_target, n_words, max_len, empty_share=0.2)
    copied = np.sort(rng.choice(v_target, size=v_target // 4, replace=False)).astype(np.int64)
    copied_sources = rng.integers(0, v_source, size=len(copied)).astype(np.int64)

    covered = np.flatnonzero(np.diff(src_indptr) > 0).astype(np.int64)
    order = rng.permutation(covered)
    n_train, n_val = int(split[0] * len(order)), int(split[1] * len(order))
    split_ids = {"train": order[:n_train], "val": order[n_train : n_train + n_val], "test": order[n_train + n_val :]}

    vectors_file = Path(vectors_file) if vectors_file else run_dir / "vectors.bin"
    atomic_write_bytes(vectors_file, table.tobytes())
    stage = Stage(run_dir, STAGE)
    stage.begin("synthetic")
    words = [f"qaa:w{i}" for i in range(n_words)]
    parts = MappingParts(
        source_postings=Postings(src_indptr, src_indices),
        target_postings=Postings(tgt_indptr, tgt_indices),
        overlap_target=copied,
        overlap_source=copied_sources,
        overlap_kinds=np.ones(len(copied), dtype=np.int8),
        split=split_ids,
        coordinates=coords,
        primitives=rng.normal(size=(k, 4 * k)).astype(np.float32),
        words=words,
        stats={"covered_source": int(len(covered))},
    )
    outputs = write_mapping(stage.path, parts, [table], word_dim, vectors_file)
    stage.write_manifest(
        config={},
        inputs={"vectors": {"path": str(vectors_file), "fingerprint": fingerprint_path(vectors_file)}, "k": k,
                "synthetic_seed": seed},
        outputs=outputs,
        counts={"V_s": v_source, "V_t": v_target, "D": 4 * k, "k": k, "n_words": n_words, "word_dim": word_dim},
        extra={"factorized": True},
    )
    return SyntheticMapping(run_dir, vectors_file, k, word_dim, n_words, v_source, v_target, weights)
