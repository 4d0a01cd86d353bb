"""Model families and objectives: what every stage needs to know about a model, in one place.

`family` (the record type) and one file per family (`bert`, `roberta`, `decoders`), registered in
FAMILY_MODULES; the objectives `mlm` (masked positions only) and `causal` (chunked next-token), `nexttoken` (the
step-0 next-token measure); `export` (the expanded model), `head` (a missing MLM head), `factorised` (F_t P
embeddings). Stages import this package; it imports no stage.
"""

from __future__ import annotations

import importlib
from typing import Any, Optional

from ..errors import HyperofaError
from .family import CausalFamily, Family, MaskedFamily, TinySizes, config_get

# The registry: the modules holding the family records (each a FAMILIES tuple), in lookup order.
FAMILY_MODULES = ("bert", "roberta", "decoders", "modernbert")
FAMILIES: tuple[Family, ...] = tuple(
    family for module in FAMILY_MODULES for family in importlib.import_module(f"{__name__}.{module}").FAMILIES
)


def family_for_type(model_type: Optional[str]) -> Optional[Family]:
    return next((f for f in FAMILIES if model_type in f.model_types), None)


def family_named(name: str) -> Family:
    found = next((f for f in FAMILIES if f.name == name), None)
    if found is None:
        raise ValueError(f"unknown model family {name!r}; expected one of {[f.name for f in FAMILIES]}")
    return found


def masked_family(model_config: Any, where: str = "source model") -> MaskedFamily:
    """The masked family of a config (object or dict); a one-line error for a model type no masked record covers."""
    model_type = config_get(model_config, "model_type")
    family = family_for_type(model_type)
    if not isinstance(family, MaskedFamily):
        known = sorted(t for f in FAMILIES if isinstance(f, MaskedFamily) for t in f.model_types)
        raise HyperofaError(f"{where}: model_type {model_type!r} is not supported; expected one of {known}")
    return family


def position_offset(model_config: Any) -> int:
    """Rows of the position table that are never a position (0 for a family without an offset or an unknown one)."""
    family = family_for_type(config_get(model_config, "model_type"))
    return family.position_offset if family is not None else 0


def base_model_kwargs(model_config: Any) -> dict[str, Any]:
    """Keyword arguments that load a model's base (`AutoModel`) for its hidden states: without the pooling layer a
    BERT-style encoder adds (a decoder, or an encoder without one, has none to leave out)."""
    family = family_for_type(config_get(model_config, "model_type"))
    return {"add_pooling_layer": False} if isinstance(family, MaskedFamily) and family.pooler else {}


def sep_token_extra(model_type: Optional[str]) -> bool:
    """Whether tagging input ends in two separators for this model type."""
    family = family_for_type(model_type)
    return isinstance(family, MaskedFamily) and family.sep_extra


__all__ = ["FAMILIES", "CausalFamily", "Family", "MaskedFamily", "TinySizes", "base_model_kwargs", "family_for_type",
           "family_named", "masked_family", "position_offset", "sep_token_extra"]
