"""The target tokenizer's parts that are not the stage shell: the corpus sample, the build, saving and checking.

The saved `tokenizer_config.json` names the generic `PreTrainedTokenizerFast` class on purpose: family classes
such as XLMRobertaTokenizer or BertTokenizer rebuild their model, normalizer and pre-tokenizer from vocabulary
arguments in transformers 5, so the `tokenizer.json` written here would not be what gets used. Before the
directory is renamed into place, stock `AutoTokenizer.from_pretrained` must reproduce the `tokenizers` object
exactly (size, vocabulary, ids on the sample); a mismatch is a bug and stops the stage.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..config import Config
from ..errors import HyperofaError
from ..fertility import fertility as sample_fertility
from ..formats.tokenizer import save_tokenizer
from . import learn

ROLES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")


def special_roles(hf_tokenizer: Any) -> dict[str, str]:
    """role -> token string (`mask` -> '<mask>'), for the roles the tokenizer defines."""
    out = {}
    for role in ROLES:
        token = getattr(hf_tokenizer, f"{role}_token", None)
        if token is not None:
            out[role] = str(token)
    return out


def source_fingerprint(hf_tokenizer: Any) -> dict[str, Any]:
    """Identity of the source tokenizer: its serialised backend and special-token roles (hub or directory alike)."""
    backend = hf_tokenizer.backend_tokenizer.to_str()
    return {
        "tokenizer_json_sha256": hashlib.sha256(backend.encode("utf-8")).hexdigest(),
        "roles": special_roles(hf_tokenizer),
        "model_max_length": int(min(hf_tokenizer.model_max_length, 2**31 - 1)),
    }


def check_ids_kept(source: Any, where: str | Path) -> None:
    """Extension appends after the source ids and keeps every one; a source it cannot do that for is one line.

    Two ways a source's ids would move: a gap in its ids (the extended vocabulary must be contiguous), and a
    tokenizer.json whose written ids the tokenizers library does not load as written (it renumbers an added token
    placed after a gap to the next free id, so the model row of that token would belong to another id).
    """
    from ..formats.tokenizer import TOKENIZER_JSON

    loaded = source.backend_tokenizer.get_vocab(with_added_tokens=True)
    path = Path(str(where)).expanduser() / TOKENIZER_JSON
    if path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        vocab = (data.get("model") or {}).get("vocab")
        # BPE and WordPiece write {token: id}, Unigram [[piece, score], ...] in id order.
        written = dict(vocab) if isinstance(vocab, dict) else {entry[0]: i for i, entry in enumerate(vocab or [])}
        written.update({t["content"]: t["id"] for t in data.get("added_tokens") or []})
        for token, token_id in sorted(written.items(), key=lambda kv: kv[1]):
            if loaded.get(token) != token_id:
                raise HyperofaError(
                    f"{path}: token {token!r} has id {token_id} in the file but {loaded.get(token)} as loaded; "
                    "extending it would move source ids"
                )
    ids = sorted(set(loaded.values()))
    if ids != list(range(len(loaded))):
        hole = next(i for i, token_id in enumerate(ids) if token_id != i)
        raise HyperofaError(
            f"{where}: the source tokenizer's ids have a gap (no token has id {hole}); extending it would move "
            "source ids"
        )


def refuse_train_bpe(source: Any, key: str) -> None:
    """`train` builds byte-level BPE; from a SentencePiece-style BPE source (Llama 2, Mistral) it would inherit a
    normalizer that writes "▁" into the text, which byte-level pieces then keep in decoded text."""
    if learn.sentencepiece_bpe(source.backend_tokenizer):
        raise HyperofaError(
            f"tokenizer.model_type=bpe with tokenizer.mode=train cannot rebuild the SentencePiece-style BPE of {key} "
            "(byte fallback, like Llama 2); use tokenizer.mode=extend or tokenizer.model_type=unigram"
        )


# --- corpus sample --------------------------------------------------------------------------------------------


class SampleFile:
    """The sentence sample, one per line, re-iterable (trainers read it once per round) without holding it in RAM."""

    def __init__(self, path: Path):
        self.path = path

    def __iter__(self) -> Iterator[str]:
        with open(self.path, encoding="utf-8", newline="\n") as handle:
            for line in handle:
                yield line[:-1] if line.endswith("\n") else line


@dataclass
class Sample:
    file: SampleFile
    sentences: dict[str, int]  # lang -> sentences sampled
    sha256: dict[str, str]  # lang -> sha256 of its sampled sentences
    heads: dict[str, list[str]]  # lang -> first sentences, for fertility
    skipped: list[str]  # languages without a single sentence


def read_sample(config: Config, sources: list, path: Path) -> Sample:
    """The first `sentences_per_language` sentences of each language into `path`, hashed per language."""
    from tqdm import tqdm

    from ..formats.corpus import iter_sentences

    limit = config.tokenizer.sentences_per_language
    keep = config.tokenizer.fertility_sentences
    sentences, hashes, heads, skipped = {}, {}, {}, []
    with open(path, "w", encoding="utf-8", newline="\n") as out:
        for source in tqdm(sources, desc="tokenizer sample", unit="lang", disable=not sys.stderr.isatty()):
            h, n, head = hashlib.sha256(), 0, []
            for text in iter_sentences(source, config.prepare.normalization, limit):
                # A line separator inside a sentence would split it when the sample is read back.
                text = text.replace("\n", " ").replace("\r", " ")
                out.write(text + "\n")
                h.update(text.encode("utf-8") + b"\n")
                if n < keep:
                    head.append(text)
                n += 1
            if n == 0:
                print(f"hyperofa tokenizer: skipped language {source.lang} (no sentences)", file=sys.stderr)
                skipped.append(source.lang)
                continue
            sentences[source.lang], hashes[source.lang], heads[source.lang] = n, h.hexdigest(), head
    if not sentences:
        where = config.corpus.path or config.corpus.hub_name
        raise HyperofaError(f"{where}: the corpus has no sentences to learn a tokenizer from")
    return Sample(SampleFile(path), sentences, hashes, heads, skipped)


# --- saving and checking --------------------------------------------------------------------------------------


def save_hf(tokenizer: Any, roles: dict[str, str], model_max_length: int, out_dir: Path) -> list[str]:
    """Save a `tokenizers.Tokenizer` as an HF tokenizer directory; returns the file names written."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        model_max_length=model_max_length,
        **{f"{role}_token": token for role, token in roles.items()},
    )
    return save_tokenizer(hf, out_dir)  # the stock class transformers 4 and 5 both resolve


