"""Builders for the pretraining tests: a target tokenizer over all languages, a tiny expanded model laid out like
the init stage's output, and prepare shards (the real Ray stage, or a quick in-process writer of the same format)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hyperofa_dist import synthetic
from hyperofa_dist.artifacts import Stage
from hyperofa_dist.config import load_config
from hyperofa_dist.target import tokenizer_fingerprint
from hyperofa_dist.tracking import NullTracker

BLOCK = 32
COPIED = 300  # rows [0, COPIED) play the tokens copied from the source model


def tokenizer_and_model(root: Path, corpus: Path, vocab: int = 500, seed: int = 0) -> tuple[Path, Path]:
    """(tokenizer dir, model dir) with the model at <root>/init/hyperofa/model and a provenance.npy beside it."""
    texts = [line for f in sorted(corpus.iterdir()) for line in synthetic.read_lines(f, 400)]
    tok = synthetic.train_source_tokenizer("xlmr", texts, vocab, root / f"tok{seed}")
    model = synthetic.make_tiny_model("xlmr", tok, root / "init" / "hyperofa" / "model", max_position=BLOCK + 8, seed=seed)
    from transformers import AutoConfig

    rows = AutoConfig.from_pretrained(model).vocab_size
    provenance = np.full(rows, 3, dtype=np.uint8)
    provenance[:COPIED] = 0
    np.save(model.parent / "provenance.npy", provenance)
    return tok, model


def real_prepare(run_dir: Path, corpus: Path, tok: Path) -> Path:
    """`hyperofa prepare` (Ray, one CPU) into <run_dir>/prepare with small shards so languages have several."""
    from data_prep.prepare import run_prepare_stage

    config = load_config(
        None,
        [
            f"run.dir={run_dir}",
            f"corpus.path={corpus}",
            f"tokenizer.path={tok}",
            f"prepare.block_size={BLOCK}",
            "prepare.blocks_per_sample=4",
            "prepare.samples_per_shard=8",
            "prepare.heldout_fraction=0.05",
            "ray.num_cpus=1",
            "tracking.enabled=false",
        ],
    )
    assert run_prepare_stage(config, NullTracker()) == 0
    return run_dir / "prepare"


def quick_prepare(out: Path, corpus: Path, tok: Path, languages: int = 3, lines: int = 200) -> Path:
    """Shards in prepare's format and layout plus a manifest, written in-process (no Ray): for fast tests."""
    from transformers import AutoTokenizer

    from data_prep.shards import build_shards

    tokenizer = AutoTokenizer.from_pretrained(str(tok))
    stage = Stage(out.parent, out.name)
    stage.begin("quick")
    shards = []
    for path in sorted(corpus.iterdir())[:languages]:
        lang = path.name.split(".")[0]
        ids = [i for line in synthetic.read_lines(path, lines) for i in tokenizer(line)["input_ids"]]
        n = len(ids) // BLOCK
        blocks = np.asarray(ids[: n * BLOCK], dtype=np.uint32).reshape(n, BLOCK)
        cut = max(1, n // 10)
        for split, part in (("heldout", blocks[:cut]), ("train", blocks[cut:])):
            for shard in build_shards(part, lang, 0, 4, 4):
                target = out / split / shard.name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(shard.data)
                shards.append({"path": f"{split}/{shard.name}", "split": split, "lang": lang, "blocks": shard.blocks})
    stage.write_manifest(
        config={},
        inputs={"tokenizer": tokenizer_fingerprint(tok)},
        outputs=[],
        extra={"shards": shards, "block_size": BLOCK},
    )
    return out
