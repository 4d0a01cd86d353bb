"""Packing tokenized sentences of one language into fixed-length blocks, group-texts style, in numpy.

The sentences' ids are concatenated into one stream, each sentence followed by the family's separator
(`</s>` for XLM-R/RoBERTa, `[SEP]` for BERT); the stream is cut into pieces of `block_size - 2` tokens and
every block is framed as `[cls] piece [sep]` (`<s> … </s>`, `[CLS] … [SEP]`), so every block starts the way
the model saw its pretraining inputs start. A sentence may continue in the next block. The final piece that
does not fill a block is dropped and its sentence tokens are counted (`tokens_lost`), never silently lost.

One exception, asked for with `pad_short` (the held-out split): a stream too short for a single block becomes one
block `[cls] stream [sep] [pad] …`, so a language with a few short held-out sentences still gets evaluated. Its
padding is the only padding in any block; readers give it attention 0 and masking never picks it (pad is a
special token). Streams that fill at least one block are cut exactly as without `pad_short`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np


# Packing rules beyond the config. Part of prepare's inputs: a stage packed under older rules is not up to date.
RULES = {"heldout_shorter_than_a_block": "one padded block"}


@dataclass(frozen=True)
class Specials:
    """Token ids that frame a block (`cls`) and end a sentence and a block (`sep`), and fill a short block (`pad`)."""

    cls: int
    sep: int
    pad: Optional[int] = None

    def can_pad(self) -> bool:
        """A padded block is recognisable only when pad is a token of its own (its last id is pad, not sep)."""
        return self.pad is not None and self.pad not in (self.cls, self.sep)


@dataclass
class Packed:
    blocks: np.ndarray  # uint32 [n_blocks, block_size]
    sentences: int  # sentences in the stream (with multiplicity)
    tokens: int  # sentence tokens in the stream (separators and frames excluded)
    tokens_in_blocks: int  # of those, the ones that made it into a block
    tokens_lost: int  # sentence tokens in the dropped final partial block
    padded_blocks: int = 0  # blocks ending in padding (0 or 1: only a stream shorter than one block gets one)


FLATTEN_PIECE = 1 << 16  # tokens gathered in a Python list before they move into a uint32 array


def flatten_ids(id_lists: Iterable[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(all ids concatenated as uint32, offsets of each sentence [n+1]) from per-sentence id lists.

    The ids pass through a Python list a piece at a time (one list extension per sentence is the fastest route
    from Python lists to an array), so a chunk costs 4 bytes per token, not a Python int per token."""
    pieces: list[np.ndarray] = []
    lengths: list[int] = []
    flat: list[int] = []
    for ids in id_lists:
        flat += ids
        lengths.append(len(ids))
        if len(flat) >= FLATTEN_PIECE:
            pieces.append(np.array(flat, dtype=np.uint32))
            flat = []
    pieces.append(np.array(flat, dtype=np.uint32))
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return np.concatenate(pieces) if len(pieces) > 1 else pieces[0], offsets


STREAM_PIECE = 1 << 16  # sentences gathered at a time: the int64 index arrays stay small whatever the chunk


def token_stream(flat: np.ndarray, offsets: np.ndarray, order: np.ndarray, sep: int) -> tuple[np.ndarray, np.ndarray]:
    """(stream of sentences `order` each followed by `sep`, stream positions of those separators)."""
    order = np.asarray(order, dtype=np.int64)
    lengths = offsets[order + 1] - offsets[order]
    spans = lengths + 1
    starts = np.zeros(order.size, dtype=np.int64)
    if order.size:
        np.cumsum(spans[:-1], out=starts[1:])
    total = int(spans.sum())
    stream = np.empty(total, dtype=flat.dtype if flat.size else np.uint32)
    sep_positions = starts + lengths
    if flat.size:
        # Position p of sentence k maps to source offsets[order[k]] + (p - starts[k]); a separator slot maps one past
        # its sentence (clipped into the array: it is overwritten below). Piece by piece, so the int64 index arrays
        # cover STREAM_PIECE sentences, never the chunk.
        for a in range(0, order.size, STREAM_PIECE):
            b = min(a + STREAM_PIECE, order.size)
            first, last = int(starts[a]), int(starts[b - 1] + spans[b - 1])
            source = np.repeat(offsets[order[a:b]] - starts[a:b], spans[a:b])
            source += np.arange(first, last, dtype=np.int64)
            np.minimum(source, flat.size - 1, out=source)
            stream[first:last] = flat[source]
    stream[sep_positions] = sep
    return stream, sep_positions


def pack_blocks(
    stream: np.ndarray, sep_positions: np.ndarray, block_size: int, specials: Specials, pad_short: bool = False
) -> Packed:
    """Cut the stream into `[cls] piece [sep]` blocks of block_size; count what the partial tail loses.

    With `pad_short` (and a pad id of its own) a non-empty stream too short for one block gives one padded block."""
    if block_size < 3:
        raise ValueError("block_size must leave room for the two frame tokens")
    piece = block_size - 2
    n_blocks = stream.size // piece
    sentences = int(sep_positions.size)
    tokens = int(stream.size) - sentences
    if n_blocks == 0 and stream.size and pad_short and specials.can_pad():
        block = np.full((1, block_size), specials.pad, dtype=np.uint32)
        block[0, 0] = specials.cls
        block[0, 1 : stream.size + 1] = stream
        block[0, stream.size + 1] = specials.sep
        return Packed(block, sentences, tokens, tokens, 0, padded_blocks=1)
    cut = n_blocks * piece
    blocks = np.empty((n_blocks, block_size), dtype=np.uint32)
    blocks[:, 0] = specials.cls
    blocks[:, -1] = specials.sep
    blocks[:, 1:-1] = stream[:cut].reshape(n_blocks, piece)
    lost = int(stream.size - cut) - int(np.count_nonzero(sep_positions >= cut))
    return Packed(blocks, sentences, tokens, tokens - lost, lost)


def pack_sentences(
    flat: np.ndarray,
    offsets: np.ndarray,
    order: np.ndarray,
    block_size: int,
    specials: Specials,
    pad_short: bool = False,
) -> Packed:
    stream, seps = token_stream(flat, offsets, order, specials.sep)
    return pack_blocks(stream, seps, block_size, specials, pad_short)


def block_content(block: np.ndarray, pad: Optional[int] = None) -> np.ndarray:
    """A block without its frame and, for a padded block (its last id is pad), without the padding."""
    block = np.asarray(block)
    if pad is not None and block[-1] == pad:
        real = np.flatnonzero(block != pad)
        return block[1 : int(real[-1])]
    return block[1:-1]


def unpack_blocks(blocks: np.ndarray, sep: int, pad: Optional[int] = None) -> list[np.ndarray]:
    """The inverse view for checks and evaluation: the frames (and padding) removed, the stream split at separators.

    The last element is the unfinished sentence the blocks end in (empty when they end on a separator).
    """
    blocks = np.asarray(blocks)
    if pad is None:
        stream = blocks[:, 1:-1].reshape(-1)
    else:
        stream = np.concatenate([block_content(b, pad) for b in blocks] or [np.zeros(0, blocks.dtype)])
    pieces = np.split(stream, np.flatnonzero(stream == sep) + 1)
    return [piece[:-1] for piece in pieces[:-1]] + [pieces[-1]]
