"""What the project needs to know about one model family, in one record: the config's model types it covers, its
kind (masked or causal), where its word embeddings and MLM head live, the positions its table reserves, how its
tagging input is framed, how its config follows an expanded vocabulary, and how to build a tiny one from a config.

Every other module asks the registry (`models.family_of`) instead of testing a model type, so a new family is one
file here and one registration line (docs/ARCHITECTURE.md, "How to add a model family"). Records hold names and
numbers only; transformers is imported when a tiny model is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ..formats.models import CAUSAL, MASKED


@dataclass(frozen=True)
class TinySizes:
    """The shape of a generated test/demo model."""

    hidden_size: int
    num_layers: int
    num_heads: int
    max_position: int
    tied: bool = True


@dataclass(frozen=True)
class Family:
    name: str  # the project's name of the family (recorded in init's manifest: `family`)
    model_types: tuple[str, ...]  # the `model_type` values of its configs
    config_class: str  # transformers classes of a tiny model
    model_class: str
    # Positions the table holds beyond the tokens: RoBERTa's ids start at pad_token_id + 1 = 2.
    position_offset: int = 0

    kind = ""

    def tiny_config_kwargs(self, tokenizer: Any, sizes: TinySizes) -> dict[str, Any]:
        raise NotImplementedError

    def tiny_model(self, tokenizer: Any, sizes: TinySizes) -> Any:
        """A randomly initialised model of this family over `tokenizer`'s vocabulary (the caller seeds torch)."""
        import transformers

        config = getattr(transformers, self.config_class)(**self.tiny_config_kwargs(tokenizer, sizes))
        return getattr(transformers, self.model_class)(config)


@dataclass(frozen=True)
class MaskedFamily(Family):
    """An encoder masked LM with a tied decoder. `embedding` is the state-dict name of the input word-embedding
    module, `vocab_keys` the vocabulary-sized tensors of the masked LM (rebuilt by the export, never copied),
    `head_modules` the model's attributes that map a hidden state to logits, in order (a sentence-embedding
    checkpoint lacks their weights). `sep_extra`: tagging input ends in two separators (the reference's
    `sep_token_extra`). `special_id_keys`: config keys naming a special token id, moved with their token.
    `pooler`: whether its base model has a pooling layer (BERT, RoBERTa: never trained by the MLM objective)."""

    embedding: str = ""
    vocab_keys: tuple[str, ...] = ()
    head_modules: tuple[str, ...] = ()
    sep_extra: bool = False
    special_id_keys: tuple[str, ...] = ()
    pooler: bool = True  # its base model (AutoModel) adds a pooling layer, which hidden-state users leave out

    kind = MASKED

    @property
    def embedding_suffix(self) -> str:
        """The end of the word-embedding weight's name, whatever prefix a wrapper adds."""
        return self.embedding.rpartition(".")[2] + ".weight"

    def prediction_head(self, model: Any) -> Any:
        """The module that maps hidden states [..., D] to logits [..., V] (the model's own, so its weights and
        tying)."""
        modules = [getattr(model, name) for name in self.head_modules]
        if len(modules) == 1:
            return modules[0]
        import torch

        return torch.nn.Sequential(*modules)

    def expand_config(self, config: Any, source_config: Any, target_tokenizer: Any, id_map: dict[int, int]) -> int:
        """Make `config` (a copy of the source's, pad id already the target's) fit the target vocabulary; returns
        the position-table shift (rows to insert before the first real position). Here: every id key follows its
        token (`id_map`: source id -> target id of the copied tokens)."""
        for key in self.special_id_keys:
            value = getattr(config, key, None)
            if isinstance(value, int):
                setattr(config, key, id_map.get(value, value))
        return 0

    def shift_positions(self, state: dict[str, Any], old_pad: int, new_pad: int) -> None:
        """Move the position table of `state` when the pad id moved (only families whose positions count from the
        pad id have one to move)."""
        raise NotImplementedError(f"{self.name}: positions do not depend on the pad id")


@dataclass(frozen=True)
class CausalFamily(Family):
    """A decoder-only LM. Its embeddings and output projection are reached through transformers' generic accessors,
    so the record only names the family and how to build a tiny one."""

    kind = CAUSAL

    def tiny_config_kwargs(self, tokenizer: Any, sizes: TinySizes) -> dict[str, Any]:
        return dict(
            vocab_size=len(tokenizer),
            hidden_size=sizes.hidden_size,
            intermediate_size=sizes.hidden_size * 4,
            num_hidden_layers=sizes.num_layers,
            num_attention_heads=sizes.num_heads,
            num_key_value_heads=max(1, sizes.num_heads // 2),  # grouped-query attention, as the families use
            max_position_embeddings=sizes.max_position,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            # no pad_token_id: the embedding would then freeze that row's input gradient, and Llama has no pad token
            tie_word_embeddings=sizes.tied,
        )


def masked_common(tokenizer: Any, sizes: TinySizes) -> dict[str, Any]:
    """The tiny config keys every masked family shares."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=sizes.hidden_size,
        num_hidden_layers=sizes.num_layers,
        num_attention_heads=sizes.num_heads,
        intermediate_size=sizes.hidden_size * 4,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )


def config_get(config: Any, key: str) -> Optional[Any]:
    """A key of an HF config object or of a `config.json` dict."""
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)
