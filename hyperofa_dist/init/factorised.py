"""Memory-light factorised variant of an expanded model (OFA's factorised models, `model_loader_extra.py` of cisnlp/ofa) and its export to stock format.

The word embeddings are F_t P: trainable coordinates F_t [V, k] and shared primitives P [k, D]. The output
projection is tied to the same two tensors, logits = (h P^T) F_t^T + b, so embeddings take V k + k D parameters
instead of V D (about 161M instead of 308M for XLM-R to Glot500 at k = 400). The reference needed custom model
classes to load such a model; here the factorised modules are swapped into a stock HF model in memory, and
`to_full_rank` swaps them back to a plain tied `nn.Embedding` / `nn.Linear` with E = F_t P, so the saved result is
an ordinary checkpoint that `AutoModelForMaskedLM` loads.
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
        self.embedding = embedding
        self.bias = bias

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        down = hidden @ self.embedding.primitives.T
        return down @ self.embedding.coordinates.weight.T + self.bias


def is_factorised(model: Any) -> bool:
    return isinstance(model.get_input_embeddings(), FactorisedEmbedding)


def factorise(model: Any, coordinates: np.ndarray, primitives: np.ndarray) -> Any:
    """Swap a stock masked LM's tied word embeddings / decoder for F_t P (in place; returns the model).

    `coordinates` may have fewer rows than the model's (padded) vocabulary: padding rows get zero coordinates,
    as they have zero embeddings in the exported model.
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
    bias = model.get_output_embeddings().bias
    embedding = FactorisedEmbedding(coords, prims, model.config.pad_token_id)
    model.set_input_embeddings(embedding)
    model.set_output_embeddings(FactorisedDecoder(embedding, bias))
    return model


def to_full_rank(model: Any) -> Any:
    """Replace the factorised modules by a plain tied embedding E = F_t P and decoder (in place; returns model)."""
    embedding = model.get_input_embeddings()
    if not isinstance(embedding, FactorisedEmbedding):
        raise ValueError("model is not factorised")
    bias = model.get_output_embeddings().bias
    with torch.no_grad():
        weight = embedding.full_weight().detach().clone()
    plain = nn.Embedding(weight.shape[0], weight.shape[1], padding_idx=model.config.pad_token_id)
    with torch.no_grad():
        plain.weight.copy_(weight)
    decoder = nn.Linear(weight.shape[1], weight.shape[0])
    decoder.weight = plain.weight
    decoder.bias = bias
    model.set_input_embeddings(plain)
    model.set_output_embeddings(decoder)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    return model


def load_factorised(init_dir: str | Path) -> Any:
    """The factorised model from an init output `<run_dir>/init/<method>/` (model/, F_t.npy, P.npy)."""
    from ..formats.init import MODEL, load_factors
    from ..formats.models import load_model

    init_dir = Path(init_dir)
    coordinates, primitives = load_factors(init_dir)
    return factorise(load_model(init_dir / MODEL), coordinates, primitives)


def save_full_rank(model: Any, tokenizer: Any, out_dir: str | Path) -> Path:
    """Export a (factorised or plain) model in the stock full-rank format, tokenizer beside it."""
    from ..formats.models import save_model_dir

    if is_factorised(model):
        to_full_rank(model)
    return save_model_dir(model, tokenizer, out_dir)
