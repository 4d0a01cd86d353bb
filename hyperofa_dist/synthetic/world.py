"""A small generated multilingual world for tests, benchmarks and the demo (nothing from a hub).

Languages share a concept lexicon: a sentence is a sequence of concept ids, rendered in every language by that
language's word for each concept, so line i of every language's file are translations of each other. Words are
built from per-language syllable inventories in Latin, Cyrillic or Greek script; a fraction of concepts are
"loan words" spelled identically in all languages of a script, so vocabularies overlap as real ones do.
Source tokenizers of the three masked-LM families (SentencePiece-style Unigram like XLM-R, byte-level BPE like
RoBERTa, WordPiece like BERT) and of the two causal-LM kinds (byte-level BPE with special tokens after its vocabulary
like Llama 3 / Qwen2, SentencePiece-style BPE with byte fallback like Llama 2 / Mistral) are trained here with the
`tokenizers` library, and tiny masked and causal LMs are built from configs.
"""

from __future__ import annotations

import gzip
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

# Per script: onsets and nuclei of its syllables (a nucleus may be empty for a syllabary or logographs).
ALPHABETS = {
    "Latn": ("ptkbdgmnlrsfvzhjw", "aeiouy"),
    "Cyrl": ("пткбдгмнлрсфвзхжшч", "аеиоуыэюя"),
    "Grek": ("πτκβδγμνλρσφζχθξψ", "αεηιουω"),
    # Beyond European scripts (`multiscript_languages`): right-to-left abjads, an abugida whose vowels are
    # combining marks, a syllabary, precomposed Hangul blocks, Han logographs and Thai, both written without spaces.
    "Arab": ("بتثجحخدذرزسشصضطعغفقكلمنهوي", ("", "ا", "و", "ي")),
    "Hebr": ("בגדהזחטכלמנסעפצקרשת", ("", "ו", "י", "א")),
    "Deva": ("कखगघचछजटडतथदधनपबभमयरलवशसह", ("", "ा", "ि", "ी", "ु", "ू", "े", "ो", "ं")),
    "Ethi": ("ሀለሐመሠረሰሸቀበተቸነአከወዘየደገጠጸፈፐ", ("",)),
    "Hang": (tuple(chr(0xAC00 + (lead * 21 + vowel) * 28) for lead in range(0, 19, 2) for vowel in range(0, 21, 4)), ("",)),
    "Hani": ("人大中国水火山木日月天地上下心手口目田土生金言車門", ("",)),
    "Thai": ("กขคงจชซดตทนบปพมยรลวสห", ("ะ", "า", "ิ", "ี", "ุ", "ู", "ำ")),
}
# Scripts written without spaces between words.
UNSPACED = {"Hani", "Thai"}
EMOJI = ("😀", "🎉", "🌍", "❤️", "🚀", "👍🏽")
FAMILIES = ("xlmr", "roberta", "bert")
# Tokenizers of causal LMs (`train_source_tokenizer`) and causal-LM architectures (`make_tiny_model`): untied llama
# (input embeddings and output head are two matrices, as Llama and Mistral) and tied qwen2 (one matrix, as small
# Qwen2 and Gemma models). A qwen2 model needs the qwen2 tokenizer: transformers 5 loads every tokenizer beside a
# Qwen2 config as Qwen2Tokenizer, which rebuilds the pipeline from the vocabulary (Qwen's split, NFC,
# <|endoftext|>), whatever tokenizer_config.json names.
CAUSAL_TOKENIZER_FAMILIES = ("llama3", "llama2", "qwen2")
CAUSAL_FAMILIES = {"llama": False, "qwen2": True}  # family -> tie_word_embeddings
# Llama 3 keeps 256 special tokens after its BPE vocabulary, most of them reserved; the tiny one keeps 16, named
# and reserved interleaved as there.
LLAMA3_SPECIALS = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", *(f"<|reserved_special_token_{i}|>" for i in range(3, 8)),
)
QWEN2_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Llama 3's pre-tokenizer split (words with an optional leading non-letter, numbers in threes, punctuation runs).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class Language:
    code: str  # lang_Script, e.g. qaa_Latn
    script: str


