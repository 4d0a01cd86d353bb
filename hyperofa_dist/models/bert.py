"""BERT (and mBERT): absolute positions from 0, a `cls.predictions` head, tagging input `[CLS] ... [SEP]`."""

from __future__ import annotations

from typing import Any

from .family import MaskedFamily, TinySizes, masked_common


class BertFamily(MaskedFamily):
    def tiny_config_kwargs(self, tokenizer: Any, sizes: TinySizes) -> dict[str, Any]:
        return dict(max_position_embeddings=sizes.max_position, **masked_common(tokenizer, sizes))


BERT = BertFamily(
    name="bert",
    model_types=("bert",),
    config_class="BertConfig",
    model_class="BertForMaskedLM",
    embedding="bert.embeddings.word_embeddings",
    vocab_keys=("bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight",
                "cls.predictions.decoder.bias", "cls.predictions.bias"),
    head_modules=("cls",),
)

FAMILIES = (BERT,)
