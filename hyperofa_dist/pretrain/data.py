"""Streaming the prepare shards into MLM micro-batches: disjoint per rank and worker, equal step counts, seeded.

Every (rank, loader worker) pair is one *slot*. A language with at least as many shards as slots gives each slot
its own shards (`shards[slot::n_slots]`); a language with fewer shards is split block by block instead (every
slot reads the language's shards and keeps the blocks whose index in the shard falls to it). Either way no two
ranks train on the same block. Each slot then samples shards with replacement (webdataset's "resampled" mode, the
maintainer's answer to unequal shard counts), so its stream never runs dry, and the loader is cut to a fixed
number of micro-batches per epoch with `with_epoch`: every rank takes exactly the same number of steps.

Determinism: a slot's stream is a function of (global seed, epoch start step, rank, worker) only, and the MLM mask
of each micro-batch of (…, batch index). A causal LM gets the blocks unmasked (`mask=None`): its targets, positions
and attention follow from the ids (models/causal.py). The training loop starts a data epoch at step 0, at every checkpoint
step and at the resume step, so a run resumed from a checkpoint reads exactly what the uninterrupted run read.

Languages are mixed sample by sample with the configured weights (default: proportional to each language's
block count), then blocks pass through a seeded shuffle buffer before batching.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from ..errors import HyperofaError
from ..formats.shards import ShardSet, first_blocks, read_shard
from ..models.mlm import mask_tokens
from ..runtime.seeds import HELDOUT, mix_seed


@dataclass(frozen=True)
class MaskSpec:
    """What masking needs to know about the tokenizer; plain data so loader workers can carry it."""

    special_ids: tuple[int, ...]
    mask_id: int
    vocab_size: int
    probability: float = 0.15
    pad_id: Optional[int] = None  # held-out blocks may end in padding (prepare pads a too-short held-out part)


def mixing_probabilities(
    languages: list[str], blocks: dict[str, int], weights: Optional[dict[str, float]]
) -> np.ndarray:
    """Sampling probability per language: the configured weights, or proportional to block counts (uniform when
    counts are unknown). Weights may name only some languages; the others get weight 0 and are not trained on."""
    if weights is not None:
        unknown = sorted(set(weights) - set(languages))
        if unknown:
            raise HyperofaError(
                f"pretrain.language_weights names languages without training shards: {', '.join(unknown)}"
            )
        raw = np.array([float(weights.get(lang, 0.0)) for lang in languages])
        if (raw < 0).any() or raw.sum() <= 0:
            raise HyperofaError("pretrain.language_weights must be non-negative with a positive sum")
    elif blocks and all(lang in blocks for lang in languages):
        raw = np.array([float(blocks[lang]) for lang in languages])
    else:
        raw = np.ones(len(languages))
    if raw.sum() <= 0:
        raise HyperofaError("no training blocks in any language")
    return raw / raw.sum()


def slot_shards(shards: list[str], slot: int, n_slots: int) -> tuple[list[str], Optional[tuple[int, int]]]:
    """(shards this slot reads, block filter (slot, n_slots) or None): shard-level split when possible."""
    if len(shards) >= n_slots:
        return shards[slot::n_slots], None
    return list(shards), (slot, n_slots)


def shard_blocks(url: str, keep: Optional[tuple[int, int]]) -> Iterator[tuple[str, np.ndarray]]:
    """(block id, block) for the blocks of a shard this slot keeps; ids are `shard#sample:row`."""
    index = 0
    name = Path(url).name
    for sample in read_shard(url):
        for row in range(sample.blocks.shape[0]):
            if keep is None or index % keep[1] == keep[0]:
                yield f"{name}#{sample.key}:{row}", sample.blocks[row]
            index += 1


def resampled_blocks(shards: list[str], keep: Optional[tuple[int, int]], rng: np.random.Generator, lang: str):
    """Endless blocks of one language for one slot: shards drawn with replacement, each read through."""
    while True:
        found = False
        for shard in rng.choice(len(shards), size=len(shards), replace=True):
            for item in shard_blocks(shards[int(shard)], keep):
                found = True
                yield item
        if not found and all(not any(True for _ in shard_blocks(s, keep)) for s in shards):
            raise HyperofaError(
                f"language {lang} has too few blocks to give every rank and loader worker its own; "
                "lower pretrain.num_workers or the rank count, or drop the language (pretrain.language_weights)"
            )


class BlockStream(torch.utils.data.IterableDataset):
    """The endless micro-batch stream of one rank for one data epoch (split further by loader worker)."""

    def __init__(
        self,
        shards: dict[str, list[str]],
        probabilities: np.ndarray,
        *,
        seed: int,
        epoch_start: int,
        rank: int,
        world_size: int,
        micro_batch_size: int,
        shuffle_buffer: int,
        mask: Optional[MaskSpec],
        audit: bool = False,
    ):
        super().__init__()
        self.languages = sorted(shards)
        self.shards = shards
        self.probabilities = np.asarray(probabilities, dtype=np.float64)
        self.seed, self.epoch_start = seed, epoch_start
        self.rank, self.world_size = rank, world_size
        self.micro_batch_size = micro_batch_size
        self.shuffle_buffer = shuffle_buffer
        self.mask = mask
        self.audit = audit

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        slot, n_slots = self.rank * n_workers + worker, self.world_size * n_workers
        base = (self.seed, self.epoch_start, self.rank, worker)
        rng = np.random.default_rng(mix_seed(*base, "mix"))
        active = [i for i, p in enumerate(self.probabilities) if p > 0]
        streams = {}
        for i in active:
            lang = self.languages[i]
            mine, keep = slot_shards(self.shards[lang], slot, n_slots)
            streams[i] = resampled_blocks(mine, keep, np.random.default_rng(mix_seed(*base, lang)), lang)
        probs = self.probabilities[active] / self.probabilities[active].sum()
        buffer: list[tuple[str, str, np.ndarray]] = []
        batch: list[tuple[str, str, np.ndarray]] = []
        special = torch.tensor(self.mask.special_ids, dtype=torch.long) if self.mask is not None else None
        n_batch = 0
        while True:
            i = active[int(rng.choice(len(active), p=probs))]
            block_id, block = next(streams[i])
            buffer.append((self.languages[i], block_id, block))
            if len(buffer) < self.shuffle_buffer:
                continue
            pick = int(rng.integers(len(buffer)))
            buffer[pick], buffer[-1] = buffer[-1], buffer[pick]
            batch.append(buffer.pop())
            if len(batch) < self.micro_batch_size:
                continue
            ids = torch.from_numpy(np.stack([b[2] for b in batch]).astype(np.int64))
            if self.mask is None:
                out = {"input_ids": ids, "langs": [b[0] for b in batch]}
            else:
                generator = torch.Generator().manual_seed(mix_seed(*base, "mask", n_batch))
                inputs, labels = mask_tokens(
                    ids, special, self.mask.mask_id, self.mask.vocab_size, generator, self.mask.probability
                )
                out = {"input_ids": inputs, "labels": labels, "langs": [b[0] for b in batch]}
            if self.audit:
                out["block_ids"] = [f"{b[0]}/{b[1]}" for b in batch]
            yield out
            batch = []
            n_batch += 1


def _collate_none(batch):
    return batch


def train_loader(
    shardset: ShardSet,
    probabilities: np.ndarray,
    *,
    seed: int,
    epoch_start: int,
    rank: int,
    world_size: int,
    micro_batch_size: int,
    n_batches: int,
    shuffle_buffer: int,
    mask: Optional[MaskSpec],
    num_workers: int,
    prefetch_factor: int,
    audit: bool = False,
):
    """A webdataset `WebLoader` yielding exactly `n_batches` micro-batches (dicts of tensors) on this rank."""
    import webdataset as wds

    stream = BlockStream(
        shardset.train,
        probabilities,
        seed=seed,
        epoch_start=epoch_start,
        rank=rank,
        world_size=world_size,
        micro_batch_size=micro_batch_size,
        shuffle_buffer=shuffle_buffer,
        mask=mask,
        audit=audit,
    )
    extra = {"prefetch_factor": prefetch_factor, "persistent_workers": False} if num_workers > 0 else {}
    loader = wds.WebLoader(stream, batch_size=None, num_workers=num_workers, collate_fn=_collate_none, **extra)
    return loader.with_epoch(n_batches)


def heldout_batches(
    shards: list[str], n_blocks: int, micro_batch_size: int, mask: Optional[MaskSpec], seed: int, lang: str
) -> list[dict]:
    """The first `n_blocks` held-out blocks of a language, masked with a fixed seed: the same batches every eval
    (unmasked for a causal LM, `mask=None`)."""
    blocks = first_blocks(shards, n_blocks, [lang]).get(lang)
    if blocks is None or not len(blocks):
        return []
    ids = torch.from_numpy(blocks.astype(np.int64))
    if mask is None:
        return [{"input_ids": ids[s : s + micro_batch_size]} for s in range(0, len(blocks), micro_batch_size)]
    generator = torch.Generator().manual_seed(mix_seed(seed, HELDOUT, lang))
    special = torch.tensor(mask.special_ids, dtype=torch.long)
    inputs, labels = mask_tokens(ids, special, mask.mask_id, mask.vocab_size, generator, mask.probability)
    # From the ids before masking: a random replacement that happens to be the pad id is still a real position.
    attention = (ids != mask.pad_id).long() if mask.pad_id is not None else torch.ones_like(ids)
    return [
        {
            "input_ids": inputs[s : s + micro_batch_size],
            "labels": labels[s : s + micro_batch_size],
            "attention_mask": attention[s : s + micro_batch_size],
        }
        for s in range(0, len(blocks), micro_batch_size)
    ]


def mask_spec(tokenizer, probability: float) -> MaskSpec:
    return MaskSpec(
        special_ids=tuple(sorted(set(int(i) for i in tokenizer.all_special_ids))),
        mask_id=int(tokenizer.mask_token_id),
        vocab_size=len(tokenizer),
        probability=probability,
        pad_id=int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else None,
    )
