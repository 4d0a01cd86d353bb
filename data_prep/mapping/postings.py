"""Token -> word postings, as CSR arrays, built by Ray tasks over chunks of words.

The method (docs/METHOD.md §1.5; HyperOFA's `get_subword_to_word_mappings` in `hyperofa/utils.py`, OFA's in
`ofa/utils.py`): for word i it tokenizes three spellings, (a) `word`, (b) `' ' + word`, (c) the capitalised form
(`word[1].upper() + word[2:]` when the key began with a `$` boundary, else `' ' + word[0].upper() + word[1:]`),
and appends i to the list of every token of each spelling. Here a list holds each word once, sorted, with the
number of its spellings that yield the token beside it (`spellings`, 1-3): HyperOFA's de-duplicated list and OFA's
list with repeats are both exactly recoverable from it.

The reference makes one `tokenizer.encode` call per variant. Here a chunk's variants are de-duplicated (and,
for pipelines that provably drop leading spaces, `' ' + w` shares `w`'s encoding) and tokenized by the Rust
tokenizer in one joined call that still tokenizes each variant on its own (`joined_encoding`), and the
(token, word) pairs are grouped with numpy: the chunk comes back as per-token counts, a flat int32 array of
word indices and their uint8 spelling counts, never as Python lists.
The driver merges chunks in two passes (sum the counts, then scatter each chunk's arrays), so it holds only the
final CSR arrays and one chunk at a time.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable, Sequence

import numpy as np

from hyperofa_dist.errors import HyperofaError
from hyperofa_dist.formats.mapping import Postings
from hyperofa_dist.formats.tokenizer import backend_json, worker_backend
from hyperofa_dist.formats.vectors import parse_key
from hyperofa_dist.runtime.ray import run_tasks

from .joined_encoding import JoinedEncoder

log = logging.getLogger("hyperofa.postings")

PERCENTILES = (0, 25, 50, 75, 90, 95, 99, 100)
# texts -> (token ids, index of the text each token came from), flat int64 arrays grouped by text in order.
EncodeBatch = Callable[[list[str]], tuple[np.ndarray, np.ndarray]]


# --- the pure core -------------------------------------------------------------------------------------------


def spelling_variants(word: str, starts_at_boundary: bool) -> tuple[str, str, str]:
    """The method's three spellings of a parsed word (`$` already turned into spaces)."""
    if starts_at_boundary:
        capitalised = word[1].upper() + word[2:]
    else:
        capitalised = " " + word[0].upper() + word[1:]
    return word, " " + word, capitalised


def key_variants(keys: Sequence[str]) -> list[str]:
    """3 spellings per key, in key order (keys must parse: callers pass the kept keys of a WordVectors)."""
    out: list[str] = []
    for key in keys:
        parsed = parse_key(key)
        if parsed is None:
            raise ValueError(f"key {key!r} is in an unexpected format")
        out.extend(spelling_variants(parsed[1], parsed[2]))
    return out