def verify_hf(out_dir: Path, tokenizer: Any, roles: dict[str, str], texts: list[str], name: str = "") -> None:
    """Stock AutoTokenizer must give exactly what the `tokenizers` object gives; a difference is one line naming the
    first text and tokens that differ (what a user of the saved tokenizer would get wrong)."""
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(str(out_dir))
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    problems = []
    if len(loaded) != size:
        problems.append(f"len {len(loaded)} != {size}")
    if loaded.get_vocab() != tokenizer.get_vocab(with_added_tokens=True):
        problems.append("vocabulary differs")
    for role, token in roles.items():
        if getattr(loaded, f"{role}_token_id", None) != tokenizer.token_to_id(token):
            problems.append(f"{role} token id differs")
    batch = loaded(texts, add_special_tokens=True)["input_ids"] if texts else []
    expected = [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=True)]
    for text, got, want in zip(texts, batch, expected):
        if got != want:
            at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            pieces = lambda ids: tokenizer.id_to_token(ids[at]) if at < len(ids) else "<end>"  # noqa: E731
            problems.append(
                f"ids differ first on {text[:60]!r} at piece {at}: AutoTokenizer {pieces(got)!r}, built {pieces(want)!r}"
            )
            break
    if problems:
        raise HyperofaError(
            f"{name or out_dir}: stock AutoTokenizer does not reproduce the built tokenizer: {'; '.join(problems)}"
        )


def build_target(config: Config, source: Any, texts: SampleFile) -> tuple[Any, dict[str, Any]]:
    """The target `tokenizers.Tokenizer` for the configured mode, and what to record about how it was made."""
    cfg = config.tokenizer
    backend = source.backend_tokenizer
    progress = sys.stderr.isatty()
    if cfg.mode == "extend":
        ext = learn.extend(backend, texts, cfg.new_tokens, min_frequency=cfg.min_frequency, show_progress=progress)
        if ext.shortfall:
            print(
                f"hyperofa tokenizer: appended {len(ext.new_pieces)} of {cfg.new_tokens} new pieces: {ext.shortfall}",
                file=sys.stderr,
            )
        info = {
            "new_pieces": len(ext.new_pieces),
            "new_merges": ext.new_merges,
            "learned_vocab_size": ext.learned_vocab_size,
            "training_rounds": ext.rounds,
            "shortfall": ext.shortfall,
        }
        return ext.tokenizer, info
    unk = getattr(source, "unk_token", None)
    target = learn.train(
        backend,
        texts,
        cfg.model_type,
        cfg.vocab_size,
        unk_token=str(unk) if unk is not None else None,
        min_frequency=cfg.min_frequency,
        show_progress=progress,
    )
    size = target.get_vocab_size(with_added_tokens=True)
    shortfall = None
    if size < cfg.vocab_size:
        shortfall = f"the corpus sample supports only {size} of {cfg.vocab_size} entries"
        print(f"hyperofa tokenizer: trained vocabulary is smaller than requested: {shortfall}", file=sys.stderr)
    return target, {"shortfall": shortfall}


def describe(config: Config, source: Any, target: Any, info: dict[str, Any], sample: Sample) -> tuple[dict, dict]:
    """The manifest's counts and its extra sections (fertility per language, shortfall, special-token ids)."""
    backend = source.backend_tokenizer
    source_size = backend.get_vocab_size(with_added_tokens=True)
    langs = sorted(sample.heads)
    counts = {
        "source_size": source_size,
        "target_size": target.get_vocab_size(with_added_tokens=True),
        "sample_sentences": {lang: sample.sentences[lang] for lang in langs},
        "skipped_languages": sample.skipped,
        **{k: v for k, v in info.items() if k != "shortfall"},
    }
    if config.tokenizer.mode == "extend":
        heads = [s for lang in langs for s in sample.heads[lang]]
        counts["new_pieces_used_in_sample"] = learn.pieces_used(target, heads, source_size)
    extra = {
        "fertility": {lang: sample_fertility(backend, target, sample.heads[lang]).as_dict() for lang in langs},
        "shortfall": info["shortfall"],
        "special_tokens": {role: [tok, target.token_to_id(tok)] for role, tok in special_roles(source).items()},
    }
    return counts, extra
