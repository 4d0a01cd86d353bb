"""The "mean of source pieces" baseline (FOCUS's heuristic, and what vocabulary-expansion studies of LLMs call the
subword-mean init; docs/METHOD.md §6): a new token's row is the mean of the rows of the source tokens its own
string splits into.

The split is the source tokenizer's *model* applied to the token's vocabulary string, with no normalizer,
pre-tokenizer or post-processor: that string is already in the model's alphabet (byte-level characters, `▁`, plain
characters), so its pieces concatenate back to it. Decoding the token and encoding the text instead goes wrong in
two ways: a byte-level token holding part of a UTF-8 character decodes to U+FFFD, and a SentencePiece-style decode
drops the `▁` that encoding then adds back in front of pieces that never had one. With byte fallback a character
the source lacks splits into its byte tokens, so it gets the mean of their rows (weak, but defined).

A WordPiece source (BERT) is split by its own greedy longest-match rule, run here on its vocabulary: a word-initial
target token (`abc`) splits as the source splits a word (`ab`, `##c`); a continuation token (`##abc`) splits as
the source continues a word, every piece in its `##` form (`##ab`, `##c`). The source model's `tokenize` cannot do
the second: it reads `##abc` as a word starting with two `#` characters.

The mean is taken over rows of F_s, so F_t P is the mean of the pieces' rows of F_s P: the same embedding whether
the model is used factorised or full rank. A token whose split holds the source's unknown token has no mean and
stays random.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import HyperofaError


@dataclass
class PieceMeans:
    token_ids: np.ndarray  # target ids that got a mean, ascending
    rows: np.ndarray  # float32 [n, k]: mean F_s row of each token's pieces
    pieces: int  # source pieces averaged in all
    without: int  # tokens asked for whose split holds the unknown token (left random)


def _model_state(tokenizer: Any) -> dict[str, Any]:
    return json.loads(tokenizer.backend_tokenizer.to_str())["model"]


def wordpiece_split(vocab: dict[str, int], unk_id: int, prefix: str = "##", max_chars: int = 100) -> Any:
    """`token string -> source ids` by WordPiece's greedy longest-match-first rule; a `prefix`ed (continuation)
    token is split as the continuation of a word, so each of its pieces, the first included, is a `prefix` piece.
    A string with a character no piece covers, or longer than `max_chars`, is the unknown token (as WordPiece does
    for a word)."""

    def split(token: str) -> list[int]:
        continuing = token.startswith(prefix) and len(token) > len(prefix)
        text = token[len(prefix):] if continuing else token
        if len(text) > max_chars:
            return [unk_id]
        pieces, start = [], 0
        while start < len(text):
            for end in range(len(text), start, -1):
                piece = text[start:end] if start == 0 and not continuing else prefix + text[start:end]
                if piece in vocab:
                    pieces.append(vocab[piece])
                    start = end
                    break
            else:
                return [unk_id]
        return pieces

    return split


def piece_splitter(source_tokenizer: Any, target_tokenizer: Any, where: str = "target tokenizer") -> Any:
    """`token string -> source ids` by the source tokenizer's model (WordPiece: by its rule, `wordpiece_split`);
    refused (one line) when the target's strings are not in the source model's alphabet."""
    from ..vocab import detect_family

    source_state, target_state = _model_state(source_tokenizer), _model_state(target_tokenizer)
    source_type, target_type = source_state["type"], target_state["type"]
    source_family, target_family = detect_family(source_tokenizer), detect_family(target_tokenizer)
    if source_type != target_type or source_family != target_family:
        raise HyperofaError(
            f"{where}: init.method=mean needs a target tokenizer of the source's kind (tokenizer.mode=extend); the "
            f"source is {source_type}/{source_family}, the target {target_type}/{target_family}"
        )
    if source_type == "WordPiece":
        if target_state.get("continuing_subword_prefix", "##") != source_state.get("continuing_subword_prefix", "##"):
            raise HyperofaError(
                f"{where}: init.method=mean needs the source's continuation prefix "
                f"{source_state.get('continuing_subword_prefix')!r}, the target uses "
                f"{target_state.get('continuing_subword_prefix')!r}"
            )
        return wordpiece_split(dict(source_state["vocab"]), source_tokenizer.unk_token_id,
                               source_state.get("continuing_subword_prefix") or "##",
                               int(source_state.get("max_input_chars_per_word") or 100))
    model = source_tokenizer.backend_tokenizer.model

    def split(token: str) -> list[int]:
        return [t.id for t in model.tokenize(token)]

    return split


def piece_means(
    source_tokenizer: Any, target_tokenizer: Any, token_ids: np.ndarray, source_coordinates: np.ndarray,
    where: str = "target tokenizer",
) -> PieceMeans:
    """Mean F_s row of the source pieces of each target token in `token_ids` (the tokens without a copy)."""
    split = piece_splitter(source_tokenizer, target_tokenizer, where)
    unk = source_tokenizer.unk_token_id
    strings = target_tokenizer.convert_ids_to_tokens([int(t) for t in token_ids])
    kept, groups, without = [], [], 0
    for token_id, text in zip(token_ids, strings):
        pieces = split(text) if text else []
        if not pieces or (unk is not None and unk in pieces):
            without += 1
            continue
        kept.append(int(token_id))
        groups.append(pieces)
    rows = np.empty((len(kept), source_coordinates.shape[1]), dtype=np.float32)
    for i, pieces in enumerate(groups):
        rows[i] = np.asarray(source_coordinates[np.asarray(pieces, dtype=np.int64)], dtype=np.float64).mean(0)
    return PieceMeans(np.asarray(kept, dtype=np.int64), rows, sum(len(g) for g in groups), without)
