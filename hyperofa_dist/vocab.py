"""Tokenizer families, piece standardisation and the source/target vocabulary overlap ("copy" pairs).

The method (docs/METHOD.md §1.2, §1.3) standardises every piece to the text it stands for: SentencePiece `▁x` ->
` x`, WordPiece `##x` -> `x` and `x` -> ` x`, byte-level BPE through the byte decoder (`Ġx` -> ` x`). A target
token is copied from the source token with the same standardised string, else (fuzzy) from the one whose
lowercased string matches. Two defects of the reference are fixed here: a fuzzy match on source id 0 is kept
(the reference's truthiness test dropped it), and when several ids standardise to the same string (byte
fragments that all decode to U+FFFD) the lowest id represents it, deterministically, and the collisions are
counted. Every target id sharing a matched string is paired, not only the last one. Special tokens are paired by
role (cls/bos, sep/eos, pad, unk, mask), never by their spelling, so `[CLS]` pairs with `<s>`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

SENTENCEPIECE, WORDPIECE, BYTELEVEL = "sentencepiece", "wordpiece", "bytelevel"
SP_SPACE = "\u2581"
WP_PREFIX = "##"
# Each target role, then the source roles that may stand in for it (a BERT source has cls but no bos).
ROLES = (("cls", "bos"), ("bos", "cls"), ("sep", "eos"), ("eos", "sep"), ("pad",), ("unk",), ("mask",))
KIND_SPECIAL, KIND_EXACT, KIND_FUZZY = 0, 1, 2


def _component_types(node: Any) -> set[str]:
    """Every `type` named in a (possibly nested Sequence) tokenizer.json component."""
    found: set[str] = set()
    if isinstance(node, dict):
        if isinstance(node.get("type"), str):
            found.add(node["type"])
        for value in node.values():
            found |= _component_types(value)
    elif isinstance(node, list):
        for value in node:
            found |= _component_types(value)
    return found


def detect_family(tokenizer) -> str:
    """sentencepiece, wordpiece or bytelevel: from the tokenizer's own pipeline, else the method's piece counts.

    The reference counts pieces starting with `▁` or `##` (> 100); small vocabularies fall under that bar, so
    the model, pre-tokenizer and decoder types decide first and the count is only the fallback.
    """
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    model_type = (state.get("model") or {}).get("type")
    pipeline = _component_types([state.get("pre_tokenizer"), state.get("decoder")])
    if model_type == "WordPiece":
        return WORDPIECE
    if "ByteLevel" in pipeline:
        return BYTELEVEL
    if "Metaspace" in pipeline:
        return SENTENCEPIECE
    pieces = list(tokenizer.get_vocab())
    bar = min(100, max(1, len(pieces) // 20))
    if sum(p.startswith(SP_SPACE) for p in pieces) > bar:
        return SENTENCEPIECE
    if sum(p.startswith(WP_PREFIX) for p in pieces) > bar:
        return WORDPIECE
    return BYTELEVEL


def special_ids(tokenizer) -> set[int]:
    ids = set(int(i) for i in tokenizer.all_special_ids if i is not None)
    for token_id, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False):
            ids.add(int(token_id))
    return ids


def standardised_pieces(tokenizer, family: Optional[str] = None) -> list[Optional[str]]:
    """The standardised string of every id 0..len-1; None for special tokens and ids without a piece."""
    family = family or detect_family(tokenizer)
    size = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(size)))
    specials = special_ids(tokenizer)
    added = {int(i): t for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    decoder = None
    if family == BYTELEVEL:
        from tokenizers import decoders

        decoder = decoders.ByteLevel()
    out: list[Optional[str]] = []
    for token_id, piece in enumerate(pieces):
        if token_id in specials or piece is None:
            out.append(None)
        elif token_id in added:
            # Added tokens are stored as plain text, not in the model's piece alphabet.
            content = added[token_id].content
            out.append(content.replace(SP_SPACE, " ") if family == SENTENCEPIECE else content)
        elif family == SENTENCEPIECE:
            out.append(piece.replace(SP_SPACE, " "))
        elif family == WORDPIECE:
            out.append(piece[len(WP_PREFIX) :] if piece.startswith(WP_PREFIX) else " " + piece)
        else:
            out.append(decoder.decode([piece]))
    return out


def _lookup(strings: list[Optional[str]]) -> tuple[dict[str, int], dict[str, list[int]]]:
    """{string: lowest id} and {string: all ids} for strings held by more than one id."""
    first: dict[str, int] = {}
    shared: dict[str, list[int]] = {}
    for token_id, text in enumerate(strings):
        if text is None:
            continue
        if text in first:
            shared.setdefault(text, [first[text]]).append(token_id)
        else:
            first[text] = token_id
    return first, shared


def role_ids(tokenizer) -> dict[str, Optional[int]]:
    return {role: getattr(tokenizer, f"{role}_token_id", None) for role in ("cls", "bos", "sep", "eos", "pad", "unk", "mask")}


@dataclass
class Overlap:
    """Copy pairs sorted by target id; `kinds` says how each pair was found (special role, exact, fuzzy)."""

    target_ids: np.ndarray
    source_ids: np.ndarray
    kinds: np.ndarray
    stats: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.target_ids.shape[0])


def special_pairs(target_tok, source_tok) -> dict[int, int]:
    """target id -> source id for special tokens: by role, then (roleless extras) by identical content."""
    target_roles, source_roles = role_ids(target_tok), role_ids(source_tok)
    pairs: dict[int, int] = {}
    for target_role, *fallbacks in ROLES:
        t_id = target_roles[target_role]
        if t_id is None or t_id in pairs:
            continue
        for role in (target_role, *fallbacks):
            if source_roles[role] is not None:
                pairs[int(t_id)] = int(source_roles[role])
                break
    source_by_text = {}
    for s_id in sorted(special_ids(source_tok), reverse=True):
        source_by_text[source_tok.convert_ids_to_tokens(s_id)] = s_id
    for t_id in sorted(special_ids(target_tok)):
        if t_id not in pairs:
            text = target_tok.convert_ids_to_tokens(t_id)
            if text in source_by_text:
                pairs[t_id] = source_by_text[text]
    return pairs


def compute_overlap(target_tok, source_tok, fuzzy: bool = True) -> Overlap:
    """Pairs (target id, source id) whose tokens stand for the same text: special by role, exact, then fuzzy."""
    target_family, source_family = detect_family(target_tok), detect_family(source_tok)
    target_strings = standardised_pieces(target_tok, target_family)
    source_strings = standardised_pieces(source_tok, source_family)
    source_first, source_shared = _lookup(source_strings)
    _, target_shared = _lookup(target_strings)

    pairs: dict[int, tuple[int, int]] = {t: (s, KIND_SPECIAL) for t, s in special_pairs(target_tok, source_tok).items()}
    # A string several source ids share goes to the one with the target's very piece when there is one
    # (same family), else to the lowest id.
    same_piece: dict[str, int] = {}
    if source_shared and source_family == target_family:
        same_piece = {source_tok.convert_ids_to_tokens(i): i for ids in source_shared.values() for i in ids}
    for t_id, text in enumerate(target_strings):
        if text is not None and text in source_first:
            s_id = source_first[text]
            if text in source_shared:
                s_id = same_piece.get(target_tok.convert_ids_to_tokens(t_id), s_id)
            pairs[t_id] = (s_id, KIND_EXACT)
    if fuzzy:
        # As the reference: lowercase keys built in lexicographic order of the source strings, last one wins.
        lowered: dict[str, int] = {}
        for text in sorted(source_first):
            lowered[text.lower()] = source_first[text]
        for t_id, text in enumerate(target_strings):
            if text is not None and t_id not in pairs:
                s_id = lowered.get(text.lower())
                if s_id is not None:  # the reference's `if L.get(...)` lost source id 0 here
                    pairs[t_id] = (s_id, KIND_FUZZY)
    order = sorted(pairs)
    target_ids = np.asarray(order, dtype=np.int64)
    source_ids = np.asarray([pairs[t][0] for t in order], dtype=np.int64)
    kinds = np.asarray([pairs[t][1] for t in order], dtype=np.int8)
    stats = {
        "source_family": source_family,
        "target_family": target_family,
        "pairs": int(len(order)),
        "special": int(np.sum(kinds == KIND_SPECIAL)),
        "exact": int(np.sum(kinds == KIND_EXACT)),
        "fuzzy": int(np.sum(kinds == KIND_FUZZY)),
        "source_collisions": {
            "strings": len(source_shared),
            "ids_shadowed": sum(len(v) - 1 for v in source_shared.values()),
            "examples": [repr(k) for k in sorted(source_shared)[:5]],
        },
        "target_collisions": {
            "strings": len(target_shared),
            "ids_sharing": sum(len(v) for v in target_shared.values()),
            "examples": [repr(k) for k in sorted(target_shared)[:5]],
        },
    }
    return Overlap(target_ids, source_ids, kinds, stats)


def same_vocabulary(a, b) -> bool:
    """Two tokenizers with the same pieces at the same ids: expanding one into the other adds nothing."""
    return len(a) == len(b) and a.get_vocab() == b.get_vocab()
