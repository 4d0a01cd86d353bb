"""Many short strings through a Rust tokenizer in one call, each tokenized exactly as if it were encoded alone.

A call per string (`encode`, or one element of `encode_batch_fast`) pays a fixed cost per input, an Encoding
object with its own vectors and its Python conversion, that is as large as tokenizing a word. Here the strings
of a chunk go in as ONE pre-tokenized sequence (`is_pretokenized=True`): the Rust tokenizer runs added-token
extraction, the normalizer, the pre-tokenizer and the model on each element as its own sub-sequence
(`encode_single_sequence`), then concatenates the results and tags every token with its element's index
(`word_ids`). No separator has to survive a normalizer (NFKC, lowercasing, whitespace collapsing) or a
pre-tokenizer (Metaspace, byte-level, BERT), and no neighbour can change a string's tokens, whatever the family;
the leading-space variants and the inner spaces of ColexNet+ `$` words stay inside their own element.

That is what the library does today. So that a future library change cannot silently change the postings, every
tokenizer is checked once on probe strings chosen to break a wrong split, and every call on a spread sample of
its own strings, against one-string-per-input encoding; on any difference the tokenizer falls back to that
encoding for good (slower, same result) with a warning.

Leading spaces: where the pipeline provably drops them before anything else sees the text (an allow-list of
normalizers that keep a leading space a separate character, and a pre-tokenizer that starts by removing
whitespace, followed only by parts that look at a piece's text, not its offset), `' ' + s` encodes exactly like
`s`, so a word's spellings with and without leading spaces need one encoding (`strips_leading_spaces`). That is
checked the same way, on the probes with a leading space and on each call's sample; on a difference it is
withdrawn for good and the caller encodes every spelling as written.
"""

from __future__ import annotations

import json
import logging
from typing import Callable

import numpy as np

log = logging.getLogger("hyperofa.joined_encoding")

# Flat token ids and, per token, the index of the string it came from (both int64, grouped by string in order).
FlatEncoding = tuple[np.ndarray, np.ndarray]
BulkEncode = Callable[[object, list[str]], FlatEncoding]

STRINGS_PER_SEQUENCE = 4096  # keeps each Encoding (and its offsets) small; the call count stays negligible
SAMPLE_PER_CALL = 64

# Spellings that a tokenizer treating its input as one text would split or normalise differently from one word
# alone: leading, doubled, inner and trailing spaces (variants (b)/(c), `$` boundaries), characters NFKC or
# lowercasing expand to several (ﬁ, ①, İ, ß, ǅ), combining marks after a space, Greek final sigma, CJK that
# BERT pads with spaces, characters no vocabulary holds, tabs, and added-token text.
PROBES = (
    "haus", " haus", " Haus", "  haus", " ndöhi ", "  ndöhi ", "Ndöhi ", " αβ γδ ", "Αβ γδ ", "a b c",
    "ﬁsh", " ﬁsh", "①②", " Ⅻ", "İstanbul", " İSTANBUL", "straße", " STRASSE", "ǅemal", "Å", "e\u0301", " \u0301e",
    "ΟΔΟΣ", " οδος", "ς", "漢字", " 漢 字 ", "☃", " ☃x", "𝔘𝔫", "\u200bzw", "a\tb", "x\u00a0y", "<s>", " <mask>x",
    "[UNK]", "[MASK] a", "'s", " 's", "l'eau", "12,5", " --", "ﬀ", "ＡＢＣ", "…", "ǆ",
)


# Normalizers that map ' ' + s to ' ' + (s normalised): per-character maps, and Unicode normalisation (a space is
# a starter that composes with nothing). Replace, Prepend, Strip and Precompiled can move or create spaces.
_SPACE_KEEPING_NORMALIZERS = {"BertNormalizer", "Lowercase", "NFC", "NFD", "NFKC", "NFKD", "StripAccents"}
# Pre-tokenizers whose first act removes whitespace, so ' ' + s yields the pieces of s (at other offsets).
_WHITESPACE_DROPPING = {"WhitespaceSplit", "Whitespace", "BertPreTokenizer"}
# Later parts that depend on a piece's text only. Metaspace's prepend_scheme "first" depends on the piece's
# offset (it prepends only at offset 0), which a leading space changes.
_TEXT_ONLY = _WHITESPACE_DROPPING | {"Punctuation", "Digits", "UnicodeScripts"}


def _parts(spec: dict | None, key: str) -> list[dict]:
    if spec is None:
        return []
    return [p for inner in spec[key] for p in _parts(inner, key)] if spec.get("type") == "Sequence" else [spec]


