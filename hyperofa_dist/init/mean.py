"""The "mean of source pieces" baseline (FOCUS's heuristic, and what vocabulary-expansion studies of LLMs call the
subword-mean init; docs/METHOD.md §6): a new token's row is the mean of the rows of the source tokens its own
string splits into.

The split is the source tokenizer's *model* applied to the token's vocabulary string, with no normalizer,
pre-tokenizer or post-processor: that string is already in the model's alphabet (byte-level characters, `▁`, plain
characters), so its pieces concatenate back to it. Decoding the token and encoding the text instead goes wrong in
two ways: a byte-level token holding part of a UTF-8 character decodes to U+FFFD, and a SentencePiece-style decode
drops the `▁` that encoding then adds back in front of pieces that never had one. With byte fallback a character
the source lacks splits into its byte tokens, so it gets the mean of their rows (weak, but defined).

The mean is taken over rows of F_s, so F_t P is the mean of the pieces' rows of F_s P: the same embedding whether
the model is used factorised or full rank. A token whose split holds the source's unknown token has no mean and
stays random. A WordPiece source (BERT) is refused: its `##` continuation pieces are not strings its model can
split.
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


def _model_type(tokenizer: Any) -> str:
    return json.loads(tokenizer.backend_tokenizer.to_str())["model"]["type"]


def piece_splitter(source_tokenizer: Any, target_tokenizer: Any, where: str = "target tokenizer") -> Any:
    """`token string -> source ids` by the source tokenizer's model; refused (one line) when the target's strings are
    not in the source model's alphabet or the source is WordPiece."""
    from ..vocab import detect_family

    source_type, target_type = _model_type(source_tokenizer), _model_type(target_tokenizer)
    if source_type == "WordPiece":
        raise HyperofaError(
            "init.method=mean splits each new token's string with the source tokenizer's model; a WordPiece source "
            "(BERT) cannot split its ## continuation pieces: use hyperofa, ofa or random"
        )
    source_family, target_family = detect_family(source_tokenizer), detect_family(target_tokenizer)
    if source_type != target_type or source_family != target_family:
        raise HyperofaError(
            f"{where}: init.method=mean needs a target tokenizer of the source's kind (tokenizer.mode=extend); the "
            f"source is {source_type}/{source_family}, the target {target_type}/{target_family}"
        )
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
