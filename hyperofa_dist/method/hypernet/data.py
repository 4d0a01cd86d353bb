"""Hypernetwork data from CSR postings, written for many ranks (HyperOFA `hypernetwork/`: dataset and sampler).

- `WordTable`: the frozen word-vector table, memory-mapped once per rank; rows are gathered per batch, so the
  table is never a parameter, never on the optimizer, never in a checkpoint.
- `augment`: with probability `prob`, a list longer than `threshold` is replaced by a random 50-100 % subset in
  random order, then capped (256); with `shuffle` every other list is read in a fresh random order too (the
  report's per-epoch shuffle), else in ascending word index. The generator is seeded per (seed, epoch, rank).
- `context_words`: which words a list longer than the cap keeps when it is not augmented (validation, test,
  prediction, and the other half of training): a seeded sample fixed per token, the same in every split and
  epoch, spread over the whole list (`hypernet.context=sample`); `first` keeps the lowest word indices, which for a
  word table grouped by language means the first few languages only. The reference kept CPython set order, an
  arbitrary but fixed subset (docs/FIDELITY.md).
- `rank_batches`: one seeded permutation shared by all ranks, cut into groups of `group_factor` batches sorted by
  pre-augmentation length, cut into batches; batch j goes to rank j mod world. Ranks therefore get disjoint
  samples and exactly the same number of batches (the remainder is dropped, as the reference's drop_last).
- `collate`: pad word ids with -1 to the batch's longest list; the mask marks real words.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ...formats.files import load_npy
from ...formats.mapping import Postings
from ...runtime.seeds import generator

PAD = -1


@dataclass(frozen=True)
class AugmentSpec:
    prob: float = 0.5
    threshold: int = 4
    min_fraction: float = 0.5
    max_fraction: float = 1.0
    shuffle: bool = False  # read every training list in a fresh order each epoch (hypernet.shuffle_words)


class WordTable:
    """The frozen word vectors. On CPU a read-only memory map (ranks share the page cache); on a GPU one copy in
    device memory, made once per rank."""

    def __init__(self, path: str | Path, device: torch.device | str = "cpu"):
        self.path = Path(path)
        self.array = load_npy(self.path, mmap=True, what="word table")
        self.device = torch.device(device)
        self._on_device: Optional[torch.Tensor] = None
        if self.device.type != "cpu":
            self._on_device = torch.from_numpy(np.ascontiguousarray(self.array, dtype=np.float32)).to(self.device)

    @property
    def num_words(self) -> int:
        return int(self.array.shape[0])

    @property
    def dim(self) -> int:
        return int(self.array.shape[1])

    def lookup(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, L] word ids (PAD where mask is False) -> [B, L, dim] float32 on this table's device, zeros at PAD."""
        safe = ids.clamp(min=0)
        if self._on_device is not None:
            out = self._on_device[safe.to(self.device)]
            return out * mask.to(self.device).unsqueeze(-1).to(out.dtype)
        rows = np.asarray(self.array[safe.numpy().reshape(-1)], dtype=np.float32)
        out = torch.from_numpy(rows).view(*ids.shape, self.dim)
        out[~mask] = 0.0
        return out


@dataclass
class Batch:
    token_ids: torch.Tensor  # [B] int64
    words: torch.Tensor  # [B, L] int64, PAD-padded
    mask: torch.Tensor  # [B, L] bool
    targets: torch.Tensor  # [B, k] float32

    def __len__(self) -> int:
        return int(self.token_ids.shape[0])


@dataclass(frozen=True)
class ContextRule:
    """How a list longer than the cap is cut when it is not augmented; `side` keeps source and target tokens of the
    same id on independent samples."""

    rule: str = "sample"  # "sample" or "first"
    seed: int = 0
    side: str = "source"


def context_words(words: np.ndarray, cap: int, token_id: int, rule: ContextRule) -> np.ndarray:
    if len(words) <= cap or rule.rule == "first":
        return words[:cap]
    pick = generator(rule.seed, "context", rule.side, int(token_id)).choice(len(words), cap, replace=False)
    return words[np.sort(pick)]


