"""The init methods as a table: `METHODS[name].predict(context)` gives the rows the method predicts for target tokens that
are not copied (ids ascending or as the method found them, coordinates [n, k]); the assembly (`assemble.py`) puts
the copied rows first and seeded random rows wherever no row was predicted (docs/METHOD.md §1.8).

- hyperofa: the hypernetwork stage's predictions, checked against the target vocabulary and the mapping's k, moved
  onto OFA's mean over the same tokens (`init.ofa_centre`, docs/METHOD.md §1.16) and optionally blended with OFA;
- ofa: the similarity-weighted combination of source rows over each covered new token's words (`method/ofa.py`);
- mean: the mean of the source rows of the pieces the source tokenizer splits a new token into (`mean.py`);
- random: nothing predicted, every row not copied is random.

Adding a method is one function here, one entry in `METHODS`, its provenance code in `assemble.PREDICTED` and
its name in the `init.method` key's choices (config.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from ..config import Config
from ..formats.hypernet import load_predictions
from ..formats.mapping import Mapping
from ..method import assemble as asm
from ..method.ofa import ofa_rows_of
from .mean import piece_means


@dataclass(frozen=True)
class MethodContext:
    config: Config
    mapping: Mapping
    source_tokenizer: Any
    target_tokenizer: Any
    target_dir: Path  # named in messages about the target tokenizer
    copy_t: np.ndarray  # target ids whose rows are copied (never predicted)
    progress: bool = False


@dataclass(frozen=True)
class Predicted:
    ids: Optional[np.ndarray]  # None: the method predicts nothing
    rows: Optional[np.ndarray]
    note: Optional[str] = None  # a line for the user about rows the method could not predict


def covered_new_tokens(mapping: Mapping, copied: np.ndarray) -> np.ndarray:
    """Target tokens with words that are not copied: the set HyperOFA predicts and OFA initialises (docs/METHOD.md §1.8)."""
    return np.setdiff1d(mapping.target_postings.covered(), copied)


def hyperofa(ctx: MethodContext) -> Predicted:
    ids, rows = load_predictions(ctx.config.run_dir)
    asm.check_predictions(ids, rows, len(ctx.target_tokenizer), ctx.mapping.k, "hypernet predictions")
    c = ctx.config.init
    # OFA covers exactly the tokens the hypernetwork predicts (docs/METHOD.md §2)
    ofa = ofa_rows_of(ctx.mapping, ctx.config, ids, ctx.progress) if c.ofa_blend > 0 or c.ofa_centre else None
    return Predicted(ids, asm.hyperofa_rows(ids, rows, ofa, c.ofa_blend, c.ofa_centre))


def ofa(ctx: MethodContext) -> Predicted:
    ids = covered_new_tokens(ctx.mapping, ctx.copy_t)
    return Predicted(ids, ofa_rows_of(ctx.mapping, ctx.config, ids, ctx.progress))


def mean(ctx: MethodContext) -> Predicted:
    uncopied = np.setdiff1d(np.arange(len(ctx.target_tokenizer), dtype=np.int64), ctx.copy_t)
    means = piece_means(ctx.source_tokenizer, ctx.target_tokenizer, uncopied, ctx.mapping.source_coordinates,
                        f"target tokenizer {ctx.target_dir}")
    note = f"{means.without} new tokens split into the source's unknown token: they stay random" if means.without else None
    return Predicted(means.token_ids, means.rows, note)


def random(ctx: MethodContext) -> Predicted:
    return Predicted(None, None)


@dataclass(frozen=True)
class InitMethod:
    predict: Callable[[MethodContext], Predicted]
    reads_hypernet: bool = False  # the hypernet stage's outputs are among the stage's inputs


METHODS: dict[str, InitMethod] = {
    "hyperofa": InitMethod(hyperofa, reads_hypernet=True),
    "ofa": InitMethod(ofa),
    "random": InitMethod(random),
    "mean": InitMethod(mean),
}
