"""RoBERTa and XLM-R: position ids start at pad_token_id + 1 (two rows of the table are never a position), an
`lm_head`, tagging input `<s> ... </s></s>`; the config's bos/eos ids name the target's own tokens after expansion."""

from __future__ import annotations

from typing import Any

from ..errors import HyperofaError
from .family import MaskedFamily, TinySizes, masked_common

_VOCAB = ("roberta.embeddings.word_embeddings.weight", "lm_head.decoder.weight", "lm_head.decoder.bias", "lm_head.bias")


class RobertaFamily(MaskedFamily):
    def tiny_config_kwargs(self, tokenizer: Any, sizes: TinySizes) -> dict[str, Any]:
        common = masked_common(tokenizer, sizes)
        common.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        return dict(max_position_embeddings=sizes.max_position + self.position_offset, **common)

    def expand_config(self, config: Any, source_config: Any, target_tokenizer: Any, id_map: dict[int, int]) -> int:
        """bos/eos from the target tokenizer (cls/sep where it has none); the position table grows by the pad id's
        move, so every real position keeps its row."""
        t = target_tokenizer
        config.bos_token_id = t.bos_token_id if t.bos_token_id is not None else t.cls_token_id
        config.eos_token_id = t.eos_token_id if t.eos_token_id is not None else t.sep_token_id
        shift = config.pad_token_id - source_config.pad_token_id
        config.max_position_embeddings = source_config.max_position_embeddings + shift
        if config.max_position_embeddings <= config.pad_token_id + 2:
            raise HyperofaError(
                f"target pad id {config.pad_token_id} leaves no room in the position table of the source model"
            )
        return shift

    def shift_positions(self, state: dict[str, Any], old_pad: int, new_pad: int) -> None:
        """Position ids start at pad_token_id + 1; keep every real position's row when the pad id moves."""
        import torch

        key = next(k for k in state if k.endswith("position_embeddings.weight"))
        weight = state[key]
        rows, dim = weight.shape
        out = torch.zeros(rows + new_pad - old_pad, dim, dtype=weight.dtype)
        out[new_pad + 1 :] = weight[old_pad + 1 :]
        state[key] = out


def _roberta(name: str, model_type: str, prefix: str) -> RobertaFamily:
    return RobertaFamily(
        name=name,
        model_types=(model_type,),
        config_class=f"{prefix}Config",
        model_class=f"{prefix}ForMaskedLM",
        position_offset=2,
        embedding="roberta.embeddings.word_embeddings",
        vocab_keys=_VOCAB,
        head_modules=("lm_head",),
        sep_extra=True,
    )


XLMR = _roberta("xlmr", "xlm-roberta", "XLMRoberta")
ROBERTA = _roberta("roberta", "roberta", "Roberta")

FAMILIES = (XLMR, ROBERTA)
