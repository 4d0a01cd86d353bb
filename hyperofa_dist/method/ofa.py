"""OFA baseline (Liu et al. 2024, OFA; `ofa/utils.py` of cisnlp/ofa): a new token's coordinates are a softmax(sim / tau)-weighted combination of
the coordinate rows of its top-k most similar source tokens, where similarity is the cosine between the tokens'
mean word vectors.

The reference materialises a dense float64 V_t x V_s cosine matrix (about 4e13 operations for XLM-R to Glot500) and
runs argpartition row by row in Python. Here target tokens are processed in chunks: one fp32 matrix product of the
chunk against the normalised candidate matrix, `torch.topk`, a softmax over the k values and one batched gather of
coordinate rows, on CPU or GPU. Memory is bounded by `chunk_size x n_candidates` floats, never V_t x V_s.

Deviations from the reference, on purpose:
- Candidates are the source tokens that have a word vector (non-empty postings). The reference also admits
  uncovered source tokens with similarity 0, which can matter only when fewer than top_k covered source tokens
  have a positive similarity; their rows carry no word evidence, so they are left out.
- None on the weights: a word counts once per spelling that yields the token (1-3, the postings' `spellings`),
  as the reference's lists with repeats do; `init.ofa_weighting=unique` counts each word once instead.
- The softmax subtracts the row maximum (same value, no overflow).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from ..errors import HyperofaError
from ..formats.mapping import Mapping, Postings

# Word-vector rows gathered at once when averaging: bounds the transient memory of a chunk (x word_dim x 4 bytes).
GATHER_ENTRIES = 1 << 16


def token_mean_vectors(
    indptr: np.ndarray,
    indices: np.ndarray,
    word_vectors: np.ndarray,
    token_ids: Sequence[int] | np.ndarray,
    gather_entries: int = GATHER_ENTRIES,
    weights: Optional[np.ndarray] = None,
) -> np.ndarray:
    """Weighted mean word vector of each token in `token_ids` (float32 [n, word_dim]); tokens without words get
    zeros. `weights` (one per posting, e.g. the spelling counts) default to 1: the plain mean.

    `indptr`/`indices` are the token -> word CSR postings; `word_vectors` may be a memory map: rows are gathered
    in bounded groups and summed in float64, so a token with millions of words costs no more memory than others.
    """
    import torch

    token_ids = np.asarray(token_ids, dtype=np.int64)
    starts = np.asarray(indptr[token_ids], dtype=np.int64)
    lengths = np.asarray(indptr[token_ids + 1], dtype=np.int64) - starts
    out = np.zeros((len(token_ids), word_vectors.shape[1]), dtype=np.float64)
    totals = np.zeros(len(token_ids), dtype=np.float64)

    def weighted(rows: np.ndarray, positions: np.ndarray) -> np.ndarray:
        return rows if weights is None else rows * np.asarray(weights[positions], dtype=np.float64)[:, None]
    order = np.flatnonzero(lengths > 0)
    i = 0
    while i < len(order):
        # Greedy group of consecutive tokens whose postings fit in the gather budget (at least one token).
        budget, j = 0, i
        while j < len(order) and (j == i or budget + lengths[order[j]] <= gather_entries):
            budget += lengths[order[j]]
            j += 1
        group = order[i:j]
        if len(group) == 1 and lengths[group[0]] > gather_entries:
            row, start, length = group[0], starts[group[0]], lengths[group[0]]
            acc = np.zeros(word_vectors.shape[1], dtype=np.float64)
            for a in range(start, start + length, gather_entries):
                b = min(a + gather_entries, start + length)
                rows = np.asarray(word_vectors[np.asarray(indices[a:b], dtype=np.int64)], dtype=np.float64)
                acc += weighted(rows, np.arange(a, b)).sum(0)
            out[row] = acc
        else:
            lens = lengths[group]
            offsets = np.concatenate([[0], np.cumsum(lens)[:-1]])
            # positions of every posting of the group, token after token
            positions = np.repeat(starts[group] - offsets, lens) + np.arange(int(lens.sum()))
            words = np.asarray(indices[positions], dtype=np.int64)
            rows = torch.from_numpy(weighted(np.asarray(word_vectors[words], dtype=np.float64), positions))
            # index_add_ is several times faster than np.add.reduceat over many short segments
            segment = torch.from_numpy(np.repeat(np.arange(len(group)), lens))
            sums = torch.zeros(len(group), rows.shape[1], dtype=torch.float64).index_add_(0, segment, rows)
            out[group] = sums.numpy()
        i = j
    nonzero = lengths > 0
    if weights is None:
        totals = lengths.astype(np.float64)
    else:
        cumulative = np.concatenate([[0.0], np.cumsum(np.asarray(weights, dtype=np.float64))])
        totals = cumulative[starts + lengths] - cumulative[starts]
    out[nonzero] /= totals[nonzero, None]
    return out.astype(np.float32)


def _normalise(x):
    import torch

    return x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(1e-30)


def ofa_predict(
    target_vectors: np.ndarray,
    candidate_vectors: np.ndarray,
    candidate_coordinates: np.ndarray,
    top_k: int = 10,
    temperature: float = 0.1,
    chunk_size: int = 1024,
    device: str = "cpu",
    progress: bool = False,
) -> np.ndarray:
    """OFA coordinates for each row of `target_vectors` (float32 [n, k]).

    `candidate_vectors` [n_c, word_dim] are the candidate source tokens' mean word vectors and
    `candidate_coordinates` [n_c, k] their rows of F_s, in the same order. A target whose vector is zero gets
    similarity 0 to every candidate (as cosine_similarity does), i.e. a plain mean of top_k arbitrary rows;
    callers only ask for tokens that have words.
    """
    import torch

    if top_k < 1 or temperature <= 0:
        raise HyperofaError(f"OFA needs top_k >= 1 and temperature > 0 (got {top_k}, {temperature})")
    n_c = len(candidate_vectors)
    if n_c == 0:
        raise HyperofaError("OFA has no candidate source tokens: no source token has a word vector")
    if len(candidate_coordinates) != n_c:
        raise ValueError("candidate_vectors and candidate_coordinates differ in length")
    kk = min(top_k, n_c)
    # stored transposed once, so every chunk's product reads it contiguously
    cand_t = _normalise(
        torch.as_tensor(np.ascontiguousarray(candidate_vectors, dtype=np.float32), device=device)
    ).T.contiguous()
    coords = torch.as_tensor(np.ascontiguousarray(candidate_coordinates, dtype=np.float32), device=device)
    out = np.empty((len(target_vectors), coords.shape[1]), dtype=np.float32)
    starts = range(0, len(target_vectors), chunk_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="OFA", unit="chunk", leave=False)
    with torch.no_grad():
        for a in starts:
            b = min(a + chunk_size, len(target_vectors))
            t = torch.as_tensor(np.ascontiguousarray(target_vectors[a:b], dtype=np.float32), device=device)
            sims = _normalise(t) @ cand_t
            values, idx = torch.topk(sims, kk, dim=1)
            weights = torch.softmax(values / temperature, dim=1)
            # [c, 1, kk] x [c, kk, k] -> [c, k]: one batched product over the gathered neighbour rows
            combined = torch.bmm(weights.unsqueeze(1), coords[idx]).squeeze(1)
            out[a:b] = combined.cpu().numpy()
    return out


def ofa_for_tokens(
    target_postings: Postings,
    source_postings: Postings,
    word_vectors: np.ndarray,
    source_coordinates: np.ndarray,
    token_ids: np.ndarray,
    exclude_sources: Optional[np.ndarray] = None,
    weighting: str = "spellings",
    **settings: Any,
) -> np.ndarray:
    """OFA coordinates of `token_ids` of the target vocabulary, neighbours drawn from the covered source tokens.

    `weighting`: "spellings" (a word weighs as many of its spellings as yield the token, the reference) or
    "unique" (each word once). `settings` are `ofa_predict`'s (top_k, temperature, chunk_size, device, progress).

    `exclude_sources` removes source ids from the candidates (the held-out evaluation estimates a source test
    token from the other source tokens only).
    """
    covered = source_postings.covered()
    if exclude_sources is not None and len(exclude_sources):
        covered = np.setdiff1d(covered, np.asarray(exclude_sources, dtype=np.int64), assume_unique=False)
    if weighting not in ("spellings", "unique"):
        raise HyperofaError(f"config key init.ofa_weighting: {weighting!r} is not one of spellings, unique")

    def means(postings: Postings, ids: np.ndarray) -> np.ndarray:
        weights = postings.spellings if weighting == "spellings" else None
        return token_mean_vectors(postings.indptr, postings.indices, word_vectors, ids, weights=weights)

    candidate_vectors = means(source_postings, covered)
    candidate_coordinates = np.asarray(source_coordinates[covered], dtype=np.float32)
    target_vectors = means(target_postings, token_ids)
    return ofa_predict(target_vectors, candidate_vectors, candidate_coordinates, **settings)


def ofa_settings(config: Any) -> dict[str, Any]:
    """`ofa_for_tokens`'s settings from a config's `init` section."""
    from ..runtime.device import resolve_device

    c = config.init
    return dict(top_k=c.top_k, temperature=c.temperature, chunk_size=c.chunk_size, weighting=c.ofa_weighting,
                device=resolve_device(c.device, "init.device").type)


def ofa_rows_of(mapping: Mapping, config: Any, token_ids: np.ndarray, progress: Any = None) -> np.ndarray:
    """OFA's coordinates for the target tokens `token_ids` of a mapping, with the config's `init` settings."""
    return ofa_for_tokens(mapping.target_postings, mapping.source_postings, mapping.word_vectors,
                          mapping.source_coordinates, token_ids, progress=progress, **ofa_settings(config))