def augment(
    words: np.ndarray, rng: np.random.Generator, spec: AugmentSpec, cap: int, fixed: Optional[np.ndarray] = None
) -> np.ndarray:
    """A random 50-100 % subset in random order (with probability `prob`, lists longer than `threshold`), capped;
    otherwise `fixed` (the token's context) or the first `cap` words, in a random order with `spec.shuffle`."""
    if rng.random() < spec.prob and len(words) > spec.threshold:
        fraction = rng.uniform(spec.min_fraction, spec.max_fraction)
        n = max(1, int(len(words) * fraction))
        return words[rng.permutation(len(words))[:n]][:cap]
    kept = words[:cap] if fixed is None else fixed
    return kept[rng.permutation(len(kept))] if spec.shuffle else kept


def collate(token_ids: np.ndarray, word_lists: Sequence[np.ndarray], targets: np.ndarray) -> Batch:
    longest = max(len(w) for w in word_lists)
    words = np.full((len(word_lists), longest), PAD, dtype=np.int64)
    for row, w in enumerate(word_lists):
        words[row, : len(w)] = w
    words_t = torch.from_numpy(words)
    return Batch(
        token_ids=torch.from_numpy(np.asarray(token_ids, dtype=np.int64)),
        words=words_t,
        mask=words_t != PAD,
        targets=torch.from_numpy(np.ascontiguousarray(targets, dtype=np.float32)),
    )


def epoch_seed(seed: int, epoch: int, rank: int, stream: str) -> np.random.Generator:
    """Independent generator per (seed, stream, epoch, rank): no state to carry across a resume."""
    return generator(seed, stream, epoch, rank)


SHUFFLE_STREAM, AUGMENT_STREAM = "shuffle", "augment"


def rank_batches(
    lengths: np.ndarray,
    *,
    batch_size: int,
    world_size: int,
    rank: int,
    seed: int,
    epoch: int,
    group_factor: int = 40,
    multiple_of: int = 1,
) -> list[np.ndarray]:
    """This rank's batches for one epoch, as arrays of positions into the split.

    Every rank computes the same permutation (seeded by seed and epoch only), so the assignment is a partition.
    The per-rank batch count is rounded down to a multiple of `multiple_of` (gradient accumulation).
    """
    per_rank = len(lengths) // (batch_size * world_size)
    per_rank -= per_rank % multiple_of
    total = per_rank * world_size
    order = epoch_seed(seed, epoch, 0, SHUFFLE_STREAM).permutation(len(lengths))[: total * batch_size]
    group = batch_size * group_factor
    grouped = [
        chunk[np.argsort(lengths[chunk], kind="stable")]
        for chunk in (order[i : i + group] for i in range(0, len(order), group))
    ]
    flat = np.concatenate(grouped) if grouped else np.empty(0, dtype=np.int64)
    return list(flat.reshape(total, batch_size)[rank::world_size]) if total else []


class TokenSet:
    """Tokens (a split, or target tokens to predict) with their postings and, when known, their target rows."""

    def __init__(
        self,
        token_ids: np.ndarray,
        postings: Postings,
        targets: Optional[np.ndarray],
        k: int,
        context: ContextRule = ContextRule(),
    ):
        self.token_ids = np.asarray(token_ids, dtype=np.int64)
        self.postings = postings
        self.targets = targets
        self.k = k
        self.context = context
        self.lengths = postings.lengths(self.token_ids)

    def __len__(self) -> int:
        return len(self.token_ids)

    def batch(
        self,
        positions: np.ndarray,
        cap: int,
        rng: Optional[np.random.Generator] = None,
        spec: Optional[AugmentSpec] = None,
    ) -> Batch:
        ids = self.token_ids[positions]
        lists = []
        for tid in ids:
            words = self.postings.words(int(tid))
            fixed = context_words(words, cap, int(tid), self.context)
            lists.append(augment(words, rng, spec, cap, fixed) if rng is not None else fixed)
        targets = self.targets[ids] if self.targets is not None else np.zeros((len(ids), self.k), np.float32)
        return collate(ids, lists, targets)


def eval_rounds(n: int, batch_size: int, world_size: int, rank: int) -> list[tuple[np.ndarray, float]]:
    """Validation/test batches of this rank: consecutive chunks in split order, dealt round-robin. Every rank gets
    the same number of rounds (ZeRO-3 gathers parameters in each forward); a rank without a chunk in the last
    round repeats its first one with weight 0, so the all-reduced sums count every sample exactly once."""
    chunks = [np.arange(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    rounds = -(-len(chunks) // world_size) if chunks else 0
    mine = chunks[rank::world_size]
    out = [(c, 1.0) for c in mine]
    filler = mine[0] if mine else (chunks[0] if chunks else None)
    while len(out) < rounds and filler is not None:
        out.append((filler, 0.0))
    return out
