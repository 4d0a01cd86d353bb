"""Step-0 next-token loss of a causal LM at the positions whose label is a new token (the init stage's measure for
causal sources, the counterpart of the masked-LM loss at masked new-token positions).

Position t of a held-out block predicts token t+1; it counts when that token is marked in `scored_labels` (the
tokens that were not copied, where the init methods differ). Blocks are read whole, with causal attention over the
packed sentences and default positions; padding (only at the end of a short held-out block) is never a new token
and precedes no scored position, so it changes no number. The loss is the mean cross-entropy in nats over the
counted positions, per language; the logits are the model's own (`forward`), so a family's logit scaling or soft
capping is applied. Pure: no files, no config.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import HyperofaError


def next_token_loss_per_language(
    model: Any, blocks: dict[str, np.ndarray], scored_labels: Any, *, batch_size: int = 16, device: Any = "cpu"
) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """({language: {'loss', 'positions'}}, {skipped language: why}): mean next-token cross-entropy at positions
    whose label is marked in `scored_labels` (bool per token id)."""
    import torch
    import torch.nn.functional as F

    rows = model.get_input_embeddings().num_embeddings
    scored = torch.as_tensor(np.asarray(scored_labels, dtype=bool))
    out, skipped = {}, {}
    for lang, array in blocks.items():
        if array.size and int(array.max()) >= min(rows, len(scored)):
            raise HyperofaError(
                f"held-out blocks of {lang} contain token id {int(array.max())} but the model has {rows} embedding "
                "rows; the shards were tokenized with another tokenizer"
            )
        ids = torch.from_numpy(array.astype(np.int64))
        labels = ids[:, 1:]
        keep = scored[labels]
        total, count = 0.0, 0
        with torch.inference_mode():
            for start in range(0, len(ids), batch_size):
                batch_keep = keep[start : start + batch_size]
                if not batch_keep.any():
                    continue
                logits = model(input_ids=ids[start : start + batch_size].to(device), use_cache=False).logits
                picked = logits[:, :-1][batch_keep.to(device)].float()
                target = labels[start : start + batch_size][batch_keep].to(device)
                total += float(F.cross_entropy(picked, target, reduction="sum"))
                count += int(batch_keep.sum())
        if count == 0:
            skipped[lang] = f"no position of its {len(ids)} held-out blocks is followed by a new token"
            continue
        out[lang] = {"loss": total / count, "positions": count}
    return out, skipped
