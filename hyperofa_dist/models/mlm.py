"""The masked-LM objective: MLM masking, the masked-positions-only LM head (pure torch, no DeepSpeed), and the
per-language held-out loss.

With a 401k-token vocabulary the output projection dominates compute and activation memory (docs/DISTRIBUTED.md §3,
6.2): the stock HF head computes logits at every position and then ignores the 85% that carry label -100.
`masked_lm_loss` runs the encoder, gathers the hidden states of the masked positions, and applies the model's
own head (the same modules, so the same weights and tying) only there. The loss is identical to the stock one.

`sparse_embedding_grad` is the second saving, for tied weights: the lookup's gradient touches only the rows of the
batch's ids, yet the stock embedding backward materialises a dense vocabulary-sized matrix of zeros and adds it to
the decoder's (dense) gradient. Marking the lookup sparse lets autograd add those rows into the decoder's gradient
in place; the parameter still receives one dense gradient, so ZeRO's hooks see what they expect.

`mlm_loss_per_language`: per-language masked-LM loss and perplexity on the held-out shards that `prepare` writes.

Held-out blocks are read per language (at most `max_blocks` each, in shard order), masked with the same 80/10/10
rule as pretraining from a generator seeded by (seed, language) alone, so a language's numbers do not move when
other languages or the batch size change. The loss is the mean cross-entropy over all masked tokens of the
language; perplexity is its exponential. A block may end in padding (prepare pads a held-out part shorter than one
block): padding is never masked (it is a special token) and gets attention 0, so it changes no number. With
`scored_labels`, the same positions are masked but only those whose label is a marked token id count (the init
stage scores the new tokens: where the init methods differ).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import HyperofaError
from ..runtime.seeds import HELDOUT, mix_seed

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
    """The position-wise prediction head of an HF masked LM, as its family names it."""
    from . import masked_family

    return masked_family(model.config, type(model).__name__).prediction_head(model)


def encoder_of(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, model.base_model_prefix)


def sparse_embedding_grad(model: torch.nn.Module) -> bool:
    """Make the input lookup emit a sparse gradient where the embedding is tied to the decoder; True if it did.

    A factorised model's coordinate lookup F_t[ids] is tied the same way (the decoder multiplies by all of F_t).
    Untied embeddings keep the dense gradient: a sparse `.grad` alone would reach the optimizer and ZeRO."""
    from .factorised import FactorisedDecoder, FactorisedEmbedding

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


def mlm_loss_per_language(
    model: Any,
    tokenizer: Any,
    blocks: dict[str, np.ndarray],
    *,
    seed: int,
    probability: float = 0.15,
    batch_size: int = 16,
    device: Any = "cpu",
    scored_labels: Any = None,
) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """({language: {'loss', 'perplexity', 'positions'}}, {skipped language: why}) of a stock masked LM on
    fixed-seed masked blocks; a language whose blocks got no (scored) masked token is skipped, not scored.

    `scored_labels` (bool per token id): count only masked positions whose label is marked."""
    import torch
    from tqdm.auto import tqdm

    rows = model.get_input_embeddings().num_embeddings
    special = torch.tensor(sorted(set(int(i) for i in tokenizer.all_special_ids)), dtype=torch.long)
    pad = tokenizer.pad_token_id
    out, skipped = {}, {}
    for lang, array in blocks.items():
        if array.size and int(array.max()) >= rows:
            raise HyperofaError(
                f"held-out blocks of {lang} contain token id {int(array.max())} but the model has {rows} embedding "
                "rows; the shards were tokenized with another tokenizer"
            )
        ids = torch.from_numpy(array.astype(np.int64))
        generator = torch.Generator().manual_seed(mix_seed(seed, HELDOUT, lang))
        inputs, labels = mask_tokens(ids, special, tokenizer.mask_token_id, len(tokenizer), generator, probability)
        if scored_labels is not None:
            keep = torch.as_tensor(scored_labels, dtype=torch.bool)
            labels = torch.where((labels >= 0) & keep[labels.clamp(min=0)], labels, torch.full_like(labels, -100))
        # From the ids before masking: a random replacement that happens to be the pad id is still a real position.
        attention = (ids != pad).long() if pad is not None else torch.ones_like(ids)
        total, count = 0.0, 0
        with torch.inference_mode():
            for start in tqdm(range(0, len(ids), batch_size), desc=f"mlm {lang}", leave=False, disable=None):
                batch_in = inputs[start : start + batch_size].to(device)
                batch_labels = labels[start : start + batch_size].to(device)
                batch_attention = attention[start : start + batch_size].to(device)
                loss, n = masked_lm_loss(model, batch_in, batch_labels, batch_attention)
                total += float(loss) * n
                count += n
        if count == 0:
            what = "new-token position" if scored_labels is not None else "token"
            skipped[lang] = f"no {what} of its {len(ids)} held-out blocks was masked"
            continue
        mean = total / count
        out[lang] = {"loss": mean, "perplexity": math.exp(min(mean, 700.0)), "positions": count}
    return out, skipped
