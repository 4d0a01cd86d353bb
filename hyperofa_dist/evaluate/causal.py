"""Held-out evaluation of causal LMs, comparable across tokenizers: bits per byte and tokenizer fertility.

Perplexity per token cannot compare two tokenizers (the extended one spends fewer tokens on the same text); bits
per byte can: the summed next-token loss of a text divided by ln 2 and by the text's UTF-8 bytes, a denominator
no tokenizer changes. It needs the text itself, and the held-out shards hold token ids in blocks that cut lines
anywhere (data_prep/prepare/packing.py). So the evaluation rebuilds text, not counts bytes of blocks:

1. The held-out blocks of one prepare chunk are consecutive pieces of one stream of whole lines, each line
   followed by the separator (`heldout_lines`): with the frames (and padding) removed and the stream split at the
   separators, every line comes back whole except the chunk's last, which lost its tail, and is dropped.
2. Each line's ids are decoded by the tokenizer that made the shards. The causal families' tokenizers (byte-level
   BPE, SentencePiece BPE with byte fallback) are lossless: decode(encode(line)) == line, so this is prepare's
   line (after prepare's Unicode normalisation) byte for byte; `lossy` counts lines whose decoded text does not
   encode back to the same ids (a lossy tokenizer: its bytes are those of the decoded text).
3. The model's own tokenizer encodes each text; the model reads `[start] ids` (start: bos, else eos) and every
   text token is scored once (the start token is not predicted, no end token is), with the chunked output
   projection (models/causal.py). bpb = sum of losses / (ln 2 x sum of UTF-8 bytes).

Why not count bytes in prepare: its shards are ids in blocks, and a per-block byte count is not defined where a
block boundary cuts a character's byte tokens; decoding a block alone is wrong for the same reason (a partial
UTF-8 sequence decodes to U+FFFD, the SentencePiece decoder strips a leading space). Whole lines have neither
problem, and the same first N held-out lines of a language are the same text whatever tokenizer made the shards
(prepare picks held-out lines before tokenizing), so a source model on the run's shards reads what its expanded
model reads.

Fertility: the same texts under the source tokenizer and the model's (the target): pieces per word, who splits a
word less, unknown-token rates (fertility.py), and tokens per byte.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..errors import HyperofaError
from ..formats.shards import read_shard
from ..models.causal import Frame

CHUNK_OF = re.compile(r"-(?P<chunk>\d{5})-\d{6}\.tar$")  # formats.shards.shard_name: <lang>-<chunk>-<index>.tar


def _streams(shards: Sequence[str | Path]) -> list[list[Path]]:
    """The shards of one language grouped by prepare chunk (each group one continuous stream), in order; a shard
    named otherwise is a stream of its own."""
    groups: dict[Any, list[Path]] = {}
    for shard in sorted(Path(s) for s in shards):
        match = CHUNK_OF.search(shard.name)
        groups.setdefault(int(match["chunk"]) if match else str(shard), []).append(shard)
    return list(groups.values())


def block_content(block: np.ndarray, frame: Frame) -> np.ndarray:
    """A block without its start token, its end token and trailing padding."""
    end = len(block) - 1
    if frame.pad is not None:
        real = np.flatnonzero(block != frame.pad)
        end = int(real[-1]) if len(real) else 0
    return block[1:end]


def heldout_lines(shards: Sequence[str | Path], frame: Frame, limit: int) -> list[np.ndarray]:
    """The first `limit` whole held-out lines (their ids, no separator) of one language's shards."""
    lines: list[np.ndarray] = []
    for stream in _streams(shards):
        pending: list[np.ndarray] = []
        for shard in stream:
            for sample in read_shard(shard):
                for block in sample.blocks:
                    content = block_content(block, frame)
                    cuts = np.flatnonzero(content == frame.sep)
                    start = 0
                    for cut in cuts:
                        pending.append(content[start:cut])
                        lines.append(np.concatenate(pending).astype(np.int64))
                        pending = []
                        start = cut + 1
                        if len(lines) >= limit:
                            return lines
                    pending.append(content[start:])
        # `pending` is the chunk's last line, cut by the end of its stream: never scored.
    return lines


