"""MLM masking and the masked-positions-only LM head (pure torch, no DeepSpeed).

With a 401k-token vocabulary the output projection dominates compute and activation memory (docs/DISTRIBUTED.md §3,
6.2): the stock HF head computes logits at every position and then ignores the 85% that carry label -100.
`masked_lm_loss` runs the encoder, gathers the hidden states of the masked positions, and applies the model's
own head (the same modules, so the same weights and tying) only there. The loss is identical to the stock one.

`sparse_embedding_grad` is the second saving, for tied weights: the lookup's gradient touches only the rows of the
batch's ids, yet the stock embedding backward materialises a dense vocabulary-sized matrix of zeros and adds it to
the decoder's (dense) gradient. Marking the lookup sparse lets autograd add those rows into the decoder's gradient
in place; the parameter still receives one dense gradient, so ZeRO's hooks see what they expect.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

IGNORE = -100


def mask_tokens(
    input_ids: torch.Tensor,
    special_ids: torch.Tensor,
    mask_id: int,
    vocab_size: int,
    generator: torch.Generator,
    probability: float = 0.15,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: choose `probability` of the non-special positions; of those 80% -> mask, 10% -> a random
    token, 10% unchanged. Returns (inputs, labels) with labels IGNORE where nothing is predicted."""
    labels = input_ids.clone()
    chance = torch.full(input_ids.shape, probability)
    special = torch.isin(input_ids, special_ids)
    chance.masked_fill_(special, 0.0)
    chosen = torch.bernoulli(chance, generator=generator).bool()
    labels[~chosen] = IGNORE
    inputs = input_ids.clone()
    to_mask = torch.bernoulli(torch.full(input_ids.shape, 0.8), generator=generator).bool() & chosen
    inputs[to_mask] = mask_id
    to_random = torch.bernoulli(torch.full(input_ids.shape, 0.5), generator=generator).bool() & chosen & ~to_mask
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator, dtype=input_ids.dtype)
    inputs[to_random] = random_ids[to_random]
    return inputs, labels


def lm_head_of(model: torch.nn.Module) -> torch.nn.Module:
    """The position-wise prediction head of an HF masked LM (RoBERTa/XLM-R: lm_head; BERT: cls)."""
    for name in ("lm_head", "cls"):
        head = getattr(model, name, None)
        if head is not None:
            return head
    raise TypeError(f"{type(model).__name__} has no lm_head or cls prediction head")


def encoder_of(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, model.base_model_prefix)


def sparse_embedding_grad(model: torch.nn.Module) -> bool:
    """Make the input lookup emit a sparse gradient where the embedding is tied to the decoder; True if it did.

    A factorised model's coordinate lookup F_t[ids] is tied the same way (the decoder multiplies by all of F_t).
    Untied embeddings keep the dense gradient: a sparse `.grad` alone would reach the optimizer and ZeRO."""
    from ..init.factorised import FactorisedDecoder, FactorisedEmbedding

    lookup, decoder = model.get_input_embeddings(), model.get_output_embeddings()
    if isinstance(lookup, FactorisedEmbedding):
        if not isinstance(decoder, FactorisedDecoder) or decoder.embedding is not lookup:
            return False
        lookup.coordinates.sparse = True
        return True
    if decoder is None or decoder.weight is not lookup.weight or not isinstance(lookup, torch.nn.Embedding):
        return False
    lookup.sparse = True
    return True


def masked_lm_loss(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over masked positions with logits computed only there; returns (loss, n_masked)."""
    hidden = encoder_of(model)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    where = labels != IGNORE
    n_masked = int(where.sum())
    if n_masked == 0:
        # Keep the graph connected so every rank runs the same backward collectives, and keep the decoder in it:
        # with a sparse lookup gradient the tied weight needs the decoder's dense one to add into.
        return (hidden.sum() + lm_head_of(model)(hidden[:1, 0]).sum()) * 0.0, 0
    logits = lm_head_of(model)(hidden[where])
    return F.cross_entropy(logits.float(), labels[where]), n_masked


def full_lm_loss(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The stock HF path (logits at every position): the reference the masked head must equal."""
    return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
