"""Which device a process computes on, and which precision a DeepSpeed job trains in: decided here only."""

from __future__ import annotations

from typing import Any

from ..errors import HyperofaError


def resolve_device(choice: str, key: str) -> Any:
    """`auto` -> cuda when a GPU is visible, else cpu; an explicit `cuda` without a GPU is an error naming `key`."""
    import torch

    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise HyperofaError(f"config key {key} is 'cuda' but no CUDA device is available")
    if choice not in ("cpu", "cuda"):
        raise HyperofaError(f"config key {key}: {choice!r} is not one of auto, cpu, cuda")
    return torch.device(choice)


def job_device_type() -> str:
    """Where a launched DeepSpeed job's ranks will compute (one rank per GPU when there are GPUs)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_precision(choice: str, device: str, key: str) -> str:
    """'auto' -> fp32 on CPU, bf16 on a GPU with bf16 (else fp16); bf16/fp16 without a GPU are refused."""
    if choice not in ("auto", "fp32", "bf16", "fp16"):
        raise HyperofaError(f"config key {key}: precision {choice!r} is not one of auto, fp32, bf16, fp16")
    if device == "cpu":
        if choice in ("bf16", "fp16"):
            raise HyperofaError(f"config key {key}={choice} needs a GPU; this machine has none (use auto or fp32)")
        return "fp32"
    if choice != "auto":
        return choice
    import torch

    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
