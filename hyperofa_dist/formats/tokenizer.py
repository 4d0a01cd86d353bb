"""HF tokenizer directories: where the target tokenizer lives, its identity, and the one way to load a tokenizer.

Every stage that tokenizes loads through here:
- `load_tokenizer(path_or_hub_name)` is stock `AutoTokenizer.from_pretrained`, the tokenizer a user of the
  exported model gets, with one-line errors;
- `backend_json` / `backend_from_json` carry that tokenizer's Rust backend to Ray workers. The Rust JSON reader
  does not round floats correctly (serde_json without `float_roundtrip`), so `Tokenizer.from_str` can shift a
  Unigram score by one ulp, and where two segmentations tie that changes the tokens. The scores are therefore
  parsed by Python (exactly, from their shortest round-trip text) and the model is rebuilt from them: a worker
  holds exactly the model the driver's tokenizer holds in memory. (Loading `tokenizer.json` with
  `Tokenizer.from_file` in a worker is not the same: transformers builds family classes such as
  `XLMRobertaTokenizer` from the Python-parsed vocabulary, so such a file can tokenize differently in Rust.)
No tokenizer loaded here truncates or pads: a published `tokenizer.json` may fix both for its model's own
fine-tuning (max_length 128, fixed padding), and any stage that honoured them would silently cut or pad text.
`file_settings` tells what a directory's file asked for, so a stage can record that it ignored it.

SentencePiece-only directories (a `.model` file and `tokenizer_config.json`, no `tokenizer.json`: Glot500's
published tokenizer, XLM-R-era, mT5 and older Llama checkpoints) are converted once into a fast tokenizer under
`<run.dir>/tokenizers/<name>-<digest>/` (`tokenizer_dir`), never into the user's folder. The conversion keeps the
family's vocabulary layout and special tokens (what transformers builds from `tokenizer_config.json`: XLM-R's
fairseq ids, <mask> last) and takes the segmentation from the SentencePiece model itself, Unigram or BPE; it is
accepted only when it encodes a sample exactly as SentencePiece (the engine of the slow tokenizer) does, and
`conversion.json` beside it records what was converted, from which files, and the sample. The stage that converted
records the same in its manifest (`take_conversions`). Every saved tokenizer (`save_tokenizer`) names the stock
`PreTrainedTokenizerFast` class and carries no machine-local keys, so transformers 4.x and 5.x load it alike.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from ..errors import HyperofaError
from .files import fingerprint_dir

STAGE = "tokenizer"
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
# The files that define an HF tokenizer; their sha256 is the tokenizer's identity in manifests.
TOKENIZER_FILES = (
    TOKENIZER_JSON,
    TOKENIZER_CONFIG,
    "special_tokens_map.json",
    "sentencepiece.bpe.model",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
)

# The files that hold a vocabulary: a directory with none of them is not a tokenizer, even when it has a
# tokenizer_config.json (transformers would then build a tokenizer of the special tokens alone, and every word
# would become <unk>).
VOCABULARY_FILES = (TOKENIZER_JSON, "sentencepiece.bpe.model", "spiece.model", "tokenizer.model", "vocab.txt",
                    "vocab.json")


def target_tokenizer_dir(config: Any) -> Path:
    """`tokenizer.path` when set (its converted copy when it is SentencePiece-only), else `<run.dir>/tokenizer`
    (written by `hyperofa tokenizer`)."""
    if config.tokenizer.path:
        path = Path(config.tokenizer.path).expanduser()
        if sentencepiece_only(path):
            return tokenizer_dir(path, config.run_dir, "tokenizer.path")
    else:
        path = config.run_dir / STAGE
    if not (path / TOKENIZER_JSON).is_file():
        hint = "" if config.tokenizer.path else "; run `hyperofa tokenizer` first or set tokenizer.path"
        spm = "" if not config.tokenizer.path else f" and no SentencePiece model ({', '.join(SENTENCEPIECE_FILES)})"
        raise HyperofaError(f"{path}: no target tokenizer ({TOKENIZER_JSON} missing{spm}){hint}")
    return path.resolve()


# --- SentencePiece-only directories, converted once into the run directory --------------------------------------

SENTENCEPIECE_FILES = ("sentencepiece.bpe.model", "spiece.model", "tokenizer.model")
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
ADDED_TOKENS = "added_tokens.json"
# What decides a conversion: the SentencePiece model and the files that give the family and its special tokens.
CONVERSION_INPUTS = (*SENTENCEPIECE_FILES, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, ADDED_TOKENS)
CONVERTED = "tokenizers"  # <run.dir>/tokenizers/<name>-<digest>/
CONVERSION = "conversion.json"
SAMPLE_FILE = ".sample.txt"  # the corpus sample the stage learns from, in its private build directory


def build_dir(run_dir: Path) -> Path:
    """The tokenizer stage's private scratch directory, one per host and process: `.tokenizer.build-<host>-<pid>`."""
    import socket

    return Path(run_dir) / f".{STAGE}.build-{socket.gethostname()}-{os.getpid()}"


