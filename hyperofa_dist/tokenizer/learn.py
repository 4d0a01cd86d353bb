"""Learning a target tokenizer from a corpus sample: extend a source vocabulary, or train a fresh one.

Pure functions over `tokenizers.Tokenizer` objects and lists of sentences (no files, no config, no MLflow), so
they are unit-testable in milliseconds. `tokenizer_build` is the stage shell around them.

`extend` is the Glot500 recipe (XLM-R 250k -> 401k): every source token keeps its string and id, special tokens
keep their ids and roles, and the N most useful new pieces learned on the corpus are appended after the whole
source vocabulary (added tokens included, so XLM-R's `<mask>` keeps its id and the new pieces come after it;
Glot500 itself moved `<mask>` to the end, which would change a source id). Per model family:

- Unigram (SentencePiece-style, XLM-R): a `UnigramTrainer` learns pieces with the source's normalizer and
  pre-tokenizer; new characters are taken first (without them the new scripts stay `<unk>`), then the other new
  pieces by learned score; they are appended by score with their learned scores, as Glot500 merged its models.
- BPE (byte-level: RoBERTa, Llama 3, Qwen2; SentencePiece-style with byte fallback: Llama 2, Mistral): BPE
  training is *continued* from the source segmentation. Each corpus word is cut into source tokens by the source
  model, every source token becomes one private-use character, and a `BpeTrainer` learns merges over those
  characters. Decoded back, each merge joins two existing tokens (source or earlier new ones) and is appended
  after the source merges in learned order. Because all new merges rank after all source merges, the target
  segments every word exactly as the source does and then merges further: every new token is reachable (it was
  formed on the corpus), and no word ever gets more pieces than with the source. Special tokens kept after the
  BPE vocabulary (Llama 3's 256) keep their ids; new ids start after the last of them. With byte fallback, a
  character the source lacks arrives as its UTF-8 byte tokens: those runs become characters again, and frequent
  new characters are appended first (a merge of byte tokens would be a piece named `<0xE1><0x88>`); a
  SentencePiece-style source sees whole lines, so the learner's words are cut before every `▁` (no new piece
  spans two words).
- WordPiece (BERT): a `WordPieceTrainer` learns pieces with the source normalizer/pre-tokenizer and prefix; the
  new ones (word-initial and `##` continuation) are appended in learned order, new characters first.

`train` builds a fresh Unigram or BPE tokenizer whose special tokens are the source's (same strings, roles and
flags), placed first in the order of their source ids (so XLM-R's `<mask>` moves from last to id 4).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ..errors import HyperofaError

MODEL_FAMILIES = {"Unigram": "unigram", "BPE": "bpe", "WordPiece": "wordpiece"}
# Rounds of re-training with a larger learned vocabulary when too many learned pieces already exist in the source.
MAX_ROUNDS = 4


@dataclass
class Extension:
    """The extended tokenizer and what was appended; `shortfall` says why fewer than requested, if so."""

    tokenizer: Tokenizer
    new_pieces: list[str]
    new_merges: int = 0
    learned_vocab_size: int = 0
    shortfall: Optional[str] = None
    rounds: int = 1


@dataclass
class _Source:
    """What every learner needs to know about the source tokenizer, read once from its JSON."""

    tokenizer: Tokenizer
    data: dict[str, Any]
    family: str
    vocab: list[str]  # token string by id, added tokens included
    added: list[dict[str, Any]] = field(default_factory=list)

    @property
    def strings(self) -> set[str]:
        return set(self.vocab)


def model_family(tokenizer: Tokenizer) -> str:
    kind = json.loads(tokenizer.to_str())["model"].get("type")
    if kind not in MODEL_FAMILIES:
        raise HyperofaError(f"source tokenizer model {kind!r} is not supported (Unigram, BPE or WordPiece)")
    return MODEL_FAMILIES[kind]


def _inspect(tokenizer: Tokenizer) -> _Source:
    data = json.loads(tokenizer.to_str())
    # A published tokenizer.json may fix a truncation length and padding (for its model's own fine-tuning); a
    # target built from it must not inherit them: every stage tokenizes whole sentences.
    data["truncation"] = data["padding"] = None
    family = model_family(tokenizer)
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    by_id: dict[int, str] = {i: t for t, i in tokenizer.get_vocab(with_added_tokens=True).items()}
    if sorted(by_id) != list(range(size)):
        raise HyperofaError(
            f"source tokenizer ids are not contiguous 0..{size - 1}; extending it would move source ids"
        )
    return _Source(tokenizer, data, family, [by_id[i] for i in range(size)], list(data.get("added_tokens") or []))


def _materialize_added(src: _Source) -> dict[str, Any]:
    """The source model JSON with every added token that lies beyond the model's own vocabulary written into it.

    XLM-R-style tokenizers may keep `<mask>` only as an added token at id len(model vocab); a piece appended to
    the model would then collide with it. Written into the model at its own id, it keeps that id and new pieces
    start after it.
    """
    model = json.loads(json.dumps(src.data["model"]))
    in_model = len(model["vocab"])
    beyond = sorted((t for t in src.added if t["id"] >= in_model), key=lambda t: t["id"])
    for expected, token in enumerate(beyond, start=in_model):
        if token["id"] != expected:
            raise HyperofaError(f"source added token {token['content']!r} has id {token['id']}, expected {expected}")
        if src.family == "unigram":
            model["vocab"].append([token["content"], 0.0])
        else:
            model["vocab"][token["content"]] = token["id"]
    return model


def _learner(src: _Source, model: Any) -> Tokenizer:
    """A tokenizer around a blank model that sees text exactly as the source does."""
    learner = Tokenizer(model)
    if src.tokenizer.normalizer is not None:
        learner.normalizer = src.tokenizer.normalizer
    if src.tokenizer.pre_tokenizer is not None:
        learner.pre_tokenizer = src.tokenizer.pre_tokenizer
    return learner


def _rebuild(src: _Source, model: dict[str, Any]) -> Tokenizer:
    data = dict(src.data)
    data["model"] = model
    return Tokenizer.from_str(json.dumps(data, ensure_ascii=False))


def _next_size(size: int, found: int, wanted: int) -> int:
    # The share of learned pieces that are new was found/size; ask for enough to cover the rest, with margin.
    missing = wanted - found
    rate = max(found / size, 0.05)
    return size + int(missing / rate * 1.2) + 16


def extend(
    source: Tokenizer,
    texts: Sequence[str],
    new_tokens: int,
    *,
    min_frequency: int = 2,
    show_progress: bool = False,
) -> Extension:
    """Append up to `new_tokens` pieces learned on `texts`; every source id keeps its token (see module doc).

    `texts` is iterated once per training round, so pass a list or another re-iterable.
    """
    if new_tokens < 1:
        raise ValueError("new_tokens must be >= 1")
    src = _inspect(source)
    learn = {"unigram": _extend_unigram, "bpe": _extend_bpe, "wordpiece": _extend_wordpiece}[src.family]
    size = new_tokens + max(64, new_tokens // 2)
    result: Optional[Extension] = None
    for round_ in range(1, MAX_ROUNDS + 1):
        result, exhausted = learn(src, texts, new_tokens, size, min_frequency, show_progress)
        result.rounds = round_
        found = len(result.new_pieces)
        if found >= new_tokens:
            break
        if exhausted:
            result.shortfall = (
                f"the corpus sample supplies only {found} new pieces (the trainer ran out of pieces at "
                f"{result.learned_vocab_size} learned entries; min_frequency {min_frequency})"
            )
            break
        size = _next_size(size, found, new_tokens)
    else:
        result.shortfall = (
            f"after {MAX_ROUNDS} rounds (learned vocabulary {result.learned_vocab_size}) only {len(result.new_pieces)} "
            "learned pieces were not already in the source vocabulary"
        )
    assert result is not None
    _check_extension(src, result.tokenizer)
    return result


def _check_extension(src: _Source, target: Tokenizer) -> None:
    """The contract of `extend`, checked on every result: a violation is a bug, never a user error."""
    vocab = target.get_vocab(with_added_tokens=True)
    moved = [t for i, t in enumerate(src.vocab) if vocab.get(t) != i]
    if moved:
        raise AssertionError(f"extend changed the id of source tokens {moved[:5]}")
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise AssertionError("extended tokenizer ids are not contiguous")


def _single_chars(pieces: Iterable[str], prefix: str = "") -> list[str]:
    out = []
    for p in pieces:
        body = p[len(prefix) :] if prefix and p.startswith(prefix) else p
        if len(body) == 1:
            out.append(p)
    return out


def _score(value: float) -> float:
    # The Unigram trainer sums floats in hash-map order: the last bits differ between runs. Rounded, they do not.
    return round(float(value), 6)


def canonical_unigram(pieces: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """Learned Unigram pieces with scores rounded and the trainer's arbitrary order of rare characters fixed.

    Characters the EM pruned but the vocabulary must keep are appended by the trainer with made-up scores
    (the minimum score plus steps of 1e-4) in hash-set order, so which character gets which score changes
    from run to run. That bottom run of single characters gets the same scores, handed out in string order, and
    the result is sorted by score, then string. Special tokens must not be passed in: they keep their own ids.
    """
    pieces = [(p, _score(v)) for p, v in pieces]
    if not pieces:
        return pieces
    lowest = min(v for _, v in pieces)
    # The ladder's rungs are lowest + j * 1e-4 for j < n, n being the number of characters it holds; learned
    # multi-character pieces may score inside that band, so the band is widened until it holds all its rungs.
    width = 1.5e-4
    while True:
        run = [i for i, (p, v) in enumerate(pieces) if len(p) == 1 and v <= lowest + width]
        wanted = len(run) * 1e-4 + 0.5e-4
        if wanted <= width:
            break
        width = wanted
    if len(run) > 1:
        scores = sorted((pieces[i][1] for i in run), reverse=True)
        chars = sorted(pieces[i][0] for i in run)
        for i, char, score in zip(sorted(run), chars, scores):
            pieces[i] = (char, score)
    # Rounding makes ties, and tied pieces come out in the trainer's run-dependent order: order them by string.
    return sorted(pieces, key=lambda piece: (-piece[1], piece[0]))


def _extend_unigram(src, texts, wanted, size, min_frequency, show_progress) -> tuple[Extension, bool]:
    learner = _learner(src, models.Unigram())
    trainer = trainers.UnigramTrainer(vocab_size=size, special_tokens=[], show_progress=show_progress)
    learner.train_from_iterator(texts, trainer)
    learned = canonical_unigram([(p, s) for p, s in json.loads(learner.to_str())["model"]["vocab"]])
    known = src.strings
    candidates = [(p, s) for p, s in learned if p not in known]  # canonical order: score, then string
    chars = set(_single_chars(p for p, _ in candidates))
    # New characters first, whatever their score: a missing character makes its whole word <unk>.
    ranked = [c for c in candidates if c[0] in chars] + [c for c in candidates if c[0] not in chars]
    chosen = sorted(ranked[:wanted], key=lambda ps: (-ps[1], ps[0]))
    model = _materialize_added(src)
    model["vocab"] = model["vocab"] + [[p, s] for p, s in chosen]
    ext = Extension(_rebuild(src, model), [p for p, _ in chosen], learned_vocab_size=len(learned))
    return ext, len(learned) < size


def _extend_wordpiece(src, texts, wanted, size, min_frequency, show_progress) -> tuple[Extension, bool]:
    source_model = src.data["model"]
    prefix = source_model.get("continuing_subword_prefix") or "##"
    learner = _learner(src, models.WordPiece(unk_token=source_model.get("unk_token", "[UNK]")))
    trainer = trainers.WordPieceTrainer(
        vocab_size=size,
        # The trainer numbers continuation characters in hash-map order, so ties between merges would break
        # differently on every run; naming them up front (sorted) fixes their ids and makes training repeatable.
        special_tokens=_continuation_chars(src, texts, prefix),
        min_frequency=min_frequency,
        continuing_subword_prefix=prefix,
        show_progress=show_progress,
    )
    learner.train_from_iterator(texts, trainer)
    learned_vocab = json.loads(learner.to_str())["model"]["vocab"]
    learned = [p for p, _ in sorted(learned_vocab.items(), key=lambda kv: kv[1])]  # learned order
    known = src.strings
    candidates = [p for p in learned if p not in known]
    chars = set(_single_chars(candidates, prefix))
    chosen = ([p for p in candidates if p in chars] + [p for p in candidates if p not in chars])[:wanted]
    model = _materialize_added(src)
    base = len(model["vocab"])
    for offset, piece in enumerate(chosen):
        model["vocab"][piece] = base + offset
    ext = Extension(_rebuild(src, model), chosen, learned_vocab_size=len(learned))
    return ext, len(learned) < size


def _continuation_chars(src: _Source, texts: Iterable[str], prefix: str) -> list[str]:
    """`##c` for every character c that follows another one inside a pre-tokenized word of the sample.

    Normalizer and pre-tokenizer of WordPiece tokenizers act within whitespace-separated words, so running them
    once per distinct word gives the same characters as running them on every sentence, much faster.
    """
    distinct = {word for text in texts for word in text.split()}
    chars: set[str] = set()
    for words in _source_words(src, sorted(distinct)):
        for word in words:
            chars.update(word[1:])
    return sorted(prefix + c for c in chars)


# Private-use code points: one per source token, so a BpeTrainer can continue merging source tokens.
_PUA_RANGES = ((0xE000, 0xF8FF), (0xF0000, 0xFFFFD), (0x100000, 0x10FFFD))


def _pua(index: int) -> str:
    for low, high in _PUA_RANGES:
        span = high - low + 1
        if index < span:
            return chr(low + index)
        index -= span
    raise HyperofaError("the corpus sample uses more source tokens than there are private-use characters")


def sentencepiece_bpe(tokenizer: Tokenizer) -> bool:
    """A BPE model in SentencePiece form (Llama 2, Mistral): words are marked by "▁", not split by a pre-tokenizer,
    and an unknown character may fall back to its UTF-8 byte tokens."""
    data = json.loads(tokenizer.to_str())
    return data["model"].get("type") == "BPE" and _sentencepiece_form(data)


def _sentencepiece_form(data: dict[str, Any]) -> bool:
    return bool(data["model"].get("byte_fallback")) or bool(
        {"Metaspace", "Prepend"} & (_types(data.get("pre_tokenizer")) | _types(data.get("normalizer")))
    )


def _types(node: Any) -> set[str]:
    if isinstance(node, dict):
        own = {node["type"]} if isinstance(node.get("type"), str) else set()
        return own.union(*(_types(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_types(v) for v in node))
    return set()


def _is_byte_token(value: str) -> bool:
    """`<0xE1>`: one UTF-8 byte of a character a byte-fallback vocabulary lacks."""
    return len(value) == 6 and value.startswith("<0x") and value.endswith(">")


# Cuts a SentencePiece-style word run before every "▁" (training statistics only).
_SP_WORDS = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never", split=True)


def _source_words(src: _Source, texts: Iterable[str]) -> Iterable[list[str]]:
    """Each sentence as the source's pre-tokenized words (after its normalizer), as the BPE model sees them.

    A SentencePiece-style BPE sees a whole line (no pre-tokenizer, or Metaspace without splitting); its source
    merges never cross a "▁", and new ones must not either, so the words are cut before every "▁" here.
    """
    normalizer, pre = src.tokenizer.normalizer, src.tokenizer.pre_tokenizer
    cut = src.family == "bpe" and _sentencepiece_form(src.data)
    for text in texts:
        if normalizer is not None:
            text = normalizer.normalize_str(text)
        words = [w for w, _ in pre.pre_tokenize_str(text)] if pre is not None else text.split()
        if cut:
            words = [piece for w in words for piece, _ in _SP_WORDS.pre_tokenize_str(w)]
        yield words


def _extend_bpe(src, texts, wanted, size, min_frequency, show_progress) -> tuple[Extension, bool]:
    """Continued BPE (module doc). With byte fallback (Llama 2), a character the source vocabulary lacks reaches the
    model as its byte tokens; a merge of byte tokens would make a piece named `<0xE1><0x88>` that decodes as that
    text, so each run of byte tokens is turned back into its characters, which become new single-character
    entries (frequent ones first, no merge needed) that learned merges then build on."""
    source_model = src.data["model"]
    prefix = source_model.get("continuing_subword_prefix") or ""
    unk = source_model.get("unk_token")
    byte_fallback = bool(source_model.get("byte_fallback"))
    model_ = src.tokenizer.model
    encoded: dict[str, str] = {}
    char_of: dict[str, str] = {}  # source token or new character -> its private-use character
    token_of_char: dict[str, str] = {}
    new_chars_of: dict[str, list[str]] = {}  # word -> characters it spells with byte tokens
    char_counts: dict[str, int] = {}

    def code(text: str) -> str:
        char = char_of.get(text)
        if char is None:
            char = char_of[text] = _pua(len(char_of))
            token_of_char[char] = text
        return char

    def encode_word(word: str) -> str:
        # A source <unk> cannot be merged with its neighbours: it becomes a word break.
        out, raw, chars = [], bytearray(), []
        for token in model_.tokenize(word) + [None]:
            if token is not None and byte_fallback and _is_byte_token(token.value):
                raw.append(int(token.value[3:5], 16))
                continue
            if raw:  # the bytes of one or more whole characters: tokenize cuts at character boundaries
                chars.extend(raw.decode("utf-8"))
                out.extend(code(c) for c in raw.decode("utf-8"))
                raw = bytearray()
            if token is None:
                break
            out.append(" " if unk is not None and token.value == unk else code(token.value))
        if chars:
            new_chars_of[word] = chars
        return "".join(out)

    def mapped() -> Iterable[str]:
        for words in _source_words(src, texts):
            parts = []
            for word in words:
                code_ = encoded.get(word)
                if code_ is None:
                    code_ = encoded[word] = encode_word(word)
                for c in new_chars_of.get(word, ()):
                    char_counts[c] = char_counts.get(c, 0) + 1
                parts.append(code_)
            yield " ".join(parts)

    # The trainer's vocab_size counts its alphabet (the source tokens the sample uses, at most all of them) too:
    # asking for source size + size merges at least `size` in one pass over the sample; extra merges are cut below.
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    wanted_vocab = len(src.vocab) + size
    trainer = trainers.BpeTrainer(
        vocab_size=wanted_vocab, special_tokens=[], min_frequency=min_frequency, show_progress=show_progress
    )
    learner.train_from_iterator(mapped(), trainer)
    learned_merges = json.loads(learner.to_str())["model"]["merges"]
    exhausted = learner.get_vocab_size() < wanted_vocab

    def decode(code_: str) -> str:
        text = token_of_char[code_[0]]
        for char in code_[1:]:
            text = _bpe_join(text, token_of_char[char], prefix)
        return text

    model = _materialize_added(src)
    vocab: dict[str, int] = model["vocab"]
    merges = [list(m) if isinstance(m, list) else m.split(" ") for m in model["merges"]]
    have = {tuple(m) for m in merges}
    new_pieces: list[str] = []
    # New characters first, most frequent first: without them a script stays bytes. A character in the vocabulary
    # is a symbol of its own (no merge makes it), and it changes no other word's segmentation: the source never
    # merges byte tokens.
    for char, count in sorted(char_counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if count >= min_frequency and char not in vocab and len(new_pieces) < wanted:
            vocab[char] = len(vocab)
            new_pieces.append(char)
    new_merges = 0
    for pair in learned_merges:
        left, right = pair if isinstance(pair, list) else pair.split(" ")
        a, b = decode(left), decode(right)
        if a not in vocab or b not in vocab:
            continue  # builds on a rare character that was not added
        joined = _bpe_join(a, b, prefix)
        if joined not in vocab:
            if len(new_pieces) >= wanted:
                break
            vocab[joined] = len(vocab)
            new_pieces.append(joined)
        elif (a, b) in have:
            continue
        # A merge of two existing tokens into an existing one (formed differently in the source) is kept too:
        # it is how words the source leaves split reach the longer token.
        merges.append([a, b])
        have.add((a, b))
        new_merges += 1
    model["merges"] = merges
    ext = Extension(_rebuild(src, model), new_pieces, new_merges=new_merges, learned_vocab_size=len(learned_merges))
    return ext, exhausted


def _bpe_join(a: str, b: str, prefix: str) -> str:
    # HF BPE drops the continuation prefix of the right-hand token when it merges two symbols.
    return a + (b[len(prefix) :] if prefix and b.startswith(prefix) else b)


# --- train: a fresh tokenizer with the source's special tokens ---------------------------------------------


def special_added_tokens(source: Tokenizer) -> list[dict[str, Any]]:
    """The source's special added tokens (JSON entries with their flags), ordered by source id."""
    added = json.loads(source.to_str()).get("added_tokens") or []
    return sorted((t for t in added if t.get("special")), key=lambda t: t["id"])


