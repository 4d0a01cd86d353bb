"""Per-language masked-LM loss and perplexity on the held-out shards that `prepare` writes.

Held-out blocks are read per language (at most `max_blocks` each, in shard order), masked with the same 80/10/10
rule as pretraining from a generator seeded by (seed, language) alone, so a language's numbers do not move when
other languages or the batch size change. The loss is the mean cross-entropy over all masked tokens of the
language; perplexity is its exponential.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..errors import HyperofaError
from .model import stable_seed


def find_heldout_shards(path: str | Path) -> list[Path]:
    """Held-out tar shards of a prepare directory (from its manifest when it lists them), or every tar under a
    directory of shards (`<dir>/heldout/**` when present)."""
    path = Path(path)
    if not path.is_dir():
        raise HyperofaError(
            f"{path}: held-out shard directory not found (run `hyperofa prepare` or set evaluate.heldout_dir)"
        )
    manifest_path = path / "manifest.json"
    if manifest_path.is_file():
        try:
            listed = json.loads(manifest_path.read_text(encoding="utf-8")).get("shards")
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise HyperofaError(f"{manifest_path}: manifest is not valid JSON") from None
        if isinstance(listed, list):
            shards = [path / s["path"] for s in listed if s.get("split") == "heldout"]
            missing = [p for p in shards if not p.is_file()]
            if missing:
                raise HyperofaError(f"{missing[0]}: held-out shard listed in the prepare manifest is missing")
            if not shards:
                raise HyperofaError(f"{manifest_path}: no held-out shards (prepare.heldout_fraction is 0?)")
            return sorted(shards)
    root = path / "heldout" if (path / "heldout").is_dir() else path
    shards = sorted(root.rglob("*.tar"))
    if not shards:
        raise HyperofaError(f"{root}: no .tar shards found")
    return shards


def read_heldout_blocks(
    shards: Sequence[Path], max_blocks: Optional[int] = None, languages: Optional[Sequence[str]] = None
) -> dict[str, np.ndarray]:
    """language -> uint32 [n, block_size] blocks, from `input_ids.npy` + `lang.txt` samples, in shard order."""
    import webdataset as wds

    found: dict[str, list[np.ndarray]] = {}
    counts: dict[str, int] = {}
    wanted = set(languages) if languages is not None else None
    width: Optional[int] = None
    for shard in shards:
        for sample in wds.tariterators.tarfile_samples([{"url": str(shard)}]):
            key = sample.get("__key__")
            if "input_ids.npy" not in sample or "lang.txt" not in sample:
                raise HyperofaError(f"{shard}: sample {key} lacks input_ids.npy or lang.txt")
            lang = sample["lang.txt"].decode("utf-8").strip()
            if wanted is not None and lang not in wanted:
                continue
            have = counts.get(lang, 0)
            if max_blocks is not None and have >= max_blocks:
                continue
            array = np.load(io.BytesIO(sample["input_ids.npy"]), allow_pickle=False)
            if array.ndim != 2:
                raise HyperofaError(f"{shard}: sample {key}: input_ids must be [n, block_size], got {array.shape}")
            if width is not None and array.shape[1] != width:
                raise HyperofaError(f"{shard}: sample {key}: block size {array.shape[1]} differs from {width}")
            width = array.shape[1]
            if max_blocks is not None:
                array = array[: max_blocks - have]
            found.setdefault(lang, []).append(array)
            counts[lang] = have + array.shape[0]
    return {lang: np.concatenate(parts) for lang, parts in sorted(found.items())}


def mlm_loss_per_language(
    model: Any,
    tokenizer: Any,
    blocks: dict[str, np.ndarray],
    *,
    seed: int,
    probability: float = 0.15,
    batch_size: int = 16,
    device: Any = "cpu",
) -> dict[str, dict[str, float]]:
    """{language: {'loss', 'perplexity'}} of a stock masked LM on fixed-seed masked blocks."""
    import torch
    from tqdm.auto import tqdm

    from ..pretrain.mlm import mask_tokens, masked_lm_loss

    rows = model.get_input_embeddings().num_embeddings
    special = torch.tensor(sorted(set(int(i) for i in tokenizer.all_special_ids)), dtype=torch.long)
    pad = tokenizer.pad_token_id
    out = {}
    for lang, array in blocks.items():
        if array.size and int(array.max()) >= rows:
            raise HyperofaError(
                f"held-out blocks of {lang} contain token id {int(array.max())} but the model has {rows} embedding "
                "rows; the shards were tokenized with another tokenizer"
            )
        ids = torch.from_numpy(array.astype(np.int64))
        generator = torch.Generator().manual_seed(stable_seed(seed, "heldout-mlm", lang))
        inputs, labels = mask_tokens(ids, special, tokenizer.mask_token_id, len(tokenizer), generator, probability)
        total, count = 0.0, 0
        with torch.inference_mode():
            for start in tqdm(range(0, len(ids), batch_size), desc=f"mlm {lang}", leave=False, disable=None):
                batch_in = inputs[start : start + batch_size].to(device)
                batch_labels = labels[start : start + batch_size].to(device)
                attention = (batch_in != pad).long() if pad is not None else None
                loss, n = masked_lm_loss(model, batch_in, batch_labels, attention)
                total += float(loss) * n
                count += n
        if count == 0:
            raise HyperofaError(f"held-out blocks of {lang}: no token was masked (too few blocks?)")
        mean = total / count
        out[lang] = {"loss": mean, "perplexity": math.exp(min(mean, 700.0))}
    return out