def multiscript_languages() -> list[Language]:
    """One language per script of ALPHABETS (qma..), Latin first: the widest world the generator makes."""
    return [Language(f"qm{chr(ord('a') + i)}_{script}", script) for i, script in enumerate(ALPHABETS)]


def default_languages(n: int = 6) -> list[Language]:
    """qaa.. codes (ISO 639 private-use range) cycling through Latn, Cyrl, Grek."""
    scripts = ["Latn", "Cyrl", "Latn", "Grek", "Latn", "Cyrl", "Grek", "Latn"]
    out = []
    for i in range(n):
        script = scripts[i % len(scripts)]
        out.append(Language(f"q{chr(ord('a') + i // 26)}{chr(ord('a') + i % 26)}_{script}", script))
    return out


class World:
    """Concept lexicon rendered per language; deterministic in (seed, languages, n_concepts)."""

    def __init__(
        self,
        languages: Iterable[Language],
        n_concepts: int = 3000,
        seed: int = 0,
        loan_share: float = 0.1,
        zipf_exponent: float = 1.05,
        topics: int = 0,
        topic_share: float = 0.8,
        mixed: bool = False,
    ):
        """`mixed`: some concepts are written in Latin script in every language and some words carry an emoji,
        so lines mix scripts (off by default: the worlds of the demo and most tests stay as they are)."""
        self.languages = list(languages)
        self.mixed = mixed
        self.n_concepts = n_concepts
        self.seed = seed
        rng = np.random.default_rng(seed)
        loans = rng.random(n_concepts) < loan_share
        loan_words = {s: self._lexicon(s, np.random.default_rng([seed, 7, i])) for i, s in enumerate(ALPHABETS)}
        self.lexicon: dict[str, list[str]] = {}
        for index, lang in enumerate(self.languages):
            own = self._lexicon(lang.script, np.random.default_rng([seed, 11, index]))
            self.lexicon[lang.code] = [loan_words[lang.script][c] if loans[c] else own[c] for c in range(n_concepts)]
            if mixed:
                latin = loan_words["Latn"]
                self.lexicon[lang.code] = [
                    latin[c] if c % 29 == 5 else word + (EMOJI[c % len(EMOJI)] if c % 23 == 7 else "")
                    for c, word in enumerate(self.lexicon[lang.code])
                ]
        # Zipf-like concept frequencies, as in real text.
        ranks = np.arange(1, n_concepts + 1, dtype=np.float64)
        self.concept_p = (1.0 / ranks**zipf_exponent) / np.sum(1.0 / ranks**zipf_exponent)
        # Optional topics give the world distributional semantics: a sentence draws most of its concepts from its
        # topic, so concepts of one topic co-occur, which MLM embeddings and sentence-id word vectors both learn.
        self.topics = topics
        self.topic_share = topic_share
        self.topic_of = np.random.default_rng([seed, 19]).integers(0, max(topics, 1), n_concepts)

    def _lexicon(self, script: str, rng: np.random.Generator) -> list[str]:
        consonants, vowels = ALPHABETS[script]
        c = rng.permutation(list(consonants))[: max(6, len(consonants) - 4)]
        v = rng.permutation(list(vowels))[: max(min(3, len(vowels)), len(vowels) - 1)]
        syllables = [a + b for a in c for b in v] + [a + b + d for a in c[:5] for b in v for d in c[-4:]]
        words, seen = [], set()
        while len(words) < self.n_concepts:
            n = int(rng.choice([1, 2, 2, 3, 3, 4]))
            word = "".join(syllables[int(i)] for i in rng.integers(0, len(syllables), n))
            if word not in seen:
                seen.add(word)
                words.append(word)
        return words

    def concept_sentences(self, n: int, seed: int, min_len: int = 4, max_len: int = 14) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, 13, seed])
        lengths = rng.integers(min_len, max_len + 1, n)
        flat = rng.choice(self.n_concepts, size=int(lengths.sum()), p=self.concept_p)
        if self.topics:
            sentence_topic = np.repeat(rng.integers(0, self.topics, n), lengths)
            from_topic = rng.random(flat.size) < self.topic_share
            for topic in range(self.topics):
                members = np.flatnonzero(self.topic_of == topic)
                where = np.flatnonzero(from_topic & (sentence_topic == topic))
                if members.size and where.size:
                    p = self.concept_p[members] / self.concept_p[members].sum()
                    flat[where] = rng.choice(members, size=where.size, p=p)
        return np.split(flat, np.cumsum(lengths)[:-1])

    def render(self, lang: str, sentences: list[np.ndarray]) -> list[str]:
        words = self.lexicon[lang]
        script = next(l.script for l in self.languages if l.code == lang)
        joiner = "" if script in UNSPACED else " "
        out = []
        for s in sentences:
            text = joiner.join(words[c] for c in s)
            out.append(text[0].upper() + text[1:] + ("。" if script == "Hani" else "."))
        return out


