"""Tokenizer fertility: pieces per whitespace word of a sample under two tokenizers (source vs target), who splits
each word less, and unknown-token rates. Shared by the tokenizer stage (its sample report) and evaluate (a causal
LM's held-out texts); pure functions over `tokenizers.Tokenizer` objects.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from tokenizers import Tokenizer

_WORD = re.compile(r"\S+")


@dataclass
class FertilityReport:
    """Pieces per whitespace word of one language's sample, source vs target."""

    words: int
    fertility_source: float
    fertility_target: float
    share_fewer_target: float  # words the target splits into fewer pieces than the source
    share_fewer_source: float  # words the source splits into fewer pieces than the target
    unk_rate_source: float
    unk_rate_target: float

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


def pieces_per_word(tokenizer: Tokenizer, texts: Sequence[str], unk_id: Optional[int]) -> np.ndarray:
    """Pieces of every whitespace-separated word of `texts`, in order (no special tokens).

    Each piece belongs to the word its offsets start in (a leading space marker belongs to the next word). An
    unknown token counts one piece per character it replaced: a tokenizer must not look efficient by giving up.
    """
    counts: list[np.ndarray] = []
    encodings = tokenizer.encode_batch(list(texts), add_special_tokens=False)
    for text, enc in zip(texts, encodings):
        ends = np.array([m.end() for m in _WORD.finditer(text)], dtype=np.int64)
        if len(ends) == 0:
            continue
        starts = np.array([s for s, _ in enc.offsets], dtype=np.int64)
        weights = np.ones(len(starts), dtype=np.int64)
        if unk_id is not None:
            for k, (token_id, (s, e)) in enumerate(zip(enc.ids, enc.offsets)):
                if token_id == unk_id:
                    weights[k] = max(1, e - s)
        word = np.minimum(np.searchsorted(ends, starts, side="right"), len(ends) - 1)
        counts.append(np.bincount(word, weights=weights, minlength=len(ends)).astype(np.int64))
    return np.concatenate(counts) if counts else np.zeros(0, dtype=np.int64)


def _unk_id(tokenizer: Tokenizer) -> Optional[int]:
    model = json.loads(tokenizer.to_str())["model"]
    if model.get("type") == "Unigram":
        return model.get("unk_id")
    token = model.get("unk_token")
    return tokenizer.token_to_id(token) if token else None


def unk_rate(tokenizer: Tokenizer, texts: Sequence[str]) -> float:
    unk = _unk_id(tokenizer)
    if unk is None:
        return 0.0
    ids = [i for enc in tokenizer.encode_batch(list(texts), add_special_tokens=False) for i in enc.ids]
    return float(np.mean(np.asarray(ids) == unk)) if ids else 0.0


def fertility(source: Tokenizer, target: Tokenizer, texts: Sequence[str]) -> FertilityReport:
    """Source vs target on one language's sentences: pieces per word and who splits each word less."""
    s = pieces_per_word(source, texts, _unk_id(source))
    t = pieces_per_word(target, texts, _unk_id(target))
    if len(s) != len(t):
        raise AssertionError("source and target saw different words")
    n = len(s)
    return FertilityReport(
        words=n,
        fertility_source=float(s.sum() / n) if n else 0.0,
        fertility_target=float(t.sum() / n) if n else 0.0,
        share_fewer_target=float(np.mean(t < s)) if n else 0.0,
        share_fewer_source=float(np.mean(s < t)) if n else 0.0,
        unk_rate_source=unk_rate(source, texts),
        unk_rate_target=unk_rate(target, texts),
    )
