"""The decoder-only families the packaged configs and tests use: Llama (untied), Qwen2 (tied), Mistral, Gemma.
The causal objective (`causal.py`) reaches their embeddings and output projection through transformers' generic
accessors and their logit transform through the config (`head_transform`), so a record names the family and how
to build a tiny one."""

from __future__ import annotations

from .family import CausalFamily


def _decoder(name: str, prefix: str) -> CausalFamily:
    return CausalFamily(name=name, model_types=(name,), config_class=f"{prefix}Config",
                        model_class=f"{prefix}ForCausalLM")


LLAMA = _decoder("llama", "Llama")
QWEN2 = _decoder("qwen2", "Qwen2")
MISTRAL = _decoder("mistral", "Mistral")
GEMMA = _decoder("gemma", "Gemma")

FAMILIES = (LLAMA, QWEN2, MISTRAL, GEMMA)
