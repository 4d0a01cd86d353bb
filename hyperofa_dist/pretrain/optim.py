"""Learning-rate schedule, AdamW parameter groups and the embedding warm-up (pure torch, no DeepSpeed).

The schedule is a pure function of the optimizer step, so a resumed run needs no scheduler state: the loop sets
each group's lr (and weight decay) before every optimizer step.

Embedding warm-up ("train only the new rows first"): for the first N steps the gradient of every parameter
except the word embeddings (a factorised model's coordinates F_t; its primitives P move every row, so they wait)
is zeroed and so are the embedding rows of copied (and padding) tokens, and those
groups get lr 0 and weight decay 0. Zero gradient and zero lr together keep AdamW from moving them at all
(decoupled weight decay is lr-scaled; Adam's moments stay 0, so they start clean after the warm-up). Masking
gradients with tensor hooks instead of toggling `requires_grad` keeps the optimizer's parameter set fixed, which
ZeRO-2 and ZeRO-3 need (they flatten and partition the trainable parameters once, at initialize).
"""

from __future__ import annotations

import math
import torch

EMBEDDING, DECAY, NO_DECAY = "embedding", "decay", "no_decay"


def lr_at(step: int, *, peak: float, warmup: int, total: int, schedule: str) -> float:
    """Learning rate for the update that follows `step` completed updates (HF convention: the first is at 0 when
    warming up). Linear warm-up from 0 to `peak`, then linear or cosine decay to 0 at `total`, or constant."""
    if warmup > 0 and step < warmup:
        return peak * step / warmup
    if schedule == "constant":
        return peak
    span = max(1, total - warmup)
    progress = min(1.0, max(0.0, (step - warmup) / span))
    if schedule == "linear":
        return peak * (1.0 - progress)
    if schedule == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r}")


def embedding_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The vocabulary-sized parameters: the input word-embedding matrix and, when untied, the output projection
    (deduplicated); in a factorised model the coordinates F_t only. The primitives P are shared by every token,
    so they train with the encoder (frozen in the warm-up, where moving P would move the copied rows too)."""
    lookup = model.get_input_embeddings()
    params = [lookup.coordinates.weight if hasattr(lookup, "coordinates") else lookup.weight]
    out = model.get_output_embeddings()
    if out is not None and hasattr(out, "weight") and all(out.weight is not p for p in params):
        params.append(out.weight)
    return params


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups named embedding / decay / no_decay (biases and LayerNorms are not decayed)."""
    embed_ids = {id(p) for p in embedding_params(model)}
    groups = {EMBEDDING: [], DECAY: [], NO_DECAY: []}
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        if id(param) in embed_ids:
            groups[EMBEDDING].append(param)
        elif param.ndim < 2 or "LayerNorm" in name or "layer_norm" in name:
            groups[NO_DECAY].append(param)
        else:
            groups[DECAY].append(param)
    return [
        {"name": name, "params": params, "weight_decay": 0.0 if name == NO_DECAY else weight_decay}
        for name, params in groups.items()
        if params
    ]


def group_settings(
    step: int, *, lr: float, weight_decay: float, warmup_embedding_steps: int
) -> dict[str, tuple[float, float]]:
    """(lr, weight decay) per group for the update after `step` completed updates."""
    if step < warmup_embedding_steps:
        # Copied rows share the embedding matrix with the new rows: no decay there, or the frozen rows would shrink.
        return {EMBEDDING: (lr, 0.0), DECAY: (0.0, 0.0), NO_DECAY: (0.0, 0.0)}
    return {EMBEDDING: (lr, weight_decay), DECAY: (lr, weight_decay), NO_DECAY: (lr, 0.0)}


def apply_settings(optimizer, names: list[str], settings: dict[str, tuple[float, float]]) -> None:
    """Write lr and weight decay into the optimizer's groups (in the order they were given to it)."""
    for group, name in zip(optimizer.param_groups, names):
        group["lr"], group["weight_decay"] = settings[group.get("name", name)]


class EmbeddingWarmup:
    """Gradient masks for the warm-up; `active` is switched off by the loop once the warm-up steps are done."""

    def __init__(self, model: torch.nn.Module, trainable_rows: torch.Tensor):
        self.active = True
        self.handles = []
        embed_ids = {id(p) for p in embedding_params(model)}
        seen: set[int] = set()
        for param in model.parameters():
            if id(param) in seen or not param.requires_grad:
                continue
            seen.add(id(param))
            if id(param) in embed_ids:
                rows = torch.zeros(param.shape[0], dtype=torch.bool)
                n = min(param.shape[0], trainable_rows.numel())
                rows[:n] = trainable_rows[:n].bool()
                self.handles.append(param.register_hook(self._row_mask(rows)))
            else:
                self.handles.append(param.register_hook(self._zero))

    def _zero(self, grad: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(grad) if self.active else grad

    def _row_mask(self, rows: torch.Tensor):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            if not self.active:
                return grad
            # ZeRO-3 may hand the hook a flattened or partitioned view; only a full [V, d] gradient is row-masked.
            if grad.dim() == 2 and grad.shape[0] == rows.numel():
                return grad * rows.to(device=grad.device, dtype=grad.dtype).unsqueeze(1)
            raise RuntimeError(f"embedding warm-up: unexpected gradient shape {tuple(grad.shape)}")

        return hook

    def remove(self) -> None:
        self.active = False
        for handle in self.handles:
            handle.remove()
        self.handles = []


def trainable_rows_from_provenance(provenance, vocab_rows: int, copy_code: int = 0) -> torch.Tensor:
    """Rows that train during the warm-up: tokens not copied from the source; padded rows stay frozen."""
    rows = torch.zeros(vocab_rows, dtype=torch.bool)
    prov = torch.as_tensor(provenance)
    n = min(vocab_rows, prov.numel())
    rows[:n] = prov[:n] != copy_code
    return rows
