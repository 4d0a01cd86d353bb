"""A source model without an MLM head (a sentence-embedding model): one head, the same for every init method.

transformers fills the head weights a checkpoint lacks with its own unseeded random init, so each `hyperofa init`
run would hand its method a different head: continued pretraining of the methods would start from different
models, and a re-run would not reproduce. `complete_head` replaces those weights before the expanded model is
built, either with the head of `source.mlm_head` (a masked LM of the same architecture and size) or from a
generator seeded by `run.seed` and the weight's name alone, so every method and every re-run gets the same head.
The seeded init is the architecture's own recipe: dense weights N(0, initializer_range), biases 0, LayerNorm 1/0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ..errors import HyperofaError
from ..runtime.seeds import mix_seed
from . import masked_family

SEED_STREAM = "mlm_head"


@dataclass
class HeadReport:
    origin: str  # "checkpoint" (the source has a head), "seeded" (made from run.seed) or "copied" (source.mlm_head)
    missing: list[str]  # head weights the source checkpoint lacked
    seed: Optional[int] = None
    donor: Optional[str] = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def head_weights(model: Any, missing: list[str]) -> list[str]:
    """The missing weights that belong to the MLM head; any other missing weight is an error (a broken encoder
    cannot be made up). The decoder weight is the word embedding (tied) and is rebuilt by the export anyway."""
    prefixes = tuple(module + "." for module in masked_family(model.config).head_modules)
    outside = [name for name in missing if not name.startswith(prefixes)]
    if outside:
        raise HyperofaError(
            f"source.model: the checkpoint lacks {len(outside)} weights outside the MLM head (e.g. "
            f"{', '.join(outside[:3])}); only a missing head can be filled in"
        )
    embedding = model.get_input_embeddings().weight
    params = dict(model.named_parameters(remove_duplicate=False))
    # A tied weight (lm_head.bias = lm_head.decoder.bias) that was loaded under one of its names is not missing.
    loaded = {id(tensor) for name, tensor in params.items() if name not in missing}
    return [
        name for name in missing
        if name in params and params[name] is not embedding and id(params[name]) not in loaded
    ]


def seed_head(model: Any, names: list[str], seed: int) -> None:
    """Initialise the named head weights in place, each from its own stream (seed, name): independent of order."""
    import torch

    params = dict(model.named_parameters(remove_duplicate=False))
    std = float(model.config.initializer_range)
    with torch.no_grad():
        for name in names:
            path, _, leaf = name.rpartition(".")
            tensor = params[name]
            if isinstance(model.get_submodule(path), torch.nn.LayerNorm):
                tensor.fill_(1.0 if leaf == "weight" else 0.0)
            elif leaf == "bias":
                tensor.zero_()
            else:
                generator = torch.Generator().manual_seed(mix_seed(seed, SEED_STREAM, name))
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * std)


def copy_head(model: Any, names: list[str], donor_name: str) -> None:
    """Copy the named head weights from the masked LM `donor_name` (`source.mlm_head`): same family, same shapes."""
    import torch

    from ..formats.models import load_model_reporting_missing

    key = f"source.mlm_head={donor_name}"
    donor, donor_missing = load_model_reporting_missing(donor_name, key="source.mlm_head")
    if masked_family(donor.config, key) != masked_family(model.config):
        raise HyperofaError(
            f"{key}: a {donor.config.model_type} model cannot give its head to a {model.config.model_type} source"
        )
    lacking = [name for name in names if name in donor_missing]
    if lacking:
        raise HyperofaError(f"{key}: has no MLM head either (lacks {', '.join(lacking[:3])})")
    theirs = dict(donor.named_parameters(remove_duplicate=False))
    ours = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name in names:
            if name not in theirs:
                raise HyperofaError(f"{key}: has no weight {name}")
            if tuple(theirs[name].shape) != tuple(ours[name].shape):
                raise HyperofaError(
                    f"{key}: {name} has shape {tuple(theirs[name].shape)} but the source model needs "
                    f"{tuple(ours[name].shape)} (another hidden size or vocabulary)"
                )
            ours[name].copy_(theirs[name].to(ours[name].dtype))
    del donor


def complete_head(model: Any, missing: list[str], *, seed: int, donor: Optional[str] = None) -> HeadReport:
    """Replace the head weights the source checkpoint lacked (copied from `donor`, else seeded); say where the
    head came from. A source with its own head is left untouched, whatever `donor` says."""
    names = head_weights(model, missing)
    if not names:
        return HeadReport("checkpoint", [])
    if donor:
        copy_head(model, names, donor)
        return HeadReport("copied", names, donor=donor)
    seed_head(model, names, seed)
    return HeadReport("seeded", names, seed=seed)
