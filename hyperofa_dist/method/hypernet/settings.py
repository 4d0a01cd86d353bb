"""The hypernetwork's settings read from the config, and the training split, as the DeepSpeed job and `tune
hypernet` both use them."""

from __future__ import annotations

from typing import Any

import numpy as np

from ...errors import HyperofaError
from ...formats.mapping import SPLIT, Mapping
from . import loop
from .data import AugmentSpec, ContextRule


def augment_spec(hp: Any) -> AugmentSpec:
    return AugmentSpec(prob=hp.augment_prob, threshold=hp.augment_threshold, min_fraction=hp.augment_min_fraction,
                       shuffle=hp.shuffle_words)


def context_rule(hp: Any, seed: int, side: str) -> ContextRule:
    return ContextRule(hp.context, seed, side)


def loss_spec(hp: Any) -> loop.LossSpec:
    return loop.LossSpec(lam=hp.loss_lambda, temperature=hp.temperature)


def training_split(mapping: Mapping) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """The split restricted to tokens that have postings, and how many each part lost."""
    splits, without = {}, {}
    for part, ids in mapping.split.items():
        covered = mapping.source_postings.lengths(ids) > 0
        splits[part], without[part] = ids[covered], int((~covered).sum())
    return splits, without


def check_batches(mapping: Mapping, train_ids: np.ndarray, batch_size: int, ranks: int, grad_accum: int) -> None:
    need = batch_size * ranks * grad_accum
    if len(train_ids) < need:
        raise HyperofaError(
            f"{mapping.where(SPLIT)}: {len(train_ids)} training tokens, fewer than "
            f"hypernet.batch_size x ranks x grad_accum = {need}; lower hypernet.batch_size"
        )
