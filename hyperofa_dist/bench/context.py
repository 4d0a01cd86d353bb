"""`hyperofa bench context`: which words a long list keeps, the lowest word indices (`first`, the baseline) or a
seeded sample fixed per token (`sample`), judged by what it does to HyperOFA's initialisation.

On the demo's generated world (built once) with its word vectors re-ordered by language, as large multilingual
vector files often are, and for each of `--seeds` run seeds: the mapping, then per rule the hypernetwork (cap
`hypernet.max_context`, 16 by default here so that many lists are cut) and the HyperOFA init. Reported per rule
and seed: the hypernetwork's test-split cosine, the init stage's held-out coordinate cosine, and the step-0 MLM
loss on held-out text at masked new-token positions; their means over seeds; and the share of target tokens whose
list was cut. Prints one JSON line.
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
from ..formats.hypernet import read_test_metrics
from ..formats.hypernet import stage_of as hypernet_stage
from ..formats.init import stage_of as init_stage
from ..formats.mapping import load_mapping
from ..formats.vectors import TRAINED_NAME, load_word_vectors, save_word_vectors, trained_vectors_path
from ..registry import command
from ..synthetic.demo import WorldSpec, build_world
from ..tracking import NullTracker

SEEDS = (0, 1, 2)
RULES = ("first", "sample")


def grouped_by_language(source: Path, out: Path) -> Path:
    """The vectors of `source` with their keys sorted by language (stable within a language)."""
    words = load_word_vectors(source)
    order = np.argsort(np.asarray([k[:3] for k in words.keys]), kind="stable")
    save_word_vectors(out, [words.keys[i] for i in order], words.matrix()[order])
    return out


def run(config: Any, args: Any) -> int:
    seeds = list(SEEDS)
    keep = getattr(args, "workdir", None)
    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="hyperofa-bench-context-"))
    base = load_config(DEMO_CONFIG, [*getattr(args, "overrides", []), "tracking.enabled=false"])
    given = any(o.startswith("hypernet.max_context=") for o in getattr(args, "overrides", []))
    cap = base.hypernet.max_context if given else 16
    world = build_world(root / "world", WorldSpec(seed=0, block_size=base.prepare.block_size))
    results: dict[str, dict[str, list[float]]] = {rule: {} for rule in RULES}
    cut_share: list[float] = []
    try:
        for seed in seeds:
            run_dir = root / f"seed{seed}"
            common = [f"run.dir={run_dir}", f"run.seed={seed}", f"source.model={world.source_model}",
                      f"corpus.path={world.corpus}", "tracking.enabled=false", f"hypernet.max_context={cap}"]
            config = load_config(DEMO_CONFIG, common)
            for name in ("tokenizer", "prepare", "vectors"):
                command(name).load()(config, NullTracker())
            grouped = grouped_by_language(trained_vectors_path(run_dir), root / f"grouped{seed}" / TRAINED_NAME)
            config = load_config(DEMO_CONFIG, [*common, f"vectors.path={grouped}"])
            command("mapping").load()(config, NullTracker())
            lengths = load_mapping(run_dir).target_postings.lengths()
            cut_share.append(float(np.mean(lengths[lengths > 0] > cap)))
            for rule in RULES:
                rule_config = config.with_changes({"hypernet.context": rule, "init.method": "hyperofa"})
                for stage in (hypernet_stage(run_dir), init_stage(run_dir, "hyperofa")):
                    shutil.rmtree(stage.path, ignore_errors=True)
                command("hypernet").load()(rule_config, NullTracker())
                command("init").load()(rule_config, NullTracker())
                manifest = init_stage(run_dir, "hyperofa").require()
                figures = {
                    "hypernet_test_cosine": read_test_metrics(hypernet_stage(run_dir).path)["test_mean_cosine"],
                    "init_heldout_cosine": manifest["heldout_cosine"]["hyperofa"],
                    "new_token_mlm_loss": manifest["new_token_mlm_loss"]["average"],
                }
                for key, value in figures.items():
                    results[rule].setdefault(key, []).append(round(float(value), 5))
                print(f"[bench context] seed {seed} {rule}: {figures}", file=sys.stderr, flush=True)
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    means = {rule: {k: round(float(np.mean(v)), 5) for k, v in figures.items()} for rule, figures in results.items()}
    print(json.dumps({
        "bench": "context", "max_context": cap, "seeds": seeds,
        "share_of_covered_target_tokens_cut": round(float(np.mean(cut_share)), 4),
        "per_seed": results, "mean": means,
    }))
    return 0
