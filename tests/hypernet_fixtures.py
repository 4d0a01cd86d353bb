"""A valid `<run_dir>/mapping/` from generated arrays, and the config that trains a small hypernetwork on it."""

from __future__ import annotations

from pathlib import Path

from hyperofa_dist.config import Config, load_config
from hyperofa_dist.hypernet.synthetic_mapping import SyntheticMapping, make_mapping

# Small enough to train in seconds on one core, large enough that a broken pipeline cannot reach cosine 0.9.
SMALL = dict(n_words=3000, word_dim=16, v_source=1200, v_target=1600, k=8)


def mapping_world(run_dir: Path, **sizes) -> SyntheticMapping:
    return make_mapping(run_dir, **{**SMALL, **sizes})


def small_overrides(m: SyntheticMapping, *overrides: str) -> list[str]:
    return [
        f"run.dir={m.run_dir}",
        f"vectors.path={m.vectors_file}",
        f"mapping.num_primitives={m.k}",
        "tracking.enabled=false",
        "hypernet.num_layers=1",
        "hypernet.hidden_size=32",
        "hypernet.dropout=0.1",
        "hypernet.batch_size=32",
        "hypernet.lr=0.003",
        "hypernet.epochs=4",
        "hypernet.threads_per_rank=1",
        *overrides,
    ]


def small_config(m: SyntheticMapping, *overrides: str) -> Config:
    return load_config(None, small_overrides(m, *overrides))
