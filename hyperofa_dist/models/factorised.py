"""The factorised form of an expanded model, as the method's continued pretraining trains it, and its export.

The word embeddings are F_t P: trainable coordinates F_t [V, k] and shared primitives P [k, D]. The output
projection is tied to the same two tensors, logits = (h P^T) F_t^T + b, so embeddings take V k + k D parameters
instead of V D (about 161M instead of 308M for XLM-R to Glot500 at k = 400). The reference needed custom model
classes to load such a model; here the factorised modules are swapped into a stock HF model in memory, and
`to_full_rank` swaps them back to a plain tied `nn.Embedding` / `nn.Linear` with E = F_t P, so the saved result is
an ordinary checkpoint that `AutoModelForMaskedLM` loads.

The decoder reads F_t and P without owning them (they are registered once, under the input embedding): a module
shared by two parents would appear twice in state dicts and be gathered twice by ZeRO-3. Under ZeRO-3 the job
registers them as the decoder's external parameters (`zero3_external_parameters`) so they are gathered for the
head too. State dicts of a factorised model name the two tensors `<embedding>.coordinates.weight` and
`<embedding>.primitives` (`<embedding>` the family's word-embedding module, e.g. `roberta.embeddings.word_embeddings`);
`full_rank_state` turns such a dict into the stock one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn


class FactorisedEmbedding(nn.Module):
    """ids -> F_t[ids] P. The pad row gets no gradient from the input side (the tied output side still trains it)."""

    def __init__(self, coordinates: torch.Tensor, primitives: torch.Tensor, padding_idx: Optional[int]):
        super().__init__()
        self.coordinates = nn.Embedding.from_pretrained(coordinates, freeze=False, padding_idx=padding_idx)
        self.primitives = nn.Parameter(primitives)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.coordinates(input_ids) @ self.primitives

    def full_weight(self) -> torch.Tensor:
        return self.coordinates.weight @ self.primitives


class FactorisedDecoder(nn.Module):
    """h -> (h P^T) F_t^T + b, sharing F_t and P with the embedding: the tied output projection."""

    def __init__(self, embedding: FactorisedEmbedding, bias: nn.Parameter):
        super().__init__()
        self._shared = (embedding,)  # a tuple: nn.Module registers neither it nor its parameters here
        self.bias = bias

    @property
    def embedding(self) -> FactorisedEmbedding:
        return self._shared[0]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        down = hidden @ self.embedding.primitives.T
        return down @ self.embedding.coordinates.weight.T + self.bias


# Names under the word-embedding module (`<...>word_embeddings.` for BERT and RoBERTa, `<...>tok_embeddings.` for
# ModernBERT): the factorised form's two tensors, and the stock weight they become.
COORDINATES_KEY = ".coordinates.weight"
PRIMITIVES_KEY = ".primitives"
FULL_KEY = ".weight"


def is_factorised(model: Any) -> bool:
    return isinstance(model.get_input_embeddings(), FactorisedEmbedding)


def parameter_counts(model: Any) -> dict[str, int]:
    """Unique parameters of a model (tied tensors once) and of its word embeddings (V k + k D, or V D)."""
    unique = {id(param): param.numel() for param in model.parameters()}
    embedding = model.get_input_embeddings()
    if isinstance(embedding, FactorisedEmbedding):
        words = embedding.coordinates.weight.numel() + embedding.primitives.numel()
    else:
        words = embedding.weight.numel()
    return {"parameters_total": sum(unique.values()), "parameters_embeddings": words}


def zero3_external_parameters(model: Any) -> None:
    """Tell ZeRO-3 that the decoder's forward uses F_t and P (owned by the input embedding) so it gathers them."""
    import deepspeed

    decoder = model.get_output_embeddings()
    deepspeed.zero.register_external_parameter(decoder, decoder.embedding.coordinates.weight)
    deepspeed.zero.register_external_parameter(decoder, decoder.embedding.primitives)


