"""`hyperofa bench variants`: the cheapest candidate fixes for HyperOFA's new rows (issue: its rows lose to OFA's at
the new tokens' positions), judged at step 0 by the init stage's new-token MLM loss, so no continued pretraining.

On the demo's generated world (built once), or on `--corpus DIR` (a line-aligned corpus, `<iso>_<Script>.txt`) with
the source model the overrides name (`source.model=...`: the real-text check, docs/METHOD.md §3.11), and for each
of three run seeds: the demo config's tokenizer, prepare, vectors and mapping stages (overrides apply), then

    random                          the baseline every method must beat
    ofa, ofa+recentre               OFA, and OFA with its rows re-centred on the copied rows' mean (init.recentre)
    hyperofa, hyperofa+recentre     the hypernetwork as configured (ascending word order), raw and re-centred
    shuffled, shuffled+recentre     the hypernetwork trained with hypernet.shuffle_words=true, raw and re-centred

Reported per variant and seed: the step-0 MLM loss at masked new-token positions (held-out text), the held-out
coordinate cosine of the raw predictions, and the new rows' statistics (norm, norm of the mean row, its share of
the energy, cosine to the copied rows' mean); their means over seeds; and per variant how many seeds it beats the
variant it modifies on the new-token loss. Prints one JSON line.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..config import DEMO_CONFIG, load_config
from ..formats.hypernet import stage_of as hypernet_stage
from ..formats.init import stage_of as init_stage
from ..registry import command
from ..synthetic.demo import WorldSpec, build_world
from ..tracking import NullTracker

SEEDS = (0, 1, 2)
# variant -> (init method, hypernet.shuffle_words, init.recentre, the variant it modifies)
VARIANTS: dict[str, tuple[str, bool, bool, str | None]] = {
    "random": ("random", False, False, None),
    "ofa": ("ofa", False, False, None),
    "ofa+recentre": ("ofa", False, True, "ofa"),
    "hyperofa": ("hyperofa", False, False, None),
    "hyperofa+recentre": ("hyperofa", False, True, "hyperofa"),
    "shuffled": ("hyperofa", True, False, "hyperofa"),
    "shuffled+recentre": ("hyperofa", True, True, "shuffled"),
}
ROW_FIGURES = ("norm_mean", "mean_norm", "mean_share", "cosine_to_copy_mean")


def figures_of(run_dir: Path, method: str) -> dict[str, float]:
    manifest = init_stage(run_dir, method).require()
    out = {"new_token_mlm_loss": float(manifest["new_token_mlm_loss"]["average"])}
    if method in manifest["heldout_cosine"]:
        out["heldout_cosine"] = float(manifest["heldout_cosine"][method])
    new = manifest["rows"]["new"]
    out.update({f"new_rows_{name}": float(new[name]) for name in ROW_FIGURES})
    return out


def run(config: Any, args: Any) -> int:
    keep = getattr(args, "workdir", None)
    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="hyperofa-bench-variants-"))
    overrides = list(getattr(args, "overrides", []))
    base = load_config(DEMO_CONFIG, [*overrides, "tracking.enabled=false"])
    corpus = getattr(args, "corpus", None)
    if corpus:
        corpus_dir, source_model = Path(corpus).resolve(), base.source.model
    else:
        world = build_world(root / "world", WorldSpec(seed=0, block_size=base.prepare.block_size))
        corpus_dir, source_model = world.corpus, str(world.source_model)
    per_seed: dict[str, dict[str, list[float]]] = {name: {} for name in VARIANTS}
    try:
        for seed in SEEDS:
            run_dir = root / f"seed{seed}"
            common = [f"run.dir={run_dir}", f"run.seed={seed}", f"source.model={source_model}",
                      f"corpus.path={corpus_dir}", *overrides, "tracking.enabled=false"]
            seed_config = load_config(DEMO_CONFIG, common)
            for name in ("tokenizer", "prepare", "vectors", "mapping"):
                command(name).load()(seed_config, NullTracker())
            trained_with = None
            for variant, (method, shuffle, recentre, _) in VARIANTS.items():
                variant_config = seed_config.with_changes(
                    {"init.method": method, "init.recentre": recentre, "hypernet.shuffle_words": shuffle})
                if method == "hyperofa" and trained_with != shuffle:
                    shutil.rmtree(hypernet_stage(run_dir).path, ignore_errors=True)
                    command("hypernet").load()(variant_config, NullTracker())
                    trained_with = shuffle
                shutil.rmtree(init_stage(run_dir, method).path, ignore_errors=True)
                command("init").load()(variant_config, NullTracker())
                figures = figures_of(run_dir, method)
                for key, value in figures.items():
                    per_seed[variant].setdefault(key, []).append(round(value, 5))
                print(f"[bench variants] seed {seed} {variant}: {figures}", file=sys.stderr, flush=True)
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    means = {v: {k: round(float(np.mean(x)), 5) for k, x in figs.items()} for v, figs in per_seed.items()}
    wins = {
        variant: int(sum(a < b for a, b in zip(per_seed[variant]["new_token_mlm_loss"],
                                               per_seed[parent]["new_token_mlm_loss"])))
        for variant, (_, _, _, parent) in VARIANTS.items() if parent is not None
    }
    print(json.dumps({"bench": "variants", "corpus": str(corpus_dir) if corpus else "generated", "source": source_model,
                      "seeds": list(SEEDS), "per_seed": per_seed, "mean": means,
                      "seeds_with_lower_new_token_loss_than_the_unmodified_variant": wins}))
    return 0
