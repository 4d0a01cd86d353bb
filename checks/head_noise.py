"""How much of the step-0 new-token loss comes from the MLM head rather than from the rows (docs/METHOD.md §3.11).

    python checks/head_noise.py WORKDIR SEED [--variants random,ofa,hyperofa] [--head-seeds 0,1,2]
        [--mask-seeds 0] [--fitted DIR] [KEY=VALUE ...]

WORKDIR is a `hyperofa bench variants --workdir` directory: its saved rows (`rows/seed<SEED>/<variant>.*.npy`) and
its run directory `seed<SEED>` (target tokenizer, held-out shards, mapping). The KEY=VALUE overrides are the
bench's (the same `source.model`, `init.heldout_blocks`, ...). Each variant's rows are put into the expanded model
under every head (one seeded head per `--head-seeds`, the project's rule for a source without a head, and, with
`--fitted`, the head of that model directory) and scored with every masking seed. Nothing else changes between the
cells, so the spread along one axis is that axis's share of the noise. Prints one JSON line: loss per (head, mask,
variant), and per head the gap of each variant to the first one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir")
    parser.add_argument("seed", type=int)
    parser.add_argument("--variants", default="random,ofa,hyperofa")
    parser.add_argument("--head-seeds", default="0,1,2")
    parser.add_argument("--mask-seeds", default="0")
    parser.add_argument("--fitted", help="a model directory whose MLM head is used as one more head")
    args, rest = parser.parse_known_args()
    stray = [a for a in rest if "=" not in a]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    args.overrides = rest

    from hyperofa_dist.config import DEMO_CONFIG, load_config
    from hyperofa_dist.formats.files import load_npy
    from hyperofa_dist.formats.mapping import load_mapping
    from hyperofa_dist.formats.models import load_source
    from hyperofa_dist.formats.tokenizer import load_tokenizer, target_tokenizer_dir, tokenizer_fingerprint
    from hyperofa_dist.method import assemble as asm
    from hyperofa_dist.models.export import build_expanded_any, merge_copy_pairs, special_token_pairs
    from hyperofa_dist.models.head import complete_head
    from hyperofa_dist.method.heldout import new_token_loss

    root = Path(args.workdir).resolve()
    run_dir = root / f"seed{args.seed}"
    variants = args.variants.split(",")
    heads: list[tuple[str, dict]] = [(f"seeded:{h}", {"seed": int(h)}) for h in args.head_seeds.split(",") if h]
    if args.fitted:
        heads.append(("fitted", {"seed": 0, "donor": args.fitted}))
    config = load_config(DEMO_CONFIG, [f"run.dir={run_dir}", *args.overrides, "tracking.enabled=false"])
    mapping = load_mapping(run_dir)
    target_dir = target_tokenizer_dir(config)
    target_tok = load_tokenizer(target_dir)
    fingerprint = tokenizer_fingerprint(target_dir)
    rows = {v: (load_npy(root / "rows" / f"seed{args.seed}" / f"{v}.F_t.npy"),
                load_npy(root / "rows" / f"seed{args.seed}" / f"{v}.provenance.npy")) for v in variants}
    table: dict[str, dict[str, dict[str, float]]] = {}
    for head_name, head in heads:
        source = load_source(config)
        complete_head(source.model, source.missing, **head)
        special_t, special_s, _ = special_token_pairs(source.tokenizer, target_tok, str(target_dir), source.kind)
        copy_t, copy_s = merge_copy_pairs(mapping.overlap_target, mapping.overlap_source, special_t, special_s)
        for mask_seed in [int(m) for m in args.mask_seeds.split(",")]:
            scored = load_config(DEMO_CONFIG, [f"run.dir={run_dir}", f"run.seed={mask_seed}", *args.overrides,
                                               "tracking.enabled=false"])
            cell = table.setdefault(head_name, {}).setdefault(f"mask:{mask_seed}", {})
            for variant, (coordinates, provenance) in rows.items():
                embeddings = asm.full_embeddings(coordinates, mapping.primitives)
                model, _ = build_expanded_any(source.model, source.tokenizer, target_tok, embeddings, copy_t, copy_s,
                                              config.init.pad_to_multiple_of, causal=False, untied=source.untied)
                loss = new_token_loss(scored, model, target_tok, fingerprint, provenance)["loss"]["average"]
                cell[variant] = round(float(loss), 5)
                print(f"[head_noise] {head_name} mask {mask_seed} {variant}: {loss:.4f}", file=sys.stderr, flush=True)
    gaps = {h: {m: {v: round(c[v] - c[variants[0]], 5) for v in variants} for m, c in cells.items()}
            for h, cells in table.items()}
    print(json.dumps({"seed": args.seed, "loss": table, f"gap_to_{variants[0]}": gaps}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