def decode_lines(tokenizer: Any, lines: list[np.ndarray]) -> tuple[list[str], int]:
    """(texts, how many do not encode back to their ids) under the tokenizer that made the shards."""
    texts = tokenizer.batch_decode([line.tolist() for line in lines], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
    again = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    lossy = sum(1 for ids, back in zip(lines, again) if list(back) != ids.tolist())
    return texts, lossy


def start_token(tokenizer: Any, where: Any) -> int:
    for role in ("bos", "eos"):
        token = getattr(tokenizer, f"{role}_token_id", None)
        if token is not None:
            return int(token)
    raise HyperofaError(f"{where}: the tokenizer has neither a bos nor an eos token to start a text with")


def bits_per_byte(
    model: Any,
    tokenizer: Any,
    texts: list[str],
    *,
    batch_size: int = 16,
    chunk: int = 1024,
    device: Any = "cpu",
    where: Any = "",
) -> dict[str, float]:
    """{'bpb', 'loss' (nats per token), 'tokens_per_byte', 'sentences', 'bytes', 'too_long'} of a causal LM on
    texts, each read alone as `[start] text`. A text longer than the model's positions is left out and counted."""
    import torch

    from ..models.causal import IGNORE, body_of, labelled_nll

    start = start_token(tokenizer, where)
    limit = int(getattr(model.config, "max_position_embeddings", 0) or 10**9)
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    kept = [(ids, len(text.encode("utf-8"))) for ids, text in zip(encoded, texts) if 0 < len(ids) < limit]
    too_long = sum(1 for ids in encoded if len(ids) >= limit)
    kept.sort(key=lambda item: len(item[0]))  # similar lengths share a batch: less padding, same numbers
    total, tokens = 0.0, 0
    body = body_of(model)
    with torch.no_grad():
        for first in range(0, len(kept), batch_size):
            batch = kept[first : first + batch_size]
            width = 1 + max(len(ids) for ids, _ in batch)
            inputs = torch.full((len(batch), width), start, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
            for row, (ids, _) in enumerate(batch):
                inputs[row, 1 : 1 + len(ids)] = torch.tensor(ids)
                attention[row, : 1 + len(ids)] = 1
                labels[row, : len(ids)] = torch.tensor(ids)  # position k reads [start] ids[:k] and predicts ids[k]
            hidden = body(input_ids=inputs.to(device), attention_mask=attention.to(device),
                          use_cache=False).last_hidden_state
            nll, n = labelled_nll(model, hidden, labels.to(device), chunk=chunk)
            total += float(nll)
            tokens += n
    n_bytes = sum(b for _, b in kept)
    return {
        "bpb": total / (math.log(2) * n_bytes) if n_bytes else float("nan"),
        "loss": total / tokens if tokens else float("nan"),
        "tokens_per_byte": tokens / n_bytes if n_bytes else float("nan"),
        "sentences": float(len(kept)),
        "bytes": float(n_bytes),
        "too_long": float(too_long),
    }


def fertility(source: Any, target: Any, texts: list[str]) -> dict[str, float]:
    """Pieces per word of the source and the target tokenizer (HF fast tokenizers) on the same texts, who splits
    a word less, unknown-token rates, and tokens per UTF-8 byte of each."""
    from ..fertility import fertility as word_fertility

    report = word_fertility(source.backend_tokenizer, target.backend_tokenizer, texts)
    n_bytes = sum(len(text.encode("utf-8")) for text in texts)

    def per_byte(tokenizer: Any) -> float:
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        return sum(len(x) for x in ids) / n_bytes if n_bytes else float("nan")

    return {
        "words": float(report.words),
        "fertility_source": report.fertility_source,
        "fertility_target": report.fertility_target,
        "share_fewer_target": report.share_fewer_target,
        "share_fewer_source": report.share_fewer_source,
        "unk_rate_source": report.unk_rate_source,
        "unk_rate_target": report.unk_rate_target,
        "tokens_per_byte_source": per_byte(source),
        "tokens_per_byte_target": per_byte(target),
    }


def shards_tokenizer(
    heldout_dir: Path, recorded: Optional[str], candidates: list[tuple[str, Optional[Path]]]
) -> tuple[str, Path]:
    """(config key, directory) of the tokenizer that made the held-out shards: the first candidate whose
    tokenizer.json has the sha256 prepare recorded; without a record, the first candidate."""
    from ..formats.tokenizer import TOKENIZER_JSON
    from ..formats.files import sha256_file

    present = [(key, Path(path)) for key, path in candidates if path is not None and (Path(path) / TOKENIZER_JSON).is_file()]
    if recorded is None:
        if not present:
            raise HyperofaError(f"{heldout_dir}: no tokenizer to read the held-out shards with; set evaluate.heldout_tokenizer")
        return present[0]
    for key, path in present:
        if sha256_file(path / TOKENIZER_JSON) == recorded:
            return key, path
    tried = ", ".join(f"{key}={path}" for key, path in present) or "none"
    raise HyperofaError(
        f"{heldout_dir}: the held-out shards were made with a tokenizer (tokenizer.json sha256 {recorded[:12]}) that is "
        f"none of {tried}; set evaluate.heldout_tokenizer to the tokenizer prepare used"
    )
