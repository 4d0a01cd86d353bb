"""Seeded language sampling: how many sentences each language and each chunk keeps, held-out or for training.

The plan is decided in two steps so that it never depends on how Ray schedules tasks:
1. per chunk, the held-out count h = round(f * n) of its n sentences; per language, from the counts of the
   whole corpus, the training budget T_i (temperature sampling p_i ∝ m_i^alpha to `total_sentences`, m_i the
   language's non-held-out sentences, then the per-language cap), spread over the language's chunks in
   proportion to their training sentences (largest remainder, exact integers, ties to the lower chunk index).
   Without a budget or a cap every training sentence is kept once, and a chunk's plan needs only its own n;
2. per chunk, from a generator seeded by (seed, lang, chunk) alone: which sentences are held out, and each
   training sentence's multiplicity (every sentence `t // m` times, `t % m` distinct ones once more).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np


def split_proportionally(total: int, weights: list[int]) -> list[int]:
    """Integers summing to `total`, proportional to `weights` (largest remainder, exact, ties to lower index)."""
    weight_sum = sum(weights)
    if total == 0 or weight_sum == 0:
        if total:
            raise ValueError("cannot spread a positive total over zero weights")
        return [0] * len(weights)
    shares = [total * w // weight_sum for w in weights]
    remainders = [total * w % weight_sum for w in weights]
    short = total - sum(shares)
    for index in sorted(range(len(weights)), key=lambda i: (-remainders[i], i))[:short]:
        shares[index] += 1
    return shares


def heldout_count(n_sentences: int, fraction: float) -> int:
    """round(f * n), leaving at least one training sentence: a held-out set never empties a language."""
    if n_sentences <= 1 or fraction <= 0.0:
        return 0
    return min(int(math.floor(fraction * n_sentences + 0.5)), n_sentences - 1)


def temperature_budgets(
    train_counts: dict[str, int],
    alpha: float,
    total: Optional[int],
    cap: Optional[int],
    upsample: bool,
) -> dict[str, int]:
    """Training sentences per language: p_i ∝ m_i^alpha to `total` (else every sentence once), then the cap.

    Without `upsample` a language never gets more than its own sentences; the share it cannot fill is not
    redistributed, so a small language's budget never depends on whether another one could absorb it.
    """
    langs = sorted(train_counts)
    if total is None:
        budgets = {lang: train_counts[lang] for lang in langs}
    else:
        weights = np.array([train_counts[lang] ** alpha if train_counts[lang] else 0.0 for lang in langs])
        if weights.sum() == 0:
            budgets = {lang: 0 for lang in langs}
        else:
            quotas = total * weights / weights.sum()
            shares = np.floor(quotas).astype(np.int64)
            order = sorted(range(len(langs)), key=lambda i: (-(quotas[i] - shares[i]), i))
            for i in order[: total - int(shares.sum())]:
                shares[i] += 1
            budgets = {lang: int(s) for lang, s in zip(langs, shares)}
        if not upsample:
            budgets = {lang: min(b, train_counts[lang]) for lang, b in budgets.items()}
    if cap is not None:
        budgets = {lang: min(b, cap) for lang, b in budgets.items()}
    return budgets


@dataclass(frozen=True)
class ChunkPlan:
    """What one chunk keeps: `n` sentences in the chunk, `heldout` of them held out, `train` training copies."""

    n: int
    heldout: int
    train: int


def needs_corpus_counts(total: Optional[int], cap: Optional[int]) -> bool:
    """Whether chunk plans depend on other chunks' sizes (a budget or a cap), i.e. whether to count first."""
    return total is not None or cap is not None


def unbudgeted_plan(n: int, heldout_fraction: float) -> ChunkPlan:
    """The plan of a chunk when every training sentence is kept once: it needs only the chunk's own size."""
    heldout = heldout_count(n, heldout_fraction)
    return ChunkPlan(n, heldout, n - heldout)


def all_heldout_plan(n: int) -> ChunkPlan:
    """The plan of a chunk of a published held-out split (corpus.heldout_split): every sentence held out."""
    return ChunkPlan(n, n, 0)


def plan_chunks(
    chunk_counts: dict[str, list[int]],
    heldout_fraction: float | dict[str, float],
    alpha: float,
    total: Optional[int],
    cap: Optional[int],
    upsample: bool,
) -> dict[str, list[ChunkPlan]]:
    """Per language, the plan of each of its chunks (in chunk order) from every chunk's sentence count; the held-out
    fraction is one for all languages or one per language."""
    fraction = heldout_fraction if isinstance(heldout_fraction, dict) else dict.fromkeys(chunk_counts, heldout_fraction)
    heldouts = {lang: [heldout_count(n, fraction[lang]) for n in counts] for lang, counts in chunk_counts.items()}
    train_counts = {lang: sum(counts) - sum(heldouts[lang]) for lang, counts in chunk_counts.items()}
    budgets = temperature_budgets(train_counts, alpha, total, cap, upsample)
    plans: dict[str, list[ChunkPlan]] = {}
    for lang, counts in chunk_counts.items():
        heldout = heldouts[lang]
        train_sizes = [n - h for n, h in zip(counts, heldout)]
        train = split_proportionally(budgets[lang], train_sizes)
        plans[lang] = [ChunkPlan(n, h, t) for n, h, t in zip(counts, heldout, train)]
    return plans


def chunk_rng(seed: int, lang: str, chunk: int) -> np.random.Generator:
    """The generator of one chunk: a function of (seed, lang, chunk) only, never of scheduling."""
    lang_key = int.from_bytes(hashlib.sha256(lang.encode("utf-8")).digest()[:8], "little")
    return np.random.default_rng([seed, lang_key, chunk])


def select_sentences(plan: ChunkPlan, seed: int, lang: str, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """(sorted indices of held-out sentences, multiplicity of every sentence: 0 for held-out and unsampled)."""
    rng = chunk_rng(seed, lang, chunk)
    heldout = np.sort(rng.choice(plan.n, size=plan.heldout, replace=False)) if plan.heldout else np.zeros(0, np.int64)
    train_idx = np.setdiff1d(np.arange(plan.n), heldout, assume_unique=True)
    multiplicity = np.zeros(plan.n, dtype=np.int64)
    if plan.train:
        if train_idx.size == 0:
            raise ValueError(f"{lang} chunk {chunk}: a training budget of {plan.train} but no training sentences")
        whole, extra = divmod(plan.train, train_idx.size)
        multiplicity[train_idx] = whole
        if extra:
            multiplicity[train_idx[rng.choice(train_idx.size, size=extra, replace=False)]] += 1
    return heldout, multiplicity


def kept_order(multiplicity: np.ndarray) -> np.ndarray:
    """Training sentence indices in emission order: pass k holds, in file order, those kept more than k times.

    Copies of a sentence land in different passes, hence usually in different blocks, so a block never
    teaches the model to copy a sentence from its own context.
    """
    passes = int(multiplicity.max()) if multiplicity.size else 0
    return np.concatenate([np.flatnonzero(multiplicity > k) for k in range(passes)] or [np.zeros(0, np.int64)])