def write_corpus(
    root: str | Path,
    world: World,
    sizes: dict[str, int],
    seed: int = 0,
    gzip_languages: Iterable[str] = (),
    parallel: bool = True,
) -> dict[str, Path]:
    """Write `<root>/<lang>.txt` (or `.txt.gz`) with sizes[lang] lines; parallel=True gives aligned lines."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    gz = set(gzip_languages)
    shared = world.concept_sentences(max(sizes.values()), seed) if parallel else None
    paths = {}
    for index, (lang, n) in enumerate(sorted(sizes.items())):
        sentences = shared[:n] if shared is not None else world.concept_sentences(n, seed * 1000 + index)
        data = ("\n".join(world.render(lang, sentences)) + "\n").encode("utf-8")
        if lang in gz:
            path = root / f"{lang}.txt.gz"
            path.write_bytes(gzip.compress(data, mtime=0))
        else:
            path = root / f"{lang}.txt"
            path.write_bytes(data)
        paths[lang] = path
    return paths


def skewed_sizes(languages: list[Language], largest: int, ratio: float = 0.35) -> dict[str, int]:
    """Geometric sizes: the first language has `largest` lines, each next one `ratio` times fewer."""
    return {lang.code: max(20, int(largest * ratio**i)) for i, lang in enumerate(languages)}


# --- source tokenizers of the three families -------------------------------------------------------------


def train_source_tokenizer(
    family: str, texts: list[str], vocab_size: int, out_dir: str | Path, lowercase: bool = True, legacy: bool = True
) -> Path:
    """Train a tokenizer like the family's real one and save it in HF format (AutoTokenizer loads it).

    `lowercase=False` makes a cased BERT (the WordPiece normalizer keeps case and accents). The causal kinds
    (llama3, llama2, qwen2) learn `vocab_size` BPE entries; llama3 and qwen2 put their special tokens after them,
    llama2 its three special tokens and 256 byte tokens before them. `legacy=False` makes llama2 the newer conversion (no
    normalizer, a Metaspace pre-tokenizer) instead of Llama 2's own (Prepend/Replace normalizer, no pre-tokenizer).
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    out_dir = Path(out_dir)
    if family in CAUSAL_TOKENIZER_FAMILIES:
        return _causal_tokenizer(family, texts, vocab_size, out_dir, legacy)
    if family == "xlmr":
        from transformers import XLMRobertaTokenizer

        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size - 1, special_tokens=["<s>", "<pad>", "</s>", "<unk>"], unk_token="<unk>",
            show_progress=False,  # its progress output ends with newlines on stdout, which carries only results
        )
        tok.train_from_iterator(texts, trainer)
        from ..tokenizer.learn import canonical_unigram

        # The Unigram trainer's scores differ in the last bits between runs; canonical scores make the world
        # (and so the demo's numbers) the same on every run.
        vocab = [tuple(v) for v in json.loads(tok.to_str())["model"]["vocab"]]
        vocab = vocab[:4] + canonical_unigram(vocab[4:])  # the 4 special tokens keep ids 0-3
        hf = XLMRobertaTokenizer(vocab=vocab)  # appends <mask> last, as XLM-R has it
    elif family == "roberta":
        from transformers import RobertaTokenizer

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer)
        model = json.loads(tok.to_str())["model"]
        vocab = dict(model["vocab"])
        vocab["<mask>"] = len(vocab)
        merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
        hf = RobertaTokenizer(vocab=vocab, merges=merges)
    elif family == "bert":
        from transformers import BertTokenizer

        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], show_progress=False
        )
        tok.train_from_iterator(texts, trainer)
        hf = BertTokenizer(vocab=dict(json.loads(tok.to_str())["model"]["vocab"]), do_lower_case=lowercase)
    else:
        raise ValueError(f"unknown tokenizer family {family!r}; expected one of {FAMILIES + CAUSAL_TOKENIZER_FAMILIES}")
    hf.model_max_length = 512
    hf.save_pretrained(out_dir)
    return out_dir


