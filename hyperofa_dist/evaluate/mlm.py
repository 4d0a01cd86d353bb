"""Per-language masked-LM loss and perplexity on the held-out shards that `prepare` writes.

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
from typing import Any

import numpy as np

from ..errors import HyperofaError
from ..runtime.seeds import HELDOUT, mix_seed


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

    from ..pretrain.mlm import mask_tokens, masked_lm_loss

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