def _uses_byte_level(node: Any) -> bool:
    if isinstance(node, dict):
        return node.get("type") == "ByteLevel" or any(_uses_byte_level(v) for v in node.values())
    if isinstance(node, list):
        return any(_uses_byte_level(v) for v in node)
    return False


def train(
    source: Tokenizer,
    texts: Sequence[str],
    model_type: str,
    vocab_size: int,
    *,
    unk_token: Optional[str] = None,
    min_frequency: int = 2,
    show_progress: bool = False,
) -> Tokenizer:
    """A fresh `model_type` ('unigram' | 'bpe') tokenizer of at most `vocab_size` entries learned on `texts`.

    Special tokens: the source's, in source-id order, at ids 0..k-1, with the source's flags. Normalizer: the
    source's (e.g. an uncased BERT keeps lowercasing). Pre-tokenizer and decoder: the source's when the source
    is of the same model type, else Metaspace for Unigram and byte-level for BPE. Post-processor: the source's
    with special-token ids renumbered.
    """
    src = _inspect(source)
    specials = special_added_tokens(source)
    names = [t["content"] for t in specials]
    if vocab_size <= len(names):
        raise HyperofaError(
            f"config key tokenizer.vocab_size: {vocab_size} leaves no room beside {len(names)} special tokens"
        )
    same = src.family == model_type
    if model_type == "unigram":
        tok = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size,
            special_tokens=names,
            unk_token=unk_token if unk_token in names else None,
            show_progress=show_progress,
        )
        default_pre, default_dec = pre_tokenizers.Metaspace(), decoders.Metaspace()
    elif model_type == "bpe":
        byte_level = not same or _uses_byte_level(src.data.get("pre_tokenizer"))
        tok = Tokenizer(models.BPE(unk_token=None if byte_level else unk_token))
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=names,
            min_frequency=min_frequency,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if byte_level else [],
            show_progress=show_progress,
        )
        default_pre, default_dec = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    else:
        raise ValueError(f"unknown model_type {model_type!r}")
    if source.normalizer is not None:
        tok.normalizer = source.normalizer
    tok.pre_tokenizer = source.pre_tokenizer if same and source.pre_tokenizer is not None else default_pre
    tok.decoder = source.decoder if same and source.decoder is not None else default_dec
    tok.train_from_iterator(texts, trainer)

    data = json.loads(tok.to_str())
    if model_type == "unigram":
        k = len(names)
        vocab_list = [(p, v) for p, v in data["model"]["vocab"]]
        data["model"]["vocab"] = [list(x) for x in vocab_list[:k] + canonical_unigram(vocab_list[k:])]
    ids = {t: i for i, t in enumerate(names)}
    for entry in data["added_tokens"]:
        if entry["content"] in ids:
            flags = next(t for t in specials if t["content"] == entry["content"])
            entry.update({k: v for k, v in flags.items() if k not in ("id", "content")})
    vocab = {t: i for t, i in tok.get_vocab(with_added_tokens=True).items()}
    wrong = [n for n in names if vocab.get(n) != ids[n]]
    if wrong:
        raise AssertionError(f"special tokens {wrong} did not get ids 0..{len(names) - 1}")
    data["post_processor"] = _renumber(src.data.get("post_processor"), vocab)
    return Tokenizer.from_str(json.dumps(data, ensure_ascii=False))


def _renumber(node: Any, vocab: dict[str, int]) -> Any:
    """A post-processor JSON with every special token's id looked up again in the new vocabulary."""
    if isinstance(node, dict):
        if "ids" in node and "tokens" in node:
            return {**node, "ids": [vocab[t] for t in node["tokens"]]}
        return {k: _renumber(v, vocab) for k, v in node.items()}
    if isinstance(node, list):
        if len(node) == 2 and isinstance(node[0], str) and isinstance(node[1], int) and node[0] in vocab:
            return [node[0], vocab[node[0]]]  # RobertaProcessing / BertProcessing: [token, id]
        return [_renumber(v, vocab) for v in node]
    return node


def pieces_used(tokenizer: Tokenizer, texts: Sequence[str], first_id: int) -> int:
    """How many distinct ids >= first_id (the appended pieces) the tokenizer produces on `texts`."""
    seen: set[int] = set()
    for enc in tokenizer.encode_batch(list(texts), add_special_tokens=False):
        seen.update(i for i in enc.ids if i >= first_id)
    return len(seen)


__all__ = [
    "Extension",
    "extend",
    "model_family",
    "pieces_used",
    "sentencepiece_bpe",
    "special_added_tokens",
    "train",
]

