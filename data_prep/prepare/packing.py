"""Packing tokenized sentences of one language into fixed-length blocks, group-texts style, in numpy.

The sentences' ids are concatenated into one stream, each sentence followed by the family's separator
(`</s>` for XLM-R/RoBERTa, `[SEP]` for BERT); the stream is cut into pieces of `block_size - 2` tokens and
every block is framed as `[cls] piece [sep]` (`<s> … </s>`, `[CLS] … [SEP]`), so every block starts the way
the model saw its pretraining inputs start. A sentence may continue in the next block. The final piece that
does not fill a block is dropped and its sentence tokens are counted (`tokens_lost`), never silently lost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np


@dataclass(frozen=True)
class Specials:
    """Token ids that frame a block (`cls`) and end a sentence and a block (`sep`)."""

    cls: int
    sep: int


@dataclass
class Packed:
    blocks: np.ndarray  # uint32 [n_blocks, block_size]
    sentences: int  # sentences in the stream (with multiplicity)
    tokens: int  # sentence tokens in the stream (separators and frames excluded)
    tokens_in_blocks: int  # of those, the ones that made it into a block
    tokens_lost: int  # sentence tokens in the dropped final partial block


def flatten_ids(id_lists: Iterable[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(all ids concatenated as uint32, offsets of each sentence [n+1]) from per-sentence id lists."""
    flat: list[int] = []
    lengths: list[int] = []
    for ids in id_lists:  # one list extension per sentence: the fastest route from Python lists to one array
        flat += ids
        lengths.append(len(ids))
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return np.array(flat, dtype=np.uint32), offsets


def token_stream(flat: np.ndarray, offsets: np.ndarray, order: np.ndarray, sep: int) -> tuple[np.ndarray, np.ndarray]:
    """(stream of sentences `order` each followed by `sep`, stream positions of those separators)."""
    order = np.asarray(order, dtype=np.int64)
    lengths = offsets[order + 1] - offsets[order]
    spans = lengths + 1
    starts = np.zeros(order.size, dtype=np.int64)
    if order.size:
        np.cumsum(spans[:-1], out=starts[1:])
    total = int(spans.sum())
    # Position p of sentence k maps to source offsets[order[k]] + (p - starts[k]); the separator slot maps one
    # past the sentence, which the appended dummy makes a valid index before it is overwritten.
    source = np.repeat(offsets[order] - starts, spans) + np.arange(total, dtype=np.int64)
    padded = np.append(flat, np.uint32(0))
    stream = padded[source]
    sep_positions = starts + lengths
    stream[sep_positions] = sep
    return stream, sep_positions


def pack_blocks(stream: np.ndarray, sep_positions: np.ndarray, block_size: int, specials: Specials) -> Packed:
    """Cut the stream into `[cls] piece [sep]` blocks of block_size; count what the partial tail loses."""
    if block_size < 3:
        raise ValueError("block_size must leave room for the two frame tokens")
    piece = block_size - 2
    n_blocks = stream.size // piece
    cut = n_blocks * piece
    blocks = np.empty((n_blocks, block_size), dtype=np.uint32)
    blocks[:, 0] = specials.cls
    blocks[:, -1] = specials.sep
    blocks[:, 1:-1] = stream[:cut].reshape(n_blocks, piece)
    sentences = int(sep_positions.size)
    tokens = int(stream.size) - sentences
    lost = int(stream.size - cut) - int(np.count_nonzero(sep_positions >= cut))
    return Packed(blocks, sentences, tokens, tokens - lost, lost)


def pack_sentences(
    flat: np.ndarray, offsets: np.ndarray, order: np.ndarray, block_size: int, specials: Specials
) -> Packed:
    stream, seps = token_stream(flat, offsets, order, specials.sep)
    return pack_blocks(stream, seps, block_size, specials)


def unpack_blocks(blocks: np.ndarray, sep: int) -> list[np.ndarray]:
    """The inverse view for checks and evaluation: the frames removed, the stream split at separators.

    The last element is the unfinished sentence the blocks end in (empty when they end on a separator).
    """
    stream = np.asarray(blocks)[:, 1:-1].reshape(-1)
    pieces = np.split(stream, np.flatnonzero(stream == sep) + 1)
    return [piece[:-1] for piece in pieces[:-1]] + [pieces[-1]]
