"""The seed of init's random choices and its step-0 measure on held-out text, shared by `hyperofa init` and `tune
hypernet` (which scores each trial's model as init would)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from ..config import Config
from ..formats.models import CAUSAL, MASKED
from ..formats.shards import ShardSet, find_shardset, first_blocks, heldout_shards, prepare_dir
from ..formats.tokenizer import TOKENIZER_JSON
from ..runtime.device import resolve_device
from . import assemble as asm


def init_seed(config: Config) -> int:
    return config.init.seed if config.init.seed is not None else config.run.seed


@dataclass(frozen=True)
class NewTokenObjective:
    """How the step-0 loss at new-token positions is measured for a model kind, and what it is called."""

    name: str  # the key in quality.json; `<name>_loss` in the manifest and MLflow
    label: str  # in messages and the model card
    measure: Callable[..., dict[str, dict[str, Any]]]  # (config, model, tokenizer, blocks, scored, device)


def _masked_loss(config: Config, model: Any, tokenizer: Any, blocks: Any, scored: np.ndarray, device: Any):
    from ..models.mlm import mlm_loss_per_language

    return mlm_loss_per_language(
        model, tokenizer, blocks, seed=config.run.seed, probability=config.evaluate.mlm_probability,
        batch_size=config.init.heldout_batch_size, device=device, scored_labels=scored,
    )[0]


def _causal_loss(config: Config, model: Any, tokenizer: Any, blocks: Any, scored: np.ndarray, device: Any):
    from ..models.nexttoken import next_token_loss_per_language

    return next_token_loss_per_language(model, blocks, scored, batch_size=config.init.heldout_batch_size,
                                        device=device)[0]


OBJECTIVES = {
    MASKED: NewTokenObjective("new_token_mlm", "MLM", _masked_loss),
    CAUSAL: NewTokenObjective("new_token_causal", "next-token", _causal_loss),
}


def heldout_shardset(config: Config, target_fingerprint: dict[str, str]) -> Optional[ShardSet]:
    """Prepare's shards the new-token loss reads: None when it is not measured (`init.heldout_blocks=0`) or
    prepare has not run; shards of another tokenizer than the target's are refused."""
    shardset = find_shardset(prepare_dir(config.run_dir)) if config.init.heldout_blocks else None
    if shardset is not None:
        shardset.require_tokenizer(
            target_fingerprint[TOKENIZER_JSON], "the target tokenizer",
            "re-run `hyperofa prepare`, or set init.heldout_blocks=0 to leave the new-token loss out",
        )
    return shardset


def new_token_loss(
    config: Config, model: Any, tokenizer: Any, target_fingerprint: dict[str, str], provenance: np.ndarray,
    kind: str = MASKED,
) -> dict[str, Any]:
    """Step-0 loss on held-out text at the positions where the init methods differ: for a masked LM the MLM loss at
    masked positions whose label is a new (not copied) token, masked with the same HELDOUT stream as evaluate and
    the pretraining job; for a causal LM the next-token loss at positions whose next token is new. Uses the prepare
    stage's held-out shards (made with the target tokenizer: `heldout_shardset`); {} without them."""
    shardset = heldout_shardset(config, target_fingerprint)
    if shardset is None:
        return {}
    blocks = first_blocks(heldout_shards(shardset.manifest_path.parent), config.init.heldout_blocks)
    if not blocks:
        return {}
    scored = np.zeros(model.get_input_embeddings().num_embeddings, dtype=bool)
    scored[: len(provenance)] = provenance != asm.COPY
    device = resolve_device(config.init.device, "init.device")
    per_language = OBJECTIVES[kind].measure(config, model.to(device), tokenizer, blocks, scored, device)
    model.to("cpu")
    losses = {lang: round(v["loss"], 6) for lang, v in per_language.items()}
    if losses:
        losses["average"] = round(float(np.mean(list(losses.values()))), 6)
    return {"loss": losses, "positions": {lang: v["positions"] for lang, v in per_language.items()}}
