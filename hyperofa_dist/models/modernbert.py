"""ModernBERT (and its multilingual variant): rotary positions (no position table, so no offset and nothing to
shift when the pad id moves), word embeddings `model.embeddings.tok_embeddings`, a prediction head in two modules
(`head`: dense, activation, norm; then the tied `decoder` with a bias), tagging input `[CLS] ... [SEP]`.

The config names its special tokens by several keys (`bos/eos/cls/sep_token_id`; the English checkpoints set all
four, BERT-style, a multilingual one may set only bos/eos, or name other ids): each key present follows its token to
the target id. Everything else the project reads (`hidden_size`, `vocab_size`, `max_position_embeddings`,
`initializer_range`) has its usual name in both shapes; the attention pattern and rotary settings (`layer_types` and
`rope_parameters`, or the older `global_attn_every_n_layers`, `global_rope_theta`, `local_rope_theta`) are copied
from the source config untouched, whichever shape it has.
"""

from __future__ import annotations

from typing import Any

from .family import MaskedFamily, TinySizes, masked_common


class ModernBertFamily(MaskedFamily):
    def tiny_config_kwargs(self, tokenizer: Any, sizes: TinySizes) -> dict[str, Any]:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
        end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        return dict(
            max_position_embeddings=sizes.max_position,
            bos_token_id=start,
            eos_token_id=end,
            cls_token_id=tokenizer.cls_token_id if tokenizer.cls_token_id is not None else start,
            sep_token_id=tokenizer.sep_token_id if tokenizer.sep_token_id is not None else end,
            global_attn_every_n_layers=2,  # a tiny model still has both kinds of layer
            local_attention=16,
            **masked_common(tokenizer, sizes),
        )


MODERNBERT = ModernBertFamily(
    name="modernbert",
    model_types=("modernbert",),
    config_class="ModernBertConfig",
    model_class="ModernBertForMaskedLM",
    embedding="model.embeddings.tok_embeddings",
    vocab_keys=("model.embeddings.tok_embeddings.weight", "decoder.weight", "decoder.bias"),
    head_modules=("head", "decoder"),
    special_id_keys=("bos_token_id", "eos_token_id", "cls_token_id", "sep_token_id"),
    pooler=False,
)

FAMILIES = (MODERNBERT,)
