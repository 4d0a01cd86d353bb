"""The hypernetwork loss (docs/METHOD.md §3.4): lambda * InfoNCE + (1 - lambda) * normalised L1.

InfoNCE is one-directional, as in the reference code (not the report's formula): rows are predictions,
columns are targets, C = cos(pred_i, target_j) / T, cross-entropy against the diagonal. Negatives are the batch's
targets; with `negatives` from all ranks (targets are constants, so gathering them needs no autograd) each
prediction is contrasted with every rank's targets, its own target sitting at column `offset + i`.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F


class LossParts(NamedTuple):
    total: torch.Tensor
    contrastive: torch.Tensor
    l1: torch.Tensor


def hypernet_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    lam: float = 0.1,
    temperature: float = 0.25,
    negatives: Optional[torch.Tensor] = None,
    offset: int = 0,
) -> LossParts:
    pred = pred.float()
    target = target.float()
    columns = target if negatives is None else negatives.float()
    sims = F.normalize(pred, dim=1) @ F.normalize(columns, dim=1).T
    labels = torch.arange(pred.shape[0], device=pred.device) + (offset if negatives is not None else 0)
    contrastive = F.cross_entropy(sims / temperature, labels)
    # The batch's mean |target| makes L1 scale-free across k and factorisations; clamp only guards all-zero rows.
    l1 = (pred - target).abs().mean() / target.abs().mean().clamp(min=1e-12)
    return LossParts(lam * contrastive + (1.0 - lam) * l1, contrastive, l1)


def mean_cosine(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(pred.float(), target.float(), dim=1).mean()