def chunk_postings(
    encode_batch: EncodeBatch, keys: Sequence[str], first_word: int, vocab_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Postings of words first_word .. first_word+len(keys)-1: (counts int32[vocab_size], word indices int32,
    spellings uint8).

    The indices are grouped by token (ascending), sorted and unique within each token; `spellings[i]` is how many
    of word indices[i]'s three spellings yield the token (1-3): the weight OFA gives the word in the token's mean
    (docs/METHOD.md §2), where the reference appends the word once per such spelling.
    """
    variants = key_variants(keys)
    unique, variant_slot, flat, owner = _encode_spellings(encode_batch, variants)
    lengths = np.bincount(owner, minlength=len(unique)).astype(np.int64)
    offsets = np.zeros(len(unique) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if flat.size and (flat.min() < 0 or flat.max() >= vocab_size):
        raise HyperofaError(f"tokenizer produced id {int(flat.max())} outside its vocabulary of {vocab_size}")
    # Expand every variant to its tokens: (token, local word) pairs, then group by token with one unique().
    per_variant = lengths[variant_slot]
    total = int(per_variant.sum())
    starts = np.repeat(offsets[variant_slot], per_variant)
    within = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(per_variant) - per_variant, per_variant)
    tokens = flat[starts + within]
    # A token appearing twice in one spelling's encoding counts once for it (the reference takes a set per spelling).
    n_variants = max(len(variants), 1)
    token_variant = np.unique(tokens * n_variants + np.repeat(np.arange(len(variants), dtype=np.int64), per_variant))
    n_words = max(len(keys), 1)
    pairs, spellings = np.unique(
        (token_variant // n_variants) * n_words + (token_variant % n_variants) // 3, return_counts=True
    )
    counts = np.bincount(pairs // n_words, minlength=vocab_size).astype(np.int32)
    indices = (pairs % n_words + first_word).astype(np.int32)
    return counts, indices, spellings.astype(np.uint8)


def _encode_spellings(encode_batch: EncodeBatch, variants: list[str]):
    """Each distinct spelling encoded once: (unique spellings, slot of each variant, flat ids, owner).

    Where the encoder says leading spaces change nothing (`strips_leading_spaces`), `w`, `' ' + w` and `' ' + W`
    share the encodings of `w` and `W`. If the encoder withdraws that during the call, the chunk is encoded again
    with every spelling as written.
    """
    while True:
        strip = getattr(encode_batch, "strips_leading_spaces", False)
        unique: dict[str, int] = {}
        spelled = (v.lstrip(" ") for v in variants) if strip else variants
        slots = np.fromiter((unique.setdefault(v, len(unique)) for v in spelled), dtype=np.int64, count=len(variants))
        flat, owner = encode_batch(list(unique))
        if not strip or encode_batch.strips_leading_spaces:
            return unique, slots, flat, owner


def merge_chunks(
    vocab_size: int,
    chunks: Iterable[Callable[[], np.ndarray]],
    fetch: Callable[[int], tuple[np.ndarray, np.ndarray, np.ndarray]],
    n_chunks: int,
) -> Postings:
    """CSR postings from chunks in word order, holding one chunk at a time.

    `chunks` yields, per chunk, a callable returning its counts (first pass); `fetch(i)` returns chunk i's
    (counts, indices, spellings) in the second pass. Chunks cover ascending word ranges, so appending each chunk's
    segment per token keeps every list sorted.
    """
    totals = np.zeros(vocab_size, dtype=np.int64)
    for get_counts in chunks:
        totals += get_counts()
    indptr = np.zeros(vocab_size + 1, dtype=np.int64)
    np.cumsum(totals, out=indptr[1:])
    indices = np.empty(int(indptr[-1]), dtype=np.int32)
    spellings = np.empty(int(indptr[-1]), dtype=np.uint8)
    cursor = indptr[:-1].copy()
    for i in range(n_chunks):
        counts, chunk_indices, chunk_spellings = fetch(i)
        counts = counts.astype(np.int64)
        chunk_starts = np.cumsum(counts) - counts
        dest = np.repeat(cursor - chunk_starts, counts) + np.arange(chunk_indices.size, dtype=np.int64)
        indices[dest] = chunk_indices
        spellings[dest] = chunk_spellings
        cursor += counts
    return Postings(indptr, indices, spellings)


def build_local(encode_batch: EncodeBatch, keys: Sequence[str], vocab_size: int, words_per_task: int) -> Postings:
    """The same postings in this process, chunk by chunk (tests, and small vocabularies without Ray)."""
    results = [
        chunk_postings(encode_batch, keys[start : start + words_per_task], start, vocab_size)
        for start in range(0, len(keys), words_per_task)
    ]
    return merge_chunks(vocab_size, (lambda r=r: r[0] for r in results), lambda i: results[i], len(results))


def reference_postings(tokenizer, keys: Sequence[str]) -> dict[int, list[int]]:
    """The method's algorithm as written: one `tokenizer.encode` per spelling, the word appended once per spelling
    that yields the token (OFA's lists, with their repeats, in word order).

    The baseline of `hyperofa bench mapping` and the brute-force oracle of the tests.
    """
    lists: dict[int, list[int]] = {}
    for index, key in enumerate(keys):
        parsed = parse_key(key)
        for variant in spelling_variants(parsed[1], parsed[2]):
            for token in set(tokenizer.encode(variant, add_special_tokens=False)):
                lists.setdefault(token, []).append(index)
    return {token: sorted(words) for token, words in lists.items()}


def csr_equals_lists(postings: Postings, lists: dict[int, list[int]]) -> bool:
    """The CSR postings hold exactly these lists: each word once, with its repeats as its spelling count.

    Linear in the postings (one sort per list): a token of a large vocabulary can list most of the words.
    """
    unique = {}
    for token, words in lists.items():
        if not 0 <= token < postings.vocab_size:
            return False
        unique[token] = np.unique(np.asarray(words, dtype=np.int64), return_counts=True)
    if int(postings.indptr[-1]) != sum(int(w.size) for w, _ in unique.values()):
        return False
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    for token in range(postings.vocab_size):
        got = postings.words(token)
        want, counts = unique.get(token, empty)
        if got.size != want.size or not np.array_equal(got, want):
            return False
        if got.size and not np.array_equal(postings.spelling_counts(token), counts):
            return False
    return True


def coverage_stats(postings: Postings, lang_ids: np.ndarray, languages: list[str], specials: Iterable[int] = ()) -> dict:
    """Covered tokens, list-length percentiles over covered tokens, per word language (words, postings, tokens),
    and how the OFA weights spread (postings by spelling count)."""
    indptr, indices = postings.indptr, postings.indices
    lengths = np.diff(indptr)
    covered = lengths > 0
    vocab = int(lengths.size)
    specials = sorted(int(s) for s in specials if 0 <= int(s) < vocab)
    stats = {
        "tokens": vocab,
        "covered": int(covered.sum()),
        "not_covered": int(vocab - covered.sum()),
        "coverage": float(covered.mean()) if vocab else 0.0,
        "covered_special": int(covered[specials].sum()) if specials else 0,
        "postings": int(indptr[-1]),
        "length_percentiles": {
            str(p): (float(np.percentile(lengths[covered], p)) if covered.any() else 0.0) for p in PERCENTILES
        },
        "postings_by_spellings": {str(m): int(np.sum(postings.spellings == m)) for m in (1, 2, 3)},
    }
    token_of = np.repeat(np.arange(vocab, dtype=np.int64), lengths)
    lang_of = lang_ids[indices].astype(np.int64)
    per_lang_postings = np.bincount(lang_of, minlength=len(languages))
    per_lang_tokens = np.bincount(np.unique(lang_of * vocab + token_of) // vocab, minlength=len(languages))
    per_lang_words = np.bincount(lang_ids, minlength=len(languages))
    stats["per_language"] = {
        lang: {"words": int(per_lang_words[i]), "postings": int(per_lang_postings[i]), "tokens": int(per_lang_tokens[i])}
        for i, lang in enumerate(languages)
    }
    return stats


# --- the Ray shell -------------------------------------------------------------------------------------------

_ENCODERS: dict[int, JoinedEncoder] = {}


def backend_encoder(tokenizer_json: str) -> EncodeBatch:
    """A batched encoder for a serialized tokenizer, cached per worker process (workers are reused)."""
    key = hash(tokenizer_json)
    if key not in _ENCODERS:
        if len(_ENCODERS) >= 4:  # a build alternates between its two tokenizers; keep those, not older ones
            _ENCODERS.clear()
        _ENCODERS[key] = JoinedEncoder(worker_backend(tokenizer_json))
    return _ENCODERS[key]


def _postings_task(blob: bytes, first_word: int, vocab_sizes: list[int], *tokenizer_jsons: str):
    keys = blob.decode("utf-8").split("\n")
    out: list[np.ndarray] = []
    for tokenizer_json, size in zip(tokenizer_jsons, vocab_sizes):
        out.extend(chunk_postings(backend_encoder(tokenizer_json), keys, first_word, size))
    return (len(keys), *out)  # the word count first: small, fetched to learn that the task succeeded


def build_postings(tokenizers: Sequence, keys: Sequence[str], words_per_task: int, max_retries: int = 3) -> list[Postings]:
    """CSR postings of every tokenizer over the same words, one Ray task per chunk of words (Ray must be up).

    The driver merges the chunks' results one at a time from the object store, so it holds only the final CSR
    arrays and one chunk."""
    import ray

    sizes = [len(t) for t in tokenizers]
    json_refs = [ray.put(backend_json(t)) for t in tokenizers]
    starts = list(range(0, len(keys), words_per_task))
    calls = [("\n".join(keys[start : start + words_per_task]).encode("utf-8"), start, sizes, *json_refs) for start in starts]
    per = 3  # counts, indices, spellings per tokenizer
    refs = run_tasks(
        _postings_task, calls, desc="postings", retries_key="mapping.max_retries", max_retries=max_retries,
        num_returns=1 + per * len(tokenizers), fetch=False,
        weights=[min(words_per_task, len(keys) - s) for s in starts], unit="word",
    )
    out = []
    for j in range(len(tokenizers)):
        first = 1 + per * j
        chunk_refs = [r[first : first + per] for r in refs]
        out.append(
            merge_chunks(
                sizes[j],
                (lambda ref=parts[0]: ray.get(ref) for parts in chunk_refs),
                lambda i: tuple(ray.get(chunk_refs[i])),
                len(refs),
            )
        )
        for r in refs:  # free this tokenizer's chunks before merging the next one
            r[first : first + per] = [None] * per
        chunk_refs.clear()
    return out
