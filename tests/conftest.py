"""Shared fixtures: a generated multilingual world, corpora and source tokenizers (all made here, none downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from hyperofa_dist import synthetic  # noqa: E402


@pytest.fixture(scope="session")
def world() -> synthetic.World:
    return synthetic.World(synthetic.default_languages(6), n_concepts=3000, seed=0)


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory, world) -> Path:
    """6 languages, 3 scripts (Latn, Cyrl, Grek), skewed sizes, one gzipped file; line i parallel across files."""
    root = tmp_path_factory.mktemp("corpus")
    sizes = synthetic.skewed_sizes(world.languages, largest=3000, ratio=0.4)
    synthetic.write_corpus(root, world, sizes, seed=0, gzip_languages=["qab_Cyrl"])
    return root


@pytest.fixture(scope="session")
def source_tokenizers(tmp_path_factory, small_corpus) -> dict[str, Path]:
    """One HF-format source tokenizer per family, trained on the first language only (the 'source language')."""
    root = tmp_path_factory.mktemp("source_tok")
    texts = synthetic.read_lines(small_corpus / "qaa_Latn.txt")
    return {fam: synthetic.train_source_tokenizer(fam, texts, 400, root / fam) for fam in synthetic.FAMILIES}


@pytest.fixture(scope="session")
def trained_vectors(tmp_path_factory, small_corpus) -> Path:
    """Cross-lingual `iso:word` vectors trained here by `hyperofa vectors train` on the parallel small_corpus."""
    from hyperofa_dist import cli

    run_dir = tmp_path_factory.mktemp("vectors_run")
    argv = ["vectors", "train", f"run.dir={run_dir}", f"vectors.train.corpus={small_corpus}", "tracking.enabled=false",
            "vectors.train.dim=48", "vectors.train.epochs=10", "vectors.train.alpha=0.25"]
    assert cli.main(argv) == 0
    return run_dir / "vectors" / "vectors.kv"