CONVERSION_VERSION = 1  # part of the digest: a change to the conversion converts again
SAMPLE_TEXTS = 2000  # texts cut from the vocabulary, every normal piece in one of them
FIXED_TEXTS = (
    "Hello, world! How are you?",
    "  leading, inner   and trailing spaces  ",
    "digits 0123456789, fractions ½ ⅓ and ²",
    "ＦＵＬＬ－ＷＩＤＴＨ　ｔｅｘｔ",
    "ligatures ﬁ ﬂ, the letter ǅ",
    "emoji 😀 🎉 👍🏽",
    "no\u00a0break and zero\u200bwidth",
    "Кириллица, Ελληνικά, 漢字かな, العربية",
)
# Keys transformers writes into tokenizer_config.json that describe the machine it was loaded on, not the tokenizer.
MACHINE_LOCAL_KEYS = ("is_local", "local_files_only", "name_or_path", "_commit_hash", "cache_dir", "token",
                      "use_auth_token", "revision", "force_download", "proxies", "subfolder", "trust_remote_code",
                      "_from_auto")
STOCK_CLASS = "PreTrainedTokenizerFast"  # the class transformers 4 and 5 both resolve, loading tokenizer.json as is

_CONVERSIONS: dict[str, dict[str, Any]] = {}


def sentencepiece_only(path: str | Path) -> bool:
    """A local directory with a SentencePiece model and no tokenizer.json."""
    path = Path(path).expanduser()
    return (path.is_dir() and not (path / TOKENIZER_JSON).is_file()
            and any((path / name).is_file() for name in SENTENCEPIECE_FILES))


def tokenizer_dir(path: str | Path, run_dir: str | Path, key: str = "") -> Path:
    """The directory a local tokenizer loads from: `path` itself, or for a SentencePiece-only directory its converted
    copy `<run_dir>/tokenizers/<name>-<digest>/`, converted on first use and reused while the files it came from are
    unchanged. A conversion made here is also handed to the running stage's manifest (`take_conversions`)."""
    import os
    import shutil
    import socket

    from .files import digest

    path = Path(path).expanduser()
    if not sentencepiece_only(path):
        return path
    if not (path / TOKENIZER_CONFIG).is_file():
        raise HyperofaError(f"{path}: a SentencePiece tokenizer needs its {TOKENIZER_CONFIG} (the family and its "
                            f"special tokens) ({key or 'tokenizer'})")
    files = fingerprint_dir(path, CONVERSION_INPUTS)
    identity = digest({"files": files, "version": CONVERSION_VERSION})
    out = Path(run_dir) / CONVERTED / f"{path.resolve().name}-{identity[:16]}"
    if _converted(out, identity):
        return out.resolve()
    made_parent = not out.parent.exists()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        record = convert_sentencepiece(path, tmp, key)
        record.update(source=str(path.resolve()), files=files, digest=identity)
        from .files import atomic_write_json, sha256_file

        record["tokenizer_json_sha256"] = sha256_file(tmp / TOKENIZER_JSON)
        atomic_write_json(tmp / CONVERSION, record)
        if out.exists() and not _converted(out, identity):
            shutil.rmtree(out)  # an interrupted or damaged earlier copy
        try:
            os.replace(tmp, out)
        except OSError:
            if not _converted(out, identity):  # anything but another process having converted it meanwhile
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if made_parent and not out.exists() and not any(out.parent.iterdir()):
            out.parent.rmdir()  # a refused conversion leaves nothing behind
    _CONVERSIONS[key or str(path)] = {**record, "to": f"{CONVERTED}/{out.name}"}  # run-dir relative
    return out.resolve()


