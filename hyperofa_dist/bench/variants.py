"""`hyperofa bench variants`: the cheapest candidate fixes for HyperOFA's new rows (issue: its rows lose to OFA's at
the new tokens' positions), judged at step 0 by the init stage's new-token MLM loss, so no continued pretraining.

On the demo's generated world (built once), or on `--corpus DIR` (a line-aligned corpus, `<iso>_<Script>.txt`) with
the source model the overrides name (`source.model=...`: the real-text check, docs/METHOD.md §3.11). The demo
config's tokenizer, prepare, vectors and mapping stages (overrides apply) run once, with run.seed 0: they are the
check's inputs, the same for every seed. A seed is then the run.seed of what the variants differ by: the
hypernetwork (initial weights, batches, augmentation, dropout), the random rows, the masking of the held-out text and,
for a source without an MLM head and no `source.mlm_head`, the seeded head. For each of three seeds:

    random                          the baseline every method must beat
    ofa, ofa+recentre               OFA, and OFA with its rows re-centred on the copied rows' mean (init.recentre)
    hyperofa, hyperofa+recentre     the hypernetwork as configured (ascending word order), raw and re-centred
    hyperofa+ofa                    the hypernetwork's rows averaged with OFA's (init.ofa_blend=0.5)
    shuffled, shuffled+recentre     the hypernetwork trained with hypernet.shuffle_words=true, raw and re-centred
    shuffled+ofa                    shuffled, averaged with OFA's rows
    hyperofa+ofacentre, shuffled+ofacentre
                                    the hypernetwork's rows moved onto OFA's mean for the same tokens
                                    (init.ofa_centre)

With `--workdir` the files stay, and a re-run goes on where it stopped: finished stages are kept (each stage's own
up-to-date check) and the figures of finished variants are read back from `<workdir>/figures.jsonl`. Every
variant's F_t and provenance are kept under `<workdir>/rows/` for diagnostics on saved rows (checks/head_noise.py).

Reported per variant and seed: the step-0 MLM loss at masked new-token positions (held-out text), the held-out
coordinate cosine of the raw predictions, and the new rows' statistics (norm, norm of the mean row, its share of
the energy, cosine to the copied rows' mean); their means over seeds; and per variant how many seeds it beats the
variant it modifies, than OFA and than random on the new-token loss (the acceptance counts). Prints one JSON line.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..config import DEMO_CONFIG, load_config
from ..formats import init as init_format
from ..formats import mapping as mapping_format
from ..formats import shards as shards_format
from ..formats import tokenizer as tokenizer_format
from ..formats import vectors as vectors_format
from ..formats.init import stage_of as init_stage
from ..registry import command
from ..synthetic.demo import WorldSpec, build_world
from ..tracking import NullTracker

SEEDS = (0, 1, 2)
BLEND = 0.5
INPUT_STAGES = ("tokenizer", "prepare", "vectors", "mapping")
INPUT_DIRS = (tokenizer_format.STAGE, shards_format.STAGE, vectors_format.STAGE, mapping_format.STAGE)


@dataclass(frozen=True)
class Variant:
    method: str
    shuffle: bool = False
    recentre: bool = False
    blend: float = 0.0
    ofa_centre: bool = False
    parent: Optional[str] = None  # the variant it modifies


VARIANTS: dict[str, Variant] = {
    "random": Variant("random"),
    "ofa": Variant("ofa"),
    "ofa+recentre": Variant("ofa", recentre=True, parent="ofa"),
    "hyperofa": Variant("hyperofa"),
    "hyperofa+recentre": Variant("hyperofa", recentre=True, parent="hyperofa"),
    "hyperofa+ofa": Variant("hyperofa", blend=BLEND, parent="hyperofa"),
    "shuffled": Variant("hyperofa", shuffle=True, parent="hyperofa"),
    "shuffled+recentre": Variant("hyperofa", shuffle=True, recentre=True, parent="shuffled"),
    "shuffled+ofa": Variant("hyperofa", shuffle=True, blend=BLEND, parent="shuffled"),
    "hyperofa+ofacentre": Variant("hyperofa", ofa_centre=True, parent="hyperofa"),
    "shuffled+ofacentre": Variant("hyperofa", shuffle=True, ofa_centre=True, parent="shuffled"),
}
# The baselines and the plain hypernetwork first, for every seed, then the rest: on a slow machine the acceptance's
# figures come first.
PASSES = (("random", "ofa", "hyperofa", "hyperofa+ofa"),
          ("shuffled", "shuffled+ofa", "ofa+recentre", "hyperofa+recentre", "shuffled+recentre"),
          ("hyperofa+ofacentre", "shuffled+ofacentre"))
ROW_FIGURES = ("norm_mean", "mean_norm", "mean_share", "cosine_to_copy_mean")


def figures_of(run_dir: Path, method: str) -> dict[str, float]:
    manifest = init_stage(run_dir, method).require()
    out = {"new_token_mlm_loss": float(manifest["new_token_mlm_loss"]["average"])}
    if method in manifest["heldout_cosine"]:
        out["heldout_cosine"] = float(manifest["heldout_cosine"][method])
    new = manifest["rows"]["new"]
    out.update({f"new_rows_{name}": float(new[name]) for name in ROW_FIGURES})
    return out


def seed_dir(root: Path, seed: int, shuffle: bool) -> Path:
    """One run directory per seed and hypernetwork (plain or shuffled), the shared inputs linked in."""
    run_dir = root / (f"seed{seed}-shuffled" if shuffle else f"seed{seed}")
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in INPUT_DIRS:
        link = run_dir / name
        if not link.exists():
            link.symlink_to(root / "inputs" / name, target_is_directory=True)
    return run_dir


def wins_against(per_seed: dict[str, dict[str, list[float]]], variant: str, other: str) -> int:
    mine, theirs = per_seed[variant]["new_token_mlm_loss"], per_seed[other]["new_token_mlm_loss"]
    return int(sum(a < b for a, b in zip(mine, theirs)))


def run(config: Any, args: Any) -> int:
    keep = getattr(args, "workdir", None)
    root = Path(keep).resolve() if keep else Path(tempfile.mkdtemp(prefix="hyperofa-bench-variants-"))
    overrides = list(getattr(args, "overrides", []))
    base = load_config(DEMO_CONFIG, [*overrides, "tracking.enabled=false"])
    corpus = getattr(args, "corpus", None)
    if corpus:
        corpus_dir, source_model = Path(corpus).resolve(), base.source.model
    else:
        world = build_world(root / "world", WorldSpec(seed=0, block_size=base.prepare.block_size))
        corpus_dir, source_model = world.corpus, str(world.source_model)
    common = [f"source.model={source_model}", f"corpus.path={corpus_dir}", *overrides, "tracking.enabled=false"]
    done_file = root / "figures.jsonl"
    done: dict[tuple[int, str], dict[str, float]] = {}
    if done_file.exists():
        for line in done_file.read_text().splitlines():
            entry = json.loads(line)
            done[(entry["seed"], entry["variant"])] = entry["figures"]
    per_seed: dict[str, dict[str, list[float]]] = {name: {} for name in VARIANTS}
    timings: dict[str, float] = {}

    def timed(what: str, cfg: Any) -> None:
        t0 = time.perf_counter()
        command(what).load()(cfg, NullTracker())
        timings[what] = round(timings.get(what, 0.0) + time.perf_counter() - t0, 1)

    try:
        inputs_config = load_config(DEMO_CONFIG, [f"run.dir={root / 'inputs'}", "run.seed=0", *common])
        for name in INPUT_STAGES:
            timed(name, inputs_config)
        for names, seed in ((names, seed) for names in PASSES for seed in SEEDS):
            def config_of(spec: Variant) -> Any:
                run_dir = seed_dir(root, seed, spec.shuffle)
                return load_config(DEMO_CONFIG, [f"run.dir={run_dir}", f"run.seed={seed}", *common]).with_changes(
                    {"init.method": spec.method, "init.recentre": spec.recentre, "init.ofa_blend": spec.blend,
                     "init.ofa_centre": spec.ofa_centre,
                     "hypernet.shuffle_words": spec.shuffle})

            # The pass's hypernetworks first (each trains once per run directory, then is up to date).
            for shuffle in sorted({VARIANTS[v].shuffle for v in names if VARIANTS[v].method == "hyperofa"
                                   and (seed, v) not in done}):
                timed("hypernet", config_of(Variant("hyperofa", shuffle=shuffle)))
            for variant in names:
                spec = VARIANTS[variant]
                if (seed, variant) not in done:
                    run_dir = seed_dir(root, seed, spec.shuffle)
                    timed("init", config_of(spec))
                    figures = figures_of(run_dir, spec.method)
                    rows = root / "rows" / f"seed{seed}"
                    rows.mkdir(parents=True, exist_ok=True)
                    stage_path = init_stage(run_dir, spec.method).path
                    for name, source in (("F_t", init_format.COORDINATES), ("provenance", init_format.PROVENANCE)):
                        shutil.copyfile(stage_path / source, rows / f"{variant}.{name}.npy")
                    done[(seed, variant)] = figures
                    with done_file.open("a") as handle:
                        handle.write(json.dumps({"seed": seed, "variant": variant, "figures": figures}) + "\n")
                    print(f"[bench variants] seed {seed} {variant}: {figures}; seconds so far {timings}",
                          file=sys.stderr, flush=True)
                for key, value in done[(seed, variant)].items():
                    per_seed[variant].setdefault(key, []).append(round(value, 5))
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    means = {v: {k: round(float(np.mean(x)), 5) for k, x in figs.items()} for v, figs in per_seed.items()}
    print(json.dumps({
        "bench": "variants", "corpus": str(corpus_dir) if corpus else "generated", "source": source_model,
        "seeds": list(SEEDS), "per_seed": per_seed, "mean": means,
        "seeds_with_lower_new_token_loss_than_the_unmodified_variant": {
            v: wins_against(per_seed, v, spec.parent) for v, spec in VARIANTS.items() if spec.parent},
        "seeds_with_lower_new_token_loss_than_ofa": {v: wins_against(per_seed, v, "ofa") for v in VARIANTS},
        "seeds_with_lower_new_token_loss_than_random": {v: wins_against(per_seed, v, "random") for v in VARIANTS},
        "seconds": timings,
    }))
    return 0
