"""Locating and loading the model under evaluation with stock HF classes, and checks every task shares."""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Any, Iterator, Optional

from ..errors import HyperofaError


def resolve_model_dir(spec: Optional[str], run_dir: Path) -> Path:
    """`evaluate.model` as given: an HF model directory, or a run stage such as `init/hyperofa` (its `model/`)."""
    if not spec:
        raise HyperofaError("evaluate.model is unset: give an HF model directory or a run stage such as init/hyperofa")
    direct = Path(spec)
    candidates = [direct, direct / "model"] if direct.is_absolute() else [
        direct, direct / "model", run_dir / spec, run_dir / spec / "model"
    ]
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return candidate.resolve()
    tried = ", ".join(str(c) for c in candidates)
    raise HyperofaError(f"evaluate.model={spec!r}: no HF model directory (config.json) at {tried}")


def infer_init_method(model_dir: Path) -> Optional[str]:
    """`.../init/<method>/model` (where the init stage writes) names its method; anything else is unknown."""
    parts = model_dir.parts
    if len(parts) >= 3 and parts[-1] == "model" and parts[-3] == "init":
        return parts[-2]
    return None


def pick_device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise HyperofaError("evaluate.device=cuda but no CUDA device is available")
    return torch.device(name)


def stable_seed(*parts: Any) -> int:
    """A 63-bit seed from any values: independent streams per (seed, language) that do not shift when others change."""
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Loading an MLM checkpoint into AutoModel/…ForTokenClassification prints expected key reports; hide them."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)
        hf_logging.enable_progress_bar()


def load_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as exc:  # transformers raises many types for a broken or missing tokenizer
        raise HyperofaError(
            f"{model_dir}: cannot load the model's tokenizer ({exc.__class__.__name__}: {str(exc)[:160]})"
        ) from None


def load_model(model_dir: Path, auto_class: str, **kwargs: Any) -> Any:
    """`AutoModel`, `AutoModelForMaskedLM` or `AutoModelForTokenClassification`, stock, in eval mode."""
    import transformers

    cls = getattr(transformers, auto_class)
    try:
        with quiet_transformers():
            model = cls.from_pretrained(str(model_dir), **kwargs)
    except Exception as exc:  # a broken checkpoint surfaces as many exception types
        raise HyperofaError(f"{model_dir}: cannot load model ({exc.__class__.__name__}: {str(exc)[:200]})") from None
    return model.eval()


def check_vocabulary(tokenizer_size: int, embedding_rows: int, model_dir: Path) -> None:
    """Every id the tokenizer can emit must have an embedding row (rows beyond it, e.g. padding to x8, are fine)."""
    if tokenizer_size > embedding_rows:
        raise HyperofaError(
            f"{model_dir}: tokenizer has {tokenizer_size} tokens but the model's input embedding has "
            f"{embedding_rows} rows; the tokenizer does not belong to this model"
        )


def check_model_vocabulary(tokenizer: Any, model: Any, model_dir: Path) -> None:
    check_vocabulary(len(tokenizer), model.get_input_embeddings().num_embeddings, model_dir)


def hidden_state_index(layer: int, num_layers: int, model_dir: Path) -> int:
    """`evaluate.layer` -> index into `hidden_states` (0 = embeddings, L = output of layer L; negative from the top).

    The method uses the 8th layer of a 12-layer model; a smaller model must be asked for a layer it has, so the
    mismatch is an error rather than a silent clamp that would make numbers incomparable.
    """
    index = layer if layer >= 0 else num_layers + 1 + layer
    if not 0 <= index <= num_layers:
        raise HyperofaError(
            f"evaluate.layer={layer} but {model_dir} has {num_layers} layers; "
            f"use 0..{num_layers} (0 = embeddings) or a negative index such as -1 for the last layer"
        )
    return index