def _converted(out: Path, identity: str) -> bool:
    """`out` holds the whole conversion of these inputs (its record names them and its tokenizer.json is intact)."""
    from .files import sha256_file

    record_path = out / CONVERSION
    if not record_path.is_file() or not (out / TOKENIZER_JSON).is_file():
        return False
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return (isinstance(record, dict) and record.get("digest") == identity
            and record.get("tokenizer_json_sha256") == sha256_file(out / TOKENIZER_JSON))


def take_conversions() -> dict[str, dict[str, Any]]:
    """The conversions made in this process since the last call, by config key: the stage that made them records
    them in its manifest (runtime/stage.py)."""
    done = dict(_CONVERSIONS)
    _CONVERSIONS.clear()
    return done


def convert_sentencepiece(path: Path, out: Path, key: str = "") -> dict[str, Any]:
    """Write the fast tokenizer of the SentencePiece-only directory `path` into `out`; returns what to record.

    transformers' own class for the directory (from its tokenizer_config.json) gives the vocabulary layout, the
    special tokens and how they frame a text; the pieces' model (Unigram or BPE, with scores and merges), the
    normalizer and the pre-tokenizer follow the SentencePiece model's own settings (transformers' SpmConverter),
    because transformers 5's family classes assume one model type (XLMRobertaTokenizer builds a Unigram even over a
    BPE model). The result is saved, loaded back with stock AutoTokenizer, and must give SentencePiece's pieces on
    every sample text (the first text that differs is the one-line error) and frame a text with the class's special
    tokens."""
    import sentencepiece
    import tokenizers
    import transformers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter

    where = f" ({key})" if key else ""
    model_file, proto, processor, kind, family = read_sentencepiece(path, key)
    config = json.loads((path / TOKENIZER_CONFIG).read_text(encoding="utf-8"))
    layout = family.get_vocab()
    pieces = [piece.piece for piece in proto.pieces]
    native_vocab: Any = ([(piece.piece, piece.score) for piece in proto.pieces] if kind == "unigram"
                         else {piece: i for i, piece in enumerate(pieces)})
    native = SpmConverter.build_tokenizer_from_spm_proto(proto, native_vocab, legacy=bool(config.get("legacy", True)))
    data = json.loads(native.to_str())
    by_id = sorted(layout, key=layout.__getitem__)
    scores = {piece.piece: piece.score for piece in proto.pieces}
    if kind == "unigram":  # tokens outside the SentencePiece model (XLM-R's <pad>, <mask>) score 0, as converted
        data["model"]["vocab"] = [[token, float(scores.get(token, 0.0))] for token in by_id]
        data["model"]["unk_id"] = layout[proto.trainer_spec.unk_piece]
    else:
        data["model"]["vocab"] = {token: layout[token] for token in by_id}
    family_backend = json.loads(family.backend_tokenizer.to_str())
    data["added_tokens"] = family_backend.get("added_tokens") or []
    data["post_processor"] = family_backend.get("post_processor")
    backend = backend_from_json(json.dumps(data, ensure_ascii=False))

    roles = {f"{role}_token": str(getattr(family, f"{role}_token")) for role in SPECIAL_ROLES
             if getattr(family, f"{role}_token", None) is not None}
    extra = [t for t in family.all_special_tokens if t not in roles.values()]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend, model_max_length=family.model_max_length, **roles,
        **({"additional_special_tokens": extra} if extra else {}),
    )
    save_tokenizer(fast, out)
    loaded = load_tokenizer(out, key)
    if loaded.get_vocab() != layout:
        raise HyperofaError(f"{path}: the converted vocabulary differs from {type(family).__name__}'s{where}")
    for role, token in roles.items():
        if getattr(loaded, f"{role}_id", None) != getattr(family, f"{role}_id", None):
            raise HyperofaError(f"{path}: the converted {role} has another id than {type(family).__name__}'s{where}")

    texts = sample_texts(processor, proto)
    same_as_sentencepiece(loaded, processor, texts, f"{path}: the converted tokenizer", where)
    if _framing(loaded, texts[0]) != _framing(family, texts[0]):
        raise HyperofaError(f"{path}: the converted tokenizer frames a text with {_framing(loaded, texts[0])}, "
                            f"{type(family).__name__} with {_framing(family, texts[0])}{where}")
    return {
        "converted": model_file.name,
        "model_type": kind,
        "family_class": type(family).__name__,
        "vocab_size": len(layout),
        "sample_texts": len(texts),
        "identical": True,
        "versions": {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
                     "sentencepiece": sentencepiece.__version__},
    }


