"""Where the target tokenizer lives and how its identity is fingerprinted, for every stage that reads it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .artifacts import fingerprint_dir
from .config import Config
from .errors import HyperofaError

# The files that define an HF tokenizer; their sha256 is the tokenizer's identity in manifests.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "sentencepiece.bpe.model",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
)


def target_tokenizer_dir(config: Config) -> Path:
    """`tokenizer.path` when set, else `<run.dir>/tokenizer` (written by `hyperofa tokenizer`)."""
    path = Path(config.tokenizer.path) if config.tokenizer.path else config.run_dir / "tokenizer"
    if not (path / "tokenizer.json").is_file():
        hint = "" if config.tokenizer.path else "; run `hyperofa tokenizer` first or set tokenizer.path"
        raise HyperofaError(f"{path}: no target tokenizer (tokenizer.json missing){hint}")
    return path.resolve()


def tokenizer_fingerprint(path: str | Path) -> dict[str, str]:
    found = fingerprint_dir(path, TOKENIZER_FILES)
    if "tokenizer.json" not in found:
        raise HyperofaError(f"{path}: not an HF fast tokenizer directory (tokenizer.json missing)")
    return found


def load_tokenizer(path: str | Path) -> Any:
    """Stock AutoTokenizer load, with a one-line error instead of a stack trace."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # transformers raises many types for a broken or missing directory
        raise HyperofaError(f"{path}: cannot load tokenizer ({exc.__class__.__name__}: {str(exc)[:160]})") from None