def full_rank_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Optional[tuple]]:
    """A factorised model's state dict -> (the stock full-rank one with E = F_t P, (F_t, P)); a stock dict is
    returned unchanged with None. The product is taken in float64 and stored in float32."""
    coordinate_keys = [key for key in state if key.endswith(COORDINATES_KEY)]
    if not coordinate_keys:
        return state, None
    if len(coordinate_keys) != 1:
        raise ValueError(f"several factorised embeddings in one state dict: {coordinate_keys}")
    prefix = coordinate_keys[0][: -len(COORDINATES_KEY)]
    coordinates = state[prefix + COORDINATES_KEY].detach().float()
    primitives = state[prefix + PRIMITIVES_KEY].detach().float()
    out = {k: v for k, v in state.items() if k not in (prefix + COORDINATES_KEY, prefix + PRIMITIVES_KEY)}
    out[prefix + FULL_KEY] = (coordinates.double() @ primitives.double()).float()
    return out, (coordinates, primitives)


def factorise(model: Any, coordinates: np.ndarray, primitives: np.ndarray) -> Any:
    """Swap a stock model's word embeddings (and a masked LM's tied decoder) for F_t P (in place; returns the model).

    `coordinates` may have fewer rows than the model's (padded) vocabulary: padding rows get zero coordinates,
    as they have zero embeddings in the exported model. A model without an output projection (a token
    classifier) only gets the factorised input embedding.
    """
    vocab = model.get_input_embeddings().weight.shape[0]
    hidden = model.config.hidden_size
    if primitives.shape[1] != hidden or coordinates.shape[1] != primitives.shape[0]:
        raise ValueError(f"F_t {coordinates.shape} and P {primitives.shape} do not fit hidden size {hidden}")
    if len(coordinates) > vocab:
        raise ValueError(f"F_t has {len(coordinates)} rows but the model's vocabulary has {vocab}")
    coords = torch.zeros(vocab, coordinates.shape[1], dtype=torch.float32)
    coords[: len(coordinates)] = torch.from_numpy(np.array(coordinates, dtype=np.float32))
    prims = torch.from_numpy(np.array(primitives, dtype=np.float32))
    decoder = model.get_output_embeddings()
    embedding = FactorisedEmbedding(coords, prims, model.config.pad_token_id)
    model.set_input_embeddings(embedding)
    if decoder is not None:
        model.set_output_embeddings(FactorisedDecoder(embedding, decoder.bias))
    return model


def to_full_rank(model: Any) -> Any:
    """Replace the factorised modules by a plain embedding E = F_t P (tied to a plain decoder in a masked LM),
    in place; returns the model."""
    embedding = model.get_input_embeddings()
    if not isinstance(embedding, FactorisedEmbedding):
        raise ValueError("model is not factorised")
    decoder = model.get_output_embeddings()
    with torch.no_grad():
        weight = embedding.full_weight().detach().clone()
    plain = nn.Embedding(weight.shape[0], weight.shape[1], padding_idx=model.config.pad_token_id)
    with torch.no_grad():
        plain.weight.copy_(weight)
    model.set_input_embeddings(plain)
    if decoder is not None:
        linear = nn.Linear(weight.shape[1], weight.shape[0])
        linear.weight = plain.weight
        linear.bias = decoder.bias
        model.set_output_embeddings(linear)
        model.config.tie_word_embeddings = True
        model.tie_weights()
    return model


# Rows of E compared with F_t P before a model is used factorised, and the relative tolerance (E is float32).
_FACTOR_SAMPLE_ROWS = 256
_FACTOR_RTOL = 1e-3