def read_sentencepiece(path: Path, key: str = "") -> tuple[Path, Any, Any, str, Any]:
    """What a SentencePiece-only directory holds, read and checked without writing anything: (model file, its
    proto, a SentencePiece processor, "unigram" or "bpe", the tokenizer transformers' own class builds from the
    directory). The family's vocabulary must hold every piece of the model at gap-free ids (the layout the
    conversion keeps). The dry run reads a target tokenizer's pieces through this, before any conversion."""
    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2

    where = f" ({key})" if key else ""
    path = Path(path).expanduser()
    if not (path / TOKENIZER_CONFIG).is_file():
        raise HyperofaError(f"{path}: a SentencePiece tokenizer needs its {TOKENIZER_CONFIG} (the family and its "
                            f"special tokens){where}")
    model_file = next(path / name for name in SENTENCEPIECE_FILES if (path / name).is_file())
    try:
        proto = sentencepiece_model_pb2.ModelProto.FromString(model_file.read_bytes())
        processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    except Exception as exc:  # protobuf and sentencepiece raise their own types for a damaged file
        raise HyperofaError(f"{model_file}: not a SentencePiece model{where} ({exc.__class__.__name__})") from None
    kind = {1: "unigram", 2: "bpe"}.get(proto.trainer_spec.model_type)
    if kind is None:
        raise HyperofaError(f"{model_file}: SentencePiece model type {proto.trainer_spec.model_type} is neither "
                            f"Unigram nor BPE; it cannot be converted{where}")
    family = _load_family(path, where)
    layout = family.get_vocab()
    missing = [piece.piece for piece in proto.pieces if piece.piece not in layout]
    if missing or sorted(layout.values()) != list(range(len(layout))):
        problem = f"lacks the piece {missing[0]!r}" if missing else "has gaps in its ids"
        raise HyperofaError(f"{path}: the vocabulary {type(family).__name__} builds from {model_file.name} {problem}; "
                            f"it cannot be converted{where}")
    return model_file, proto, processor, kind, family


SPECIAL_ROLES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")


def _framing(tokenizer: Any, text: str) -> tuple[list[int], list[int]]:
    """The special-token ids a tokenizer puts before and after a text's own ids."""
    plain = tokenizer(text, add_special_tokens=False)["input_ids"]
    framed = tokenizer(text)["input_ids"]
    start = next((i for i in range(len(framed) - len(plain) + 1) if framed[i : i + len(plain)] == plain), 0)
    return framed[:start], framed[start + len(plain) :]


def same_as_sentencepiece(tokenizer: Any, processor: Any, texts: list[str], what: str, where: str = "") -> None:
    """`tokenizer` must encode every text (without special tokens) into the ids of SentencePiece's pieces; the first
    text that differs is the one-line error."""
    vocab = tokenizer.get_vocab()
    got = tokenizer(texts, add_special_tokens=False)["input_ids"]
    differing = [text for text, ids in zip(texts, got)
                 if ids != [vocab.get(processor.id_to_piece(i)) for i in processor.encode(text)]]
    if differing:
        raise HyperofaError(
            f"{what} encodes {differing[0][:60]!r} otherwise than SentencePiece ({len(differing)} of {len(texts)} "
            f"sample texts differ); it cannot be used{where}"
        )


def _load_family(path: Path, where: str) -> Any:
    """The tokenizer transformers' own class builds from the directory (its layout and special tokens)."""
    from transformers import AutoTokenizer

    from .models import quiet_transformers

    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # transformers raises many types for a directory it cannot read
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0][:200]
        raise HyperofaError(f"{path}: cannot load the SentencePiece tokenizer{where} ({exc.__class__.__name__}: "
                            f"{first})") from None


