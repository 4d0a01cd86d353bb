"""Model FLOPs per token and MFU for an encoder masked LM or a causal LM (docs/DISTRIBUTED.md §4; a causal LM
predicts every position, f_pred = 1), and accelerator peaks."""

from __future__ import annotations

from typing import Optional

import torch

# Dense (no 2:4 sparsity) BF16/FP16 tensor-core peaks in TFLOPS, matched against the device name.
PEAK_TFLOPS = (
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),
    ("A100", 312.0),
    ("L40S", 362.1),
    ("A10G", 125.0),
    ("V100", 125.0),
)


def body_params(model: torch.nn.Module) -> int:
    """Non-embedding parameters (the lm_head's dense and LayerNorm included, the tied vocab projection and a
    factorised model's F_t and P not)."""
    from .optim import embedding_params

    skip = {id(p) for p in embedding_params(model)}
    lookup = model.get_input_embeddings()
    if hasattr(lookup, "primitives"):
        skip.add(id(lookup.primitives))
    base = getattr(model, model.base_model_prefix)
    for name in ("position_embeddings", "token_type_embeddings"):
        # A decoder (Llama, Qwen) has no embeddings block: rotary positions, no token types.
        module = getattr(getattr(base, "embeddings", None), name, None)
        if module is not None:
            skip.add(id(module.weight))
    seen, total = set(), 0
    for param in model.parameters():
        if id(param) in seen or id(param) in skip:
            continue
        seen.add(id(param))
        total += param.numel()
    return total


def flops_per_token(n_body: int, layers: int, hidden: int, seq_len: int, vocab: int, predicted_share: float,
                    rank: Optional[int] = None) -> float:
    """Training FLOPs per token: 6*N_body + 12*L*d*T (attention) + 6*d*V*f_pred (vocab projection).

    Factorised embeddings of rank k: the lookup F_t[ids] P costs 6*k*d per token and the head (h P^T) F_t^T
    costs 6*(d*k + k*V) per predicted token instead of 6*d*V."""
    common = 6.0 * n_body + 12.0 * layers * hidden * seq_len
    if rank is None:
        return common + 6.0 * hidden * vocab * predicted_share
    return common + 6.0 * rank * hidden + 6.0 * (hidden * rank + rank * vocab) * predicted_share


def model_flops_per_token(model: torch.nn.Module, seq_len: int, predicted_share: float) -> float:
    cfg = model.config
    lookup = model.get_input_embeddings()
    rank = int(lookup.primitives.shape[0]) if hasattr(lookup, "primitives") else None
    return flops_per_token(
        body_params(model), cfg.num_hidden_layers, cfg.hidden_size, seq_len, cfg.vocab_size, predicted_share, rank
    )


def peak_flops(override_tflops: Optional[float] = None) -> Optional[float]:
    """Peak FLOP/s of this process's GPU (None on CPU or an unknown GPU without an override)."""
    if override_tflops:
        return override_tflops * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, tflops in PEAK_TFLOPS:
        if key in name:
            return tflops * 1e12
    return None


def mfu(tokens_per_s_per_device: float, flops_token: float, peak: Optional[float]) -> Optional[float]:
    return None if not peak else tokens_per_s_per_device * flops_token / peak
