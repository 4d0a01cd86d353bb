"""The seed of init's random choices and its step-0 measure on held-out text, shared by `hyperofa init` and `tune
hypernet` (which scores each trial's model as init would)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..config import Config
from ..formats.models import CAUSAL
from ..formats.rundir import Stage
from ..runtime.device import resolve_device
from . import assemble as asm


def init_seed(config: Config) -> int:
    return config.init.seed if config.init.seed is not None else config.run.seed


def new_token_loss(
    config: Config, model: Any, tokenizer: Any, target_fingerprint: dict[str, str], provenance: np.ndarray,
    kind: str = "masked",
) -> dict[str, Any]:
    """Step-0 loss on held-out text at the positions where the init methods differ: for a masked LM the MLM loss at
    masked positions whose label is a new (not copied) token, masked with the same HELDOUT stream as evaluate and
    the pretraining job; for a causal LM the next-token loss at positions whose next token is new. Uses the prepare
    stage's held-out shards when they were made with the target tokenizer; {} otherwise."""
    from ..formats.shards import first_blocks, heldout_shards, prepare_dir
    from ..formats.tokenizer import TOKENIZER_JSON
    from ..models.mlm import mlm_loss_per_language
    from ..models.nexttoken import next_token_loss_per_language

    c = config.init
    shards_dir = prepare_dir(config.run_dir)
    manifest = Stage(shards_dir.parent, shards_dir.name).manifest() if c.heldout_blocks else None
    made_with = ((manifest or {}).get("inputs") or {}).get("tokenizer", {}).get(TOKENIZER_JSON)
    if manifest is None or made_with != target_fingerprint.get(TOKENIZER_JSON):
        return {}
    blocks = first_blocks(heldout_shards(shards_dir), c.heldout_blocks)
    if not blocks:
        return {}
    scored = np.zeros(model.get_input_embeddings().num_embeddings, dtype=bool)
    scored[: len(provenance)] = provenance != asm.COPY
    device = resolve_device(c.device, "init.device")
    if kind == CAUSAL:
        per_language, _ = next_token_loss_per_language(
            model.to(device), blocks, scored, batch_size=c.heldout_batch_size, device=device
        )
    else:
        per_language, _ = mlm_loss_per_language(
            model.to(device), tokenizer, blocks, seed=config.run.seed, probability=config.evaluate.mlm_probability,
            batch_size=c.heldout_batch_size, device=device, scored_labels=scored,
        )
    model.to("cpu")
    losses = {lang: round(v["loss"], 6) for lang, v in per_language.items()}
    if losses:
        losses["average"] = round(float(np.mean(list(losses.values()))), 6)
    return {"loss": losses, "positions": {lang: v["positions"] for lang, v in per_language.items()}}
