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
    """`tokenizer.path` when set, else `<run.dir>/tokenizer` (written by `hyperofa tokenizer`)."""
    path = Path(config.tokenizer.path) if config.tokenizer.path else config.run_dir / STAGE
    if not (path / TOKENIZER_JSON).is_file():
        hint = "" if config.tokenizer.path else "; run `hyperofa tokenizer` first or set tokenizer.path"
        raise HyperofaError(f"{path}: no target tokenizer ({TOKENIZER_JSON} missing){hint}")
    return path.resolve()


def has_tokenizer(path: str | Path) -> bool:
    return (Path(path) / TOKENIZER_JSON).is_file()


def tokenizer_fingerprint(path: str | Path) -> dict[str, str]:
    found = fingerprint_dir(path, TOKENIZER_FILES)
    if TOKENIZER_JSON not in found:
        raise HyperofaError(f"{path}: not an HF fast tokenizer directory ({TOKENIZER_JSON} missing)")
    return found


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def load_tokenizer(name: str | Path, key: str = "") -> Any:
    """Stock `AutoTokenizer.from_pretrained` of a directory or HF hub name, fast (Rust) backends only.

    `key` names the config key the name came from, for the error line."""
    from transformers import AutoTokenizer

    where = f" ({key})" if key else ""
    text = str(name)
    path = Path(text).expanduser()
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
    return load_tokenizer(config.source.tokenizer or config.source.model, key)


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
    """(cls or bos id, sep or eos id): the tokens that open and close a packed block (`<s>`/`</s>`, `[CLS]`/`[SEP]`)."""
    def first(*roles: str) -> Any:
        for role in roles:
            token_id = getattr(tokenizer, f"{role}_token_id", None)
            if token_id is not None:
                return int(token_id)
        return None

    cls, sep = first("cls", "bos"), first("sep", "eos")
    if cls is None or sep is None:
        raise HyperofaError(f"{where}: no cls/bos and sep/eos token found in the tokenizer's vocabulary")
    return cls, sep