def sample_texts(processor: Any, proto: Any, n: int = SAMPLE_TEXTS) -> list[str]:
    """Texts that hold every normal piece of the SentencePiece model (pieces in a fixed shuffled order, cut into at
    most `n` runs and decoded), and a few fixed texts with spacing, digits, compatibility characters and scripts."""
    import numpy as np

    normal = np.array([i for i, piece in enumerate(proto.pieces) if piece.type == 1], dtype=np.int64)
    normal = normal[np.random.default_rng(0).permutation(len(normal))]
    width = max(4, -(-len(normal) // n))
    texts = [processor.decode([int(i) for i in normal[a : a + width]]) for a in range(0, len(normal), width)]
    return [text for text in (*texts, *FIXED_TEXTS) if text.strip()]


def save_tokenizer(tokenizer: Any, out_dir: str | Path) -> list[str]:
    """`save_pretrained` of an HF fast tokenizer, with a tokenizer_config.json any user can load; returns the names
    of the files written."""
    out_dir = Path(out_dir)
    tokenizer.save_pretrained(str(out_dir))
    portable_config(out_dir)
    return sorted(p.name for p in out_dir.iterdir() if p.is_file())


def portable_config(out_dir: str | Path) -> None:
    """Rewrite a saved tokenizer_config.json for transformers 4.x and 5.x alike: the stock `PreTrainedTokenizerFast`
    class (transformers 5 writes `TokenizersBackend`, which 4.x lacks; a family class would rebuild the pipeline
    from the vocabulary in 5.x instead of loading tokenizer.json), no keys of the machine that saved it (`is_local`,
    `local_files_only`, ...), and extra special tokens under the name both versions read."""
    from .files import atomic_write_bytes

    path = Path(out_dir) / TOKENIZER_CONFIG
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        raise HyperofaError(f"{path}: missing or not valid JSON") from None
    for key in MACHINE_LOCAL_KEYS:
        data.pop(key, None)
    data["tokenizer_class"] = STOCK_CLASS
    extra = data.get("extra_special_tokens")
    if isinstance(extra, list):  # 5.x writes a list here; 4.x wants a dict of named tokens here
        data.pop("extra_special_tokens")
        if extra:
            data["additional_special_tokens"] = extra
    text = json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))


def has_tokenizer(path: str | Path) -> bool:
    return (Path(path) / TOKENIZER_JSON).is_file()