def plan_factorised(model_dir: Path, want: str, key: str) -> Optional[Path]:
    """The directory holding a model directory's factorised form (F_t.npy, P.npy) when config `key` = `want`
    (auto | factorised | full) says to use it, else None. auto: when the factors exist and k < D (never for a causal
    LM). Factors that do not fit the model, or whose product is not the model's embeddings (left beside another
    model), are refused."""
    from ..errors import HyperofaError
    from ..formats.init import COORDINATES, PRIMITIVES, factors_beside, load_factors
    from ..formats.models import CAUSAL, model_kind_of, read_model_config

    if want == "full":
        return None
    model_dir = Path(model_dir)
    if model_kind_of(model_dir) == CAUSAL:
        # The factorised modules are the masked LM's (a tied decoder with a bias); a causal LM, whose P may also
        # hold an untied output projection's columns, trains full rank.
        if want == "factorised":
            raise HyperofaError(
                f"{model_dir}: {key}=factorised trains a masked LM's embeddings as F_t P; this is a causal LM, which "
                f"trains full rank ({key}=full or auto)"
            )
        return None
    where = factors_beside(model_dir)
    if where is None:
        if want == "factorised":
            raise HyperofaError(
                f"{model_dir.parent}: {key}=factorised needs {COORDINATES} and {PRIMITIVES} beside the model (the "
                f"init stage writes them); set {key}=full to use the full-rank matrix"
            )
        return None
    coordinates, primitives = load_factors(where)
    k, hidden = primitives.shape
    cfg = read_model_config(model_dir)
    if hidden != cfg.get("hidden_size") or len(coordinates) > int(cfg.get("vocab_size", 0)):
        raise HyperofaError(
            f"{where}: F_t {coordinates.shape} and P {primitives.shape} do not fit the model in {model_dir} "
            f"(vocab_size {cfg.get('vocab_size')}, hidden_size {cfg.get('hidden_size')})"
        )
    if want == "auto" and k >= hidden:
        return None  # no factorisation was made (k = D): the full-rank model is the same thing
    _check_factors_match(model_dir, coordinates, primitives, key)
    return where


def _check_factors_match(model_dir: Path, coordinates: np.ndarray, primitives: np.ndarray, key: str) -> None:
    from ..errors import HyperofaError
    from ..formats.models import read_model_config, read_word_embeddings

    rows = np.unique(np.linspace(0, len(coordinates) - 1, min(_FACTOR_SAMPLE_ROWS, len(coordinates))).astype(np.int64))
    from . import masked_family

    suffix = masked_family(read_model_config(model_dir), str(model_dir)).embedding_suffix
    stored = read_word_embeddings(model_dir, rows, suffix)
    product = np.asarray(coordinates[rows], dtype=np.float64) @ np.asarray(primitives, dtype=np.float64)
    error = float(np.linalg.norm(stored - product) / max(np.linalg.norm(product), 1e-12))
    if error > _FACTOR_RTOL:
        raise HyperofaError(
            f"{model_dir}: the model's word embeddings are not F_t P of the factors beside it (relative difference "
            f"{error:.2e} on {len(rows)} rows); they belong to another model. Set {key}=full or re-run init"
        )


def load_factorised(model_dir: str | Path, auto_class: str = "AutoModelForMaskedLM", **kwargs: Any) -> Any:
    """The factorised form of a model directory written by init or pretrain (F_t.npy and P.npy beside it)."""
    from ..errors import HyperofaError
    from ..formats.init import COORDINATES, PRIMITIVES, factors_beside, load_factors
    from ..formats.models import load_model

    model_dir = Path(model_dir)
    where = factors_beside(model_dir)
    if where is None:
        raise HyperofaError(f"{model_dir}: no {COORDINATES} and {PRIMITIVES} beside the model (its factorised form)")
    coordinates, primitives = load_factors(where)
    return factorise(load_model(model_dir, auto_class, **kwargs), coordinates, primitives)


def save_full_rank(model: Any, tokenizer: Any, out_dir: str | Path) -> Path:
    """Export a (factorised or plain) model in the stock full-rank format, tokenizer beside it."""
    from ..formats.models import save_model_dir

    if is_factorised(model):
        to_full_rank(model)
    return save_model_dir(model, tokenizer, out_dir)