def _causal_tokenizer(family: str, texts: list[str], vocab_size: int, out_dir: Path, legacy: bool) -> Path:
    """A Llama-3-style or Llama-2-style tokenizer.json, saved with the generic class as the hub's are loaded."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import trainers
    from transformers import PreTrainedTokenizerFast

    if family == "qwen2":
        from transformers import Qwen2Tokenizer

        # Byte-level BPE learned behind Qwen2Tokenizer's own pipeline, then handed to that class (as the hub's
        # files are loaded): <|endoftext|> (eos, pad) and the chat markers follow the BPE vocabulary, no BOS.
        learner = Qwen2Tokenizer()._tokenizer
        learner.model = models.BPE()
        learner.train_from_iterator(texts, trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=2, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ))
        learned = json.loads(learner.to_str())["model"]
        merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
        hf = Qwen2Tokenizer(vocab=dict(learned["vocab"]), merges=merges)
        hf.add_special_tokens({"additional_special_tokens": list(QWEN2_SPECIALS[1:])})
        hf.model_max_length = 512
        hf.save_pretrained(out_dir)
        return out_dir
    if family == "llama3":
        # Byte-level BPE over a regex split; merges are not applied to a word that is itself a token (Llama 3's
        # ignore_merges); the special tokens follow the BPE vocabulary and BOS opens every encoding.
        tok = Tokenizer(models.BPE(ignore_merges=True))
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ])
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(texts, trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=2, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ))
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA3_SPECIALS])
        bos, eos = LLAMA3_SPECIALS[:2]
        roles = {"bos_token": bos, "eos_token": eos}
    else:
        # SentencePiece BPE as HF converts it: <unk> <s> </s>, the 256 byte tokens <0x00>..<0xFF> a character
        # outside the vocabulary falls back to, then the learned pieces. SentencePiece never merges across words;
        # the trainer sees words cut before each "▁", the saved tokenizer the whole line, as in the real files.
        learner = Tokenizer(models.BPE())
        learner.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never", split=True)
        learner.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2,
                                                               show_progress=False))
        learned = json.loads(learner.to_str())["model"]
        vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
        for piece, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
            vocab.setdefault(piece, len(vocab))
        merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
        if legacy:
            tok.normalizer = learner.normalizer
        else:
            tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence([
            decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
        ])
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
        bos, roles = "<s>", {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=512, **roles)
    hf.save_pretrained(out_dir)
    # Family classes (LlamaTokenizer, Qwen2Tokenizer) rebuild the pipeline from the vocabulary in transformers 5;
    # the generic class loads tokenizer.json as written, as the hub's Llama 3 files ask for.
    config_path = out_dir / "tokenizer_config.json"
    data = json.loads(config_path.read_text(encoding="utf-8"))
    data["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    return out_dir


def make_tiny_model(
    family: str,
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    seed: int = 0,
    max_position: int = 130,
) -> Path:
    """A randomly initialised model of the family's architecture (`models.family_named`: a masked LM, or a causal
    LM tied as CAUSAL_FAMILIES says), saved with its tokenizer."""
    import torch
    from transformers import AutoTokenizer

    from ..models import CausalFamily, TinySizes, family_named

    record = family_named(family)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if family == "qwen2" and type(tok).__name__ != "Qwen2Tokenizer":
        raise ValueError("a qwen2 model needs a qwen2 tokenizer (transformers loads any other as Qwen2Tokenizer)")
    sizes = TinySizes(hidden_size, num_layers, num_heads, max_position, tied=CAUSAL_FAMILIES.get(family, True))
    torch.manual_seed(seed)
    model = record.tiny_model(tok, sizes)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    if isinstance(record, CausalFamily):
        for name in ("tokenizer.json", "tokenizer_config.json"):  # as written: save_pretrained renames the class
            shutil.copyfile(Path(tokenizer_dir) / name, out_dir / name)
    else:
        tok.save_pretrained(out_dir)
    return out_dir


def read_lines(path: str | Path, limit: Optional[int] = None) -> list[str]:
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        lines = []
        for line in handle:
            lines.append(line.rstrip("\n"))
            if limit is not None and len(lines) >= limit:
                break
    return lines


# --- evaluation data: parallel retrieval files and tagging files --------------------------------------------

UPOS_CLASSES = ("NOUN", "VERB", "ADJ", "ADV", "DET", "ADP", "PRON", "NUM")
# Word-class sequences of the generated grammar; every language shares it, so tags depend on word and position.
TAG_TEMPLATES = (
    ("DET", "NOUN", "VERB"),
    ("DET", "ADJ", "NOUN", "VERB", "ADV"),
    ("PRON", "VERB", "DET", "NOUN", "ADP", "DET", "NOUN"),
    ("NUM", "ADJ", "NOUN", "VERB", "ADP", "PRON"),
    ("DET", "NOUN", "ADP", "DET", "ADJ", "NOUN", "VERB"),
    ("PRON", "ADV", "VERB", "NUM", "NOUN"),
)
ENTITY_TYPES = ("PER", "LOC", "ORG")


def concept_upos(concept: int) -> str:
    """The word class of a concept: the same in every language, as translations share their part of speech."""
    return UPOS_CLASSES[concept % len(UPOS_CLASSES)]


def concept_entity(concept: int) -> Optional[str]:
    """`B-<type>` for a name's first word, `I-<type>` for a word that only continues names, None otherwise.

    Every twentieth concept starts names and the concept ten further continues them (PER, LOC, ORG in turn), as
    a family name follows a given name: the tag is a property of the word, so a tiny model can learn it."""
    kind = ENTITY_TYPES[(concept // 20) % len(ENTITY_TYPES)]
    if concept % 20 == 0:
        return f"B-{kind}"
    if concept % 20 == 10:
        return f"I-{kind}"
    return None


def _unique_sentences(world: World, n: int, seed: int, langs: list[str]) -> list[np.ndarray]:
    """n concept sentences whose renderings are distinct in every listed language (retrieval needs no twins)."""
    out: list[np.ndarray] = []
    seen: dict[str, set[str]] = {lang: set() for lang in langs}
    attempt = 0
    while len(out) < n:
        for sentence in world.concept_sentences(2 * n, seed * 1000 + attempt):
            texts = {lang: world.render(lang, [sentence])[0] for lang in langs}
            if all(texts[lang] not in seen[lang] for lang in langs):
                for lang in langs:
                    seen[lang].add(texts[lang])
                out.append(sentence)
                if len(out) == n:
                    break
        attempt += 1
    return out


def write_retrieval_data(
    root: str | Path,
    world: World,
    english_source: str,
    languages: Iterable[str],
    n: int,
    seed: int = 0,
    prefix: str = "tatoeba",
    naming: str = "glot500",
) -> dict[str, tuple[Path, Path]]:
    """Line-aligned pairs per language: `<prefix>.<L>-eng_Latn.<L>` + `.eng_Latn` (naming glot500) or
    `<prefix>.<iso>-eng.<iso>` + `.eng` (naming xtreme); the English side is `english_source` rendered."""
    if naming not in ("glot500", "xtreme"):
        raise ValueError(f"naming must be glot500 or xtreme, not {naming!r}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    languages = list(languages)
    sentences = _unique_sentences(world, n, seed, [english_source] + languages)
    eng_text = "\n".join(world.render(english_source, sentences)) + "\n"
    paths = {}
    for lang in languages:
        code, eng = (lang, "eng_Latn") if naming == "glot500" else (lang.split("_")[0], "eng")
        stem = f"{prefix}.{code}-{eng}"
        lang_path, eng_path = root / f"{stem}.{code}", root / f"{stem}.{eng}"
        lang_path.write_text("\n".join(world.render(lang, sentences)) + "\n", encoding="utf-8")
        eng_path.write_text(eng_text, encoding="utf-8")
        paths[lang] = (lang_path, eng_path)
    return paths


def tagged_concept_sentences(n: int, seed: int, task: str, n_concepts: int = 240) -> list[list[tuple[int, str]]]:
    """Sentences of (concept, label) from the shared grammar over the first n_concepts concepts.

    pos: labels are the concepts' UPOS classes; ner: BIO labels of names (see concept_entity) inserted among
    ordinary words. A small concept pool lets a tiny model see every word in training."""
    if task not in ("pos", "ner"):
        raise ValueError(f"task must be pos or ner, not {task!r}")
    rng = np.random.default_rng([seed, 17, 0 if task == "pos" else 1])
    pool = np.arange(n_concepts)
    ordinary = [concept_entity(int(k)) is None for k in pool]
    by_class = {c: pool[[concept_upos(int(k)) == c and ordinary[k] for k in pool]] for c in UPOS_CLASSES}
    starts = {e: pool[[concept_entity(int(k)) == f"B-{e}" for k in pool]] for e in ENTITY_TYPES}
    continues = {e: pool[[concept_entity(int(k)) == f"I-{e}" for k in pool]] for e in ENTITY_TYPES}
    out = []
    for _ in range(n):
        template = TAG_TEMPLATES[int(rng.integers(len(TAG_TEMPLATES)))]
        words = [(int(rng.choice(by_class[c])), c) for c in template]
        if task == "ner":
            words = [(k, "O") for k, _ in words]
            # One or two names of different types, each a first word and maybe a continuation word.
            kinds = rng.choice(len(ENTITY_TYPES), size=int(rng.integers(1, 3)), replace=False)
            for kind in (ENTITY_TYPES[int(k)] for k in kinds):
                span = [(int(rng.choice(starts[kind])), f"B-{kind}")]
                if rng.random() < 0.5:
                    span.append((int(rng.choice(continues[kind])), f"I-{kind}"))
                at = int(rng.integers(0, len(words) + 1))
                while at < len(words) and words[at][1].startswith("I-"):
                    at += 1
                words[at:at] = span
        out.append(words)
    return out


def write_tagging_data(
    root: str | Path,
    world: World,
    task: str,
    english_source: str,
    languages: Iterable[str],
    sizes: tuple[int, int, int] = (400, 100, 100),
    seed: int = 0,
    english: str = "eng_Latn",
    n_concepts: int = 240,
) -> dict[str, dict[str, Path]]:
    """`{train,dev,test}-<english>` (rendered in english_source) plus `test-<L>` for every other language;
    POS as CoNLL-U (`.conllu`, UPOS column, a final PUNCT), NER as `token<TAB>label` (`.tsv`)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    ext = "conllu" if task == "pos" else "tsv"
    n_train, n_dev, n_test = sizes
    splits = {
        "train": tagged_concept_sentences(n_train, seed * 10 + 1, task, n_concepts),
        "dev": tagged_concept_sentences(n_dev, seed * 10 + 2, task, n_concepts),
        "test": tagged_concept_sentences(n_test, seed * 10 + 3, task, n_concepts),
    }
    jobs = [(split, english, english_source) for split in splits] + [("test", lang, lang) for lang in languages]
    paths: dict[str, dict[str, Path]] = {}
    for split, code, source in jobs:
        words = world.lexicon[source]
        blocks = []
        for index, sentence in enumerate(splits[split]):
            if task == "pos":
                rows = [f"# sent_id = {split}-{index}"]
                items = [(words[k], label) for k, label in sentence] + [(".", "PUNCT")]
                rows += [f"{i}\t{w}\t_\t{label}\t_\t_\t_\t_\t_\t_" for i, (w, label) in enumerate(items, 1)]
            else:
                rows = [f"{words[k]}\t{label}" for k, label in sentence]
            blocks.append("\n".join(rows) + "\n")
        path = root / f"{split}-{code}.{ext}"
        path.write_text("\n".join(blocks), encoding="utf-8")
        paths.setdefault(code, {})[split] = path
    return paths