def tokenizer_fingerprint(path: str | Path) -> dict[str, str]:
    found = fingerprint_dir(path, TOKENIZER_FILES)
    if TOKENIZER_JSON not in found:
        raise HyperofaError(f"{path}: not an HF fast tokenizer directory ({TOKENIZER_JSON} missing)")
    return found


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def load_tokenizer(name: str | Path, key: str = "", run_dir: str | Path | None = None) -> Any:
    """Stock `AutoTokenizer.from_pretrained` of a directory or HF hub name, fast (Rust) backends only.

    `key` names the config key the name came from, for the error line. A SentencePiece-only directory loads from
    its converted copy in `run_dir` (`tokenizer_dir`); without a run directory it is refused."""
    from transformers import AutoTokenizer

    where = f" ({key})" if key else ""
    text = str(name)
    path = Path(text).expanduser()
    if sentencepiece_only(path):
        if run_dir is None:
            raise HyperofaError(f"{text}: a SentencePiece tokenizer without {TOKENIZER_JSON}{where} is converted once "
                                "inside a run directory; none was given")
        path = tokenizer_dir(path, run_dir, key)
    local = path.exists()
    if not local and _looks_like_path(text):
        raise HyperofaError(f"{text}: tokenizer not found{where}")
    if local and not path.is_dir():
        raise HyperofaError(f"{text}: a tokenizer must be a directory{where}")
    if local and not any((path / name).is_file() for name in VOCABULARY_FILES):
        raise HyperofaError(
            f"{text}: no tokenizer files in the directory{where} (none of {', '.join(VOCABULARY_FILES)})"
        )
    # huggingface_hub logs every retry of an unreachable hub; the one-line error below says it all.
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path) if local else text)
    except Exception as exc:  # transformers/hub raise many types; the user needs the name and the first line
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0][:200]
        if local:
            raise HyperofaError(f"{text}: cannot load tokenizer{where} ({exc.__class__.__name__}: {first})") from None
        offline = any(os.environ.get(v, "") not in ("", "0") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
        hint = "the hub is offline (HF_HUB_OFFLINE); " if offline else ""
        raise HyperofaError(
            f"{text}: tokenizer is not a local directory and cannot be loaded from the HF hub{where} "
            f"({hint}{exc.__class__.__name__}: {first})"
        ) from None
    finally:
        hub_log.setLevel(level)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise HyperofaError(f"{text}: tokenizer has no fast (tokenizers) backend{where}")
    if backend.truncation is not None:
        backend.no_truncation()
    if backend.padding is not None:
        backend.no_padding()
    return tokenizer


def file_settings(name: str | Path) -> dict[str, Any]:
    """The truncation and padding a local tokenizer directory's tokenizer.json asks for (absent when none)."""
    path = Path(name).expanduser() / TOKENIZER_JSON
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise HyperofaError(f"{path}: not valid JSON") from None
    return {key: data[key] for key in ("truncation", "padding") if data.get(key) is not None}


def ignored_settings(dirs: dict[str, Any], say: Any = None) -> dict[str, Any]:
    """{"tokenizer_settings_ignored": {key: settings}} for the tokenizer directories (by config key) whose
    tokenizer.json asks for truncation or padding, which every load here drops; {} when none does. `say` gets one
    line naming them."""
    found = {key: file_settings(path) for key, path in dirs.items() if path is not None}
    found = {key: settings for key, settings in found.items() if settings}
    if found and say is not None:
        say(f"ignored the truncation and padding set in the tokenizer.json of {', '.join(sorted(found))} "
            "(they would cut or pad text; recorded in the manifest)")
    return {"tokenizer_settings_ignored": found} if found else {}


def source_tokenizer(config: Any) -> Any:
    """The source tokenizer: `source.tokenizer`, else the source model's (`source.model`)."""
    key = "source.tokenizer" if config.source.tokenizer else "source.model"
    return load_tokenizer(config.source.tokenizer or config.source.model, key, config.run_dir)


def backend_json(tokenizer: Any) -> str:
    """The Rust tokenizer behind an HF fast tokenizer, serialized: what Ray ships to the workers."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise HyperofaError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')} is not a fast (Rust) tokenizer")
    return backend.to_str()


def backend_from_json(text: str) -> Any:
    """The Rust tokenizer a JSON describes, Unigram scores exactly as written, without truncation or padding."""
    from tokenizers import Tokenizer, models

    tokenizer = Tokenizer.from_str(text)
    tokenizer.no_truncation()
    tokenizer.no_padding()
    model = json.loads(text).get("model") or {}
    if model.get("type") == "Unigram":
        vocab = [(piece, float(score)) for piece, score in model["vocab"]]
        tokenizer.model = models.Unigram(vocab, model.get("unk_id"), model.get("byte_fallback", False))
    return tokenizer


def fresh_word_cache(backend: Any) -> None:
    """Empty the word cache of the backend's model (BPE and Unigram keep one) before a new unit of text.

    The cache memoises each word's pieces, but it stops admitting words once full (10,000 by default) and never
    evicts: a worker that tokenizes one language after another would keep the first language's words for good and
    miss on nearly every word of the others (prepare's tokenizing ran 1.25x slower on interleaved languages than
    on the same text language by language). Emptied per unit, it fills with that unit's own frequent words. The
    pieces are the same either way: the cache only memoises."""
    clear = getattr(backend.model, "_clear_cache", None)  # WordPiece and WordLevel keep no cache
    if clear is not None:
        clear()


_WORKER_BACKENDS: dict[int, Any] = {}


def worker_backend(text: str) -> Any:
    """`backend_from_json(text)` cached per process: Ray reuses worker processes across tasks, and loading a
    large vocabulary per task would cost more than a small task's work."""
    key = hash(text)
    if key not in _WORKER_BACKENDS:
        if len(_WORKER_BACKENDS) >= 4:  # a stage alternates between at most two tokenizers; keep those
            _WORKER_BACKENDS.clear()
        _WORKER_BACKENDS[key] = backend_from_json(text)
    return _WORKER_BACKENDS[key]


def frame_ids(tokenizer: Any, where: str | Path) -> tuple[int, int]:
    """(cls or bos id, sep or eos id): the tokens that open and close a packed block (`<s>`/`</s>`, `[CLS]`/`[SEP]`).

    A causal LM without a BOS token (Qwen2: documents are only separated by `<|endoftext|>`) opens its blocks with
    its EOS token as well."""
    def first(*roles: str) -> Any:
        for role in roles:
            token_id = getattr(tokenizer, f"{role}_token_id", None)
            if token_id is not None:
                return int(token_id)
        return None

    cls, sep = first("cls", "bos", "eos"), first("sep", "eos")
    if cls is None or sep is None:
        raise HyperofaError(f"{where}: no cls/bos and sep/eos token found in the tokenizer's vocabulary")
    return cls, sep
