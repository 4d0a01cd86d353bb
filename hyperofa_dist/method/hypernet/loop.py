"""One training epoch and one evaluation pass, written once for every driver.

The DeepSpeed job (train.py), the single-process baseline of the benchmark and the unit tests all call these
with their own `forward` (an engine or a plain module) and `update` (engine.backward + engine.step, or a plain
optimizer step). Nothing here knows about DeepSpeed or MLflow. Results are sums (loss x samples, ...) so that
ranks can all-reduce them before dividing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import numpy as np
import torch

from .data import AugmentSpec, Batch, TokenSet, WordTable, epoch_seed, AUGMENT_STREAM, eval_rounds
from .loss import LossParts, hypernet_loss

Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Update = Callable[[torch.Tensor], None]
Negatives = Callable[[torch.Tensor], tuple[torch.Tensor, int]]

TRAIN_KEYS = ("loss", "contrastive", "l1")
EVAL_KEYS = ("loss", "contrastive", "l1", "cosine")


@dataclass(frozen=True)
class LossSpec:
    lam: float = 0.1
    temperature: float = 0.25


def lr_at(epoch: int, lr: float, decay: float, every: int) -> float:
    """Step decay per epoch (the reference's StepLR): lr * decay^floor(epoch / every)."""
    return lr * decay ** (epoch // every)


def selects(epoch: int, every: int, epochs: int) -> bool:
    """Whether the model after `epoch` (0-based) may become the kept best model: every `every`-th epoch (the
    reference's checkpoint callback looked every 20: epochs 19, 39, ...) and the last, so that a run shorter than
    `every` still keeps one."""
    return (epoch + 1) % every == 0 or epoch == epochs - 1


def batch_loss(
    forward: Forward,
    table: WordTable,
    batch: Batch,
    loss: LossSpec,
    device: torch.device,
    dtype: torch.dtype,
    negatives: Optional[Negatives] = None,
) -> tuple[LossParts, torch.Tensor]:
    vectors = table.lookup(batch.words, batch.mask).to(device=device, dtype=dtype)
    pred = forward(vectors, batch.mask.to(device))
    target = batch.targets.to(device)
    columns, offset = negatives(target) if negatives is not None else (None, 0)
    parts = hypernet_loss(pred, target, lam=loss.lam, temperature=loss.temperature, negatives=columns, offset=offset)
    return parts, pred


def train_epoch(
    forward: Forward,
    update: Update,
    table: WordTable,
    tokens: TokenSet,
    batches: Iterable[np.ndarray],
    *,
    seed: int,
    epoch: int,
    rank: int,
    cap: int,
    augment: AugmentSpec,
    loss: LossSpec,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    negatives: Optional[Negatives] = None,
    on_batch: Optional[Callable[[Batch], None]] = None,
) -> np.ndarray:
    """Sums [loss*n, contrastive*n, l1*n, n] over this rank's batches of one epoch."""
    rng = epoch_seed(seed, epoch, rank, AUGMENT_STREAM)
    sums = np.zeros(len(TRAIN_KEYS) + 1)
    for positions in batches:
        batch = tokens.batch(positions, cap, rng, augment)
        parts, _ = batch_loss(forward, table, batch, loss, device, dtype, negatives)
        update(parts.total)
        n = len(batch)
        sums += [parts.total.item() * n, parts.contrastive.item() * n, parts.l1.item() * n, n]
        if on_batch is not None:
            on_batch(batch)
    return sums


@torch.no_grad()
def evaluate(
    forward: Forward,
    table: WordTable,
    tokens: TokenSet,
    *,
    batch_size: int,
    world_size: int,
    rank: int,
    cap: int,
    loss: LossSpec,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> np.ndarray:
    """Sums [loss*n, contrastive*n, l1*n, cosine_sum, n] over this rank's share of the set (no augmentation)."""
    from .loss import mean_cosine

    sums = np.zeros(len(EVAL_KEYS) + 1)
    for positions, weight in eval_rounds(len(tokens), batch_size, world_size, rank):
        batch = tokens.batch(positions, cap)
        parts, pred = batch_loss(forward, table, batch, loss, device, dtype)
        n = len(batch) * weight
        cos = mean_cosine(pred, batch.targets.to(device)).item()
        sums += [parts.total.item() * n, parts.contrastive.item() * n, parts.l1.item() * n, cos * n, n]
    return sums


def means(sums: np.ndarray, keys: tuple[str, ...], prefix: str) -> dict[str, float]:
    n = max(float(sums[-1]), 1.0)
    return {f"{prefix}{key}": float(sums[i] / n) for i, key in enumerate(keys)}
