"""Locating and loading the model under evaluation with stock HF classes, and checks every task shares."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ..errors import HyperofaError
from ..formats.models import CONFIG


def resolve_model_dir(spec: Optional[str], run_dir: Path) -> Path:
    """`evaluate.model` as given: an HF model directory, or a run stage such as `init/hyperofa` (its `model/`)."""
    if not spec:
        raise HyperofaError("evaluate.model is unset: give an HF model directory or a run stage such as init/hyperofa")
    direct = Path(spec)
    candidates = [direct, direct / "model"] if direct.is_absolute() else [
        direct, direct / "model", run_dir / spec, run_dir / spec / "model"
    ]
    for candidate in candidates:
        if (candidate / CONFIG).is_file():
            return candidate.resolve()
    tried = ", ".join(str(c) for c in candidates)
    raise HyperofaError(f"evaluate.model={spec!r}: no HF model directory ({CONFIG}) at {tried}")


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
