"""The hypernetworks: a set of word vectors -> one token's k coordinates (docs/METHOD.md §3.2, §3.3).

Both models take the already looked-up word vectors `[B, L, word_dim]` and a boolean mask `[B, L]` (True at
real words, every row with at least one). The frozen word table is deliberately not a module attribute: it is
looked up outside the model (data.WordTable), so it is never an optimizer parameter and never in a checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

MODEL_NAMES = ("bilstm", "setformer")


class BiLSTMHypernet(nn.Module):
    """Bidirectional LSTM; the final forward and backward states of the top layer feed the head."""

    def __init__(self, word_dim: int, k: int, num_layers: int = 2, hidden_size: int = 800, dropout: float = 0.4):
        super().__init__()
        # nn.LSTM applies dropout only between layers and warns when there is a single layer.
        self.lstm = nn.LSTM(
            input_size=word_dim,
            hidden_size=hidden_size,
            num_layers=num_layers,
            batch_first=True,
            bidirectional=True,
            dropout=dropout if num_layers > 1 else 0.0,
        )
        self.head = nn.Sequential(
            nn.Linear(2 * hidden_size, 2 * k), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * k, k)
        )

    def forward(self, vectors: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        lengths = mask.sum(dim=1).clamp(min=1).cpu()
        packed = pack_padded_sequence(vectors, lengths, batch_first=True, enforce_sorted=False)
        _, (h_n, _) = self.lstm(packed)
        # h_n is [num_layers * 2, B, H], ordered layer by layer, forward before backward.
        return self.head(torch.cat([h_n[-2], h_n[-1]], dim=1))


class SetFormerHypernet(nn.Module):
    """Transformer encoder without positions (a set), masked mean pooling, MLP head."""

    def __init__(self, word_dim: int, k: int, num_layers: int = 28, num_heads: int = 10, dropout: float = 0.4):
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            d_model=word_dim, nhead=num_heads, dim_feedforward=8 * word_dim, dropout=dropout, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=num_layers, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.Linear(word_dim, 2 * word_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * word_dim, k))

    def forward(self, vectors: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        encoded = self.encoder(vectors, src_key_padding_mask=~mask)
        weights = mask.unsqueeze(-1).to(encoded.dtype)
        pooled = (encoded * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return self.head(pooled)


def build_model(name: str, *, word_dim: int, k: int, num_layers: int, hidden_size: int, num_heads: int, dropout: float) -> nn.Module:
    if name == "bilstm":
        return BiLSTMHypernet(word_dim, k, num_layers=num_layers, hidden_size=hidden_size, dropout=dropout)
    if name == "setformer":
        if word_dim % num_heads:
            from ...errors import HyperofaError

            raise HyperofaError(f"hypernet.num_heads={num_heads} must divide the word-vector dimension {word_dim}")
        return SetFormerHypernet(word_dim, k, num_layers=num_layers, num_heads=num_heads, dropout=dropout)
    raise ValueError(f"unknown hypernetwork {name!r}; expected one of {MODEL_NAMES}")


def model_spec(hp: Any, *, word_dim: int, k: int) -> dict[str, Any]:
    """Everything needed to rebuild the model from its weights file (stored next to it as JSON)."""
    return {
        "name": hp.model,
        "word_dim": int(word_dim),
        "k": int(k),
        "num_layers": hp.num_layers,
        "hidden_size": hp.hidden_size,
        "num_heads": hp.num_heads,
        "dropout": hp.dropout,
    }


def model_from_spec(spec: dict[str, Any]) -> nn.Module:
    return build_model(
        spec["name"],
        word_dim=spec["word_dim"],
        k=spec["k"],
        num_layers=spec["num_layers"],
        hidden_size=spec["hidden_size"],
        num_heads=spec["num_heads"],
        dropout=spec["dropout"],
    )


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
