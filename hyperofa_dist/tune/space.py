"""The trials' settings and the winner: pure functions of the config and the trials' results."""

from __future__ import annotations

import math
from typing import Any, Optional

from ..runtime.seeds import generator

STREAM = "tune-space"


def tune_seed(config: Any) -> int:
    return config.tune.seed if config.tune.seed is not None else config.run.seed


def sample_settings(space: dict[str, list[Any]], trials: int, seed: int) -> list[dict[str, Any]]:
    """`trials` settings, each one choice per key drawn from the seeded stream; repeated draws are skipped while
    the space still has unseen combinations, so a small space is covered instead of re-sampled."""
    keys = sorted(space)
    size = math.prod(len(space[k]) for k in keys)
    rng = generator(seed, STREAM)
    out: list[dict[str, Any]] = []
    seen: set[tuple[int, ...]] = set()
    while len(out) < trials:
        pick = tuple(int(rng.integers(len(space[k]))) for k in keys)
        if pick in seen and len(seen) < size:
            continue
        seen.add(pick)
        out.append({k: space[k][i] for k, i in zip(keys, pick)})
    return out


def hypernet_changes(settings: dict[str, Any], epochs: int) -> dict[str, Any]:
    """A trial's settings as dotted config keys; every trial trains (at most) tune.epochs epochs."""
    return {**{f"hypernet.{k}": v for k, v in settings.items()}, "hypernet.epochs": epochs}


def winner(rows: list[dict[str, Any]], key: str) -> Optional[int]:
    """The index of the row with the lowest finite `key` (ties: the earlier trial); None when no row has one."""
    scored = [(row[key], i) for i, row in enumerate(rows) if isinstance(row.get(key), float) and math.isfinite(row[key])]
    return min(scored)[1] if scored else None
