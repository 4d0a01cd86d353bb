"""Factorisation of the source input embeddings E_s (V_s x D) into coordinates F_s (V_s x k) and primitives P (k x D).

Thin SVD E_s = U S V^T; F_s = U_k and P = S_k V_k^T, so F_s P is the best rank-k approximation and the
singular values live in P (docs/METHOD.md §1.4). k = D means no factorisation: F_s = E_s and P = I, which
every later stage handles like any other k (the reference crashed on it). Signs are canonical (each column of
F_s has its largest-magnitude entry positive), so the factors do not depend on the LAPACK build's sign choice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import HyperofaError


@dataclass
class Factors:
    coordinates: np.ndarray  # F_s float32 [V_s, k]
    primitives: np.ndarray  # P float32 [k, D]
    singular_values: np.ndarray  # float64 [min(V_s, D)]; empty when not factorised
    relative_error: float  # ||E - F P||_F / ||E||_F

    @property
    def k(self) -> int:
        return int(self.primitives.shape[0])

    @property
    def factorized(self) -> bool:
        return self.singular_values.size > 0


def check_rank(k: int, embeddings_shape: tuple[int, int]) -> None:
    rows, dim = embeddings_shape
    if not 1 <= k <= dim:
        raise HyperofaError(f"config key mapping.num_primitives={k}: must be between 1 and the source hidden size {dim}")
    if k < dim and k > rows:
        raise HyperofaError(f"config key mapping.num_primitives={k}: larger than the {rows} source embedding rows")


def relative_error(embeddings: np.ndarray, coordinates: np.ndarray, primitives: np.ndarray, rows: int = 65536) -> float:
    """||E - F P||_F / ||E||_F measured on the float32 factors, in row blocks (never a second V x D copy)."""
    num = den = 0.0
    for start in range(0, embeddings.shape[0], rows):
        block = np.asarray(embeddings[start : start + rows], dtype=np.float64)
        approx = coordinates[start : start + rows].astype(np.float64) @ primitives.astype(np.float64)
        num += float(np.sum((block - approx) ** 2))
        den += float(np.sum(block**2))
    return float(np.sqrt(num / den)) if den > 0 else 0.0


def factorize(embeddings: np.ndarray, k: int, blocks: int = 1) -> Factors:
    """F_s and P of rank k (k = D: no factorisation).

    `blocks` > 1: the columns are that many matrices side by side (an untied causal LM's [E_in | E_out], docs/
    METHOD.md §1.4). Each block is scaled to a root-mean-square row norm of 1 before the SVD, so the larger matrix
    does not take the rank from the other, and P carries the scales back: F_s P still approximates the matrices."""
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2:
        raise HyperofaError(f"source embeddings must be a matrix, got shape {embeddings.shape}")
    check_rank(k, embeddings.shape)
    dim = embeddings.shape[1]
    if k == dim:
        coordinates = np.ascontiguousarray(embeddings, dtype=np.float32).copy()
        return Factors(coordinates, np.eye(dim, dtype=np.float32), np.zeros(0), 0.0)
    scales = np.ones(dim, dtype=np.float64)
    if blocks > 1:
        width = dim // blocks
        for b in range(blocks):
            part = np.asarray(embeddings[:, b * width : (b + 1) * width], dtype=np.float64)
            rms = float(np.sqrt(np.mean(np.sum(part * part, axis=1))))
            scales[b * width : (b + 1) * width] = rms if rms > 0 else 1.0
    scaled = np.asarray(embeddings, dtype=np.float32) if blocks == 1 else (embeddings / scales).astype(np.float32)
    u, s, vt = np.linalg.svd(scaled, full_matrices=False)
    u, vt = u[:, :k], vt[:k]
    flip = np.sign(u[np.argmax(np.abs(u), axis=0), np.arange(k)])
    flip[flip == 0] = 1.0
    coordinates = np.ascontiguousarray(u * flip, dtype=np.float32)
    primitives = np.ascontiguousarray((s[:k, None] * vt) * flip[:, None] * scales, dtype=np.float32)
    return Factors(coordinates, primitives, s.astype(np.float64), relative_error(embeddings, coordinates, primitives))