def drops_leading_spaces(tok) -> bool:
    """True when the pipeline encodes `' ' + s` exactly like `s` for every s, read from its parts (allow-list)."""
    spec = json.loads(tok.to_str())
    if any(t["content"][:1].isspace() for t in spec.get("added_tokens") or []):
        return False  # ' ' + s could match an added token that s cannot
    if any(n.get("type") not in _SPACE_KEEPING_NORMALIZERS for n in _parts(spec.get("normalizer"), "normalizers")):
        return False
    pre = _parts(spec.get("pre_tokenizer"), "pretokenizers")
    if not pre or pre[0].get("type") not in _WHITESPACE_DROPPING:
        return False
    return all(
        p.get("type") in _TEXT_ONLY or (p.get("type") == "Metaspace" and p.get("prepend_scheme") in ("always", "never"))
        for p in pre[1:]
    )


def _same(a: FlatEncoding, b: FlatEncoding) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b))


def per_string(tok, texts: list[str]) -> FlatEncoding:
    """One input per string: the definition the bulk path must reproduce."""
    encoded = [e.ids for e in tok.encode_batch_fast(texts, add_special_tokens=False)]
    lengths = np.fromiter((len(ids) for ids in encoded), dtype=np.int64, count=len(encoded))
    ids = np.fromiter((t for row in encoded for t in row), dtype=np.int64, count=int(lengths.sum()))
    return ids, np.repeat(np.arange(len(texts), dtype=np.int64), lengths)


def one_sequence(tok, texts: list[str]) -> FlatEncoding:
    """All strings as pre-tokenized sequences of up to STRINGS_PER_SEQUENCE elements, in one batch call."""
    starts = range(0, len(texts), STRINGS_PER_SEQUENCE)
    encodings = tok.encode_batch([texts[s : s + STRINGS_PER_SEQUENCE] for s in starts], is_pretokenized=True, add_special_tokens=False)
    ids = [np.asarray(e.ids, dtype=np.int64) for e in encodings]
    owners = [np.asarray(e.word_ids, dtype=np.int64) + s for e, s in zip(encodings, starts)]
    if not ids:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(ids), np.concatenate(owners)


class JoinedEncoder:
    """`texts -> (ids, owner)` for one Rust tokenizer: the bulk path while it agrees with per-string encoding.

    The tokenizer must have truncation and padding off (a length limit would cut the joined sequence).
    """

    def __init__(self, tok, bulk: BulkEncode = one_sequence, sample: int = SAMPLE_PER_CALL):
        if tok.truncation is not None or tok.padding is not None:
            raise ValueError("joined encoding needs a tokenizer without truncation and padding")
        self.tok, self.bulk, self.sample = tok, bulk, sample
        got, want = bulk(tok, list(PROBES)), per_string(tok, list(PROBES))
        self.joined = _same(got, want)
        if not self.joined:
            log.warning("joined tokenizer calls differ from one call per string on probe strings; encoding strings one by one")
        self.strips_leading_spaces = drops_leading_spaces(tok)
        if self.strips_leading_spaces and not _same(per_string(tok, [" " + p for p in PROBES]), want):
            log.warning("a leading space changes the tokens of probe strings; encoding every spelling as written")
            self.strips_leading_spaces = False

    def __call__(self, texts: list[str]) -> FlatEncoding:
        """The tokens of each text as if encoded alone.

        While `strips_leading_spaces` holds, the sample is also encoded with a leading space; if that differs,
        the flag is cleared (for good) and the caller must encode its leading-space spellings as written.
        """
        if not texts:
            return per_string(self.tok, texts)
        picks = np.unique(np.linspace(0, len(texts) - 1, num=min(self.sample, len(texts))).astype(np.int64))
        ref_ids, ref_owner = alone = per_string(self.tok, [texts[i] for i in picks])
        if self.strips_leading_spaces and not _same(per_string(self.tok, [" " + texts[i] for i in picks]), alone):
            log.warning("a leading space changes the tokens on a sample of a chunk; encoding every spelling as written")
            self.strips_leading_spaces = False
        if not self.joined:
            return per_string(self.tok, texts)
        ids, owner = self.bulk(self.tok, texts)
        # The sample is compared where it sat in the joined call, so neighbours are checked too.
        sampled = np.isin(owner, picks)
        if np.array_equal(ids[sampled], ref_ids) and np.array_equal(owner[sampled], picks[ref_owner]):
            return ids, owner
        log.warning("joined tokenizer calls differ from one call per string on a sample of a chunk; encoding strings one by one")
        self.joined = False
        return per_string(self.tok, texts)
