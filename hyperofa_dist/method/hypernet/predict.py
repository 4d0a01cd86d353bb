"""Inference (HyperOFA `hypernetwork/inference.py`): coordinates for the target tokens that need them, and test-split metrics.

Only target tokens that have postings and are not copied get a prediction: copied tokens are overwritten by
the source row anyway (the reference predicted them too, docs/METHOD.md §7). Lists are taken without augmentation, capped
at max_context. Batches are formed from tokens of similar length (less padding); rows come back in token order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from ...formats.hypernet import write_predictions, write_test_predictions
from ...formats.mapping import Postings
from .data import ContextRule, TokenSet, WordTable


def tokens_to_predict(target: Postings, copied: np.ndarray) -> np.ndarray:
    """Target ids with at least one posting that are not copy targets, ascending."""
    has_words = np.flatnonzero(np.diff(target.indptr) > 0).astype(np.int64)
    return np.setdiff1d(has_words, np.asarray(copied, dtype=np.int64), assume_unique=False)


@torch.no_grad()
def predict_rows(
    model: nn.Module,
    table: WordTable,
    tokens: TokenSet,
    *,
    batch_size: int,
    cap: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> np.ndarray:
    model.eval()
    out = np.zeros((len(tokens), tokens.k), dtype=np.float32)
    order = np.argsort(np.minimum(tokens.lengths, cap), kind="stable")
    for start in range(0, len(order), batch_size):
        positions = order[start : start + batch_size]
        batch = tokens.batch(positions, cap)
        vectors = table.lookup(batch.words, batch.mask).to(device=device, dtype=dtype)
        out[positions] = model(vectors, batch.mask.to(device)).float().cpu().numpy()
    return out


def split_metrics(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """Mean cosine of prediction vs true row, and the un-normalised mean |difference| (docs/METHOD.md §3.9)."""
    if len(pred) == 0:
        return {"test_mean_cosine": float("nan"), "test_l1": float("nan"), "test_count": 0}
    num = (pred * true).sum(axis=1)
    den = np.linalg.norm(pred, axis=1) * np.linalg.norm(true, axis=1)
    cosine = num / np.maximum(den, 1e-8)
    return {
        "test_mean_cosine": float(cosine.mean()),
        "test_l1": float(np.abs(pred - true).mean()),
        "test_count": int(len(pred)),
    }


def predict_all(
    model: nn.Module,
    table: WordTable,
    *,
    source: Postings,
    target: Postings,
    coordinates: np.ndarray,
    copied: np.ndarray,
    test_ids: np.ndarray,
    out_dir: Path,
    batch_size: int,
    cap: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    context: Optional[dict[str, ContextRule]] = None,
) -> dict[str, Any]:
    """Write predicted target coordinates and test-split predictions + metrics into out_dir; return the metrics."""
    k = int(coordinates.shape[1])
    ids = tokens_to_predict(target, copied)
    context = context or {"source": ContextRule(side="source"), "target": ContextRule(side="target")}
    rows = predict_rows(
        model, table, TokenSet(ids, target, None, k, context["target"]), batch_size=batch_size, cap=cap,
        device=device, dtype=dtype,
    )
    write_predictions(out_dir, ids, rows)

    test_ids = np.asarray(test_ids, dtype=np.int64)
    test_rows = predict_rows(
        model, table, TokenSet(test_ids, source, coordinates, k, context["source"]), batch_size=batch_size, cap=cap,
        device=device, dtype=dtype,
    )
    metrics = split_metrics(test_rows, np.asarray(coordinates[test_ids], dtype=np.float32))
    metrics["predicted_count"] = int(len(ids))
    write_test_predictions(out_dir, test_ids, test_rows, metrics)
    return metrics
