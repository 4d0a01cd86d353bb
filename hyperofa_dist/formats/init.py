"""The init stage's output, `<run.dir>/init/<method>/`: the expanded model and how each of its rows was made.

    F_t.npy                  target coordinates, float32 [V_t, k]
    P.npy                    the primitives P [k, D] (the source's, reused): E_t = F_t P
    provenance.npy           uint8 [V_t]: 0 copy, 1 hyperofa, 2 ofa, 3 random, 4 mean (`method.assemble.PROVENANCE_NAMES`)
    provenance_counts.json   those counts overall, per word language and per script
    quality.json             `heldout_cosine` (each method's coordinate cosine on the hypernetwork's test split),
                             `test_tokens`, `new_token_mlm` or `new_token_causal` (step-0 loss per language and
                             positions), `rows` (statistics of the rows of F_t P per provenance group, init/rows.py)
    model/                   stock HF masked or causal LM + the target tokenizer (AutoModelForMaskedLM or
                             AutoModelForCausalLM loads it)
    manifest.json
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import HyperofaError
from .files import atomic_write_json, load_npy, save_npy
from .rundir import PerMethod

STAGE = "init"
COORDINATES = "F_t.npy"
PRIMITIVES = "P.npy"
PROVENANCE = "provenance.npy"
PROVENANCE_COUNTS = "provenance_counts.json"
QUALITY = "quality.json"
MODEL = "model"
FACTORS = (COORDINATES, PRIMITIVES)


LAYOUT = PerMethod(STAGE, MODEL)  # `<run.dir>/init/<method>/`, the model in `model/`
stage_of, model_dir, method_of = LAYOUT.stage_of, LAYOUT.model_dir, LAYOUT.method_of


def write_arrays(out: Path, coordinates: np.ndarray, primitives: np.ndarray, provenance: np.ndarray,
                 counts: dict[str, Any], quality: dict[str, Any]) -> list[str]:
    names = save_factors(out, coordinates, primitives)
    save_npy(out / PROVENANCE, provenance)
    atomic_write_json(out / PROVENANCE_COUNTS, counts)
    atomic_write_json(out / QUALITY, quality)
    return [*names, PROVENANCE, PROVENANCE_COUNTS, QUALITY]


def save_factors(out: Path, coordinates: np.ndarray, primitives: np.ndarray) -> list[str]:
    """F_t.npy and P.npy into `out`, beside a model directory: the factorised form of that model (init writes
    it for every method; pretrain writes it after factorised training, for users who continue factorised)."""
    save_npy(out / COORDINATES, coordinates)
    save_npy(out / PRIMITIVES, primitives)
    return [COORDINATES, PRIMITIVES]


def factors_beside(model_path: Path) -> Path | None:
    """The directory holding the factorised form of a model directory (its parent, as init and pretrain write
    it), or None when there is none."""
    parent = Path(model_path).parent
    return parent if (parent / COORDINATES).is_file() and (parent / PRIMITIVES).is_file() else None


def load_factors(init_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(F_t memory-mapped, P) of an init (or factorised pretrain) output, checked to fit each other."""
    coordinates = load_npy(init_dir / COORDINATES, mmap=True, what="target coordinates")
    primitives = load_npy(init_dir / PRIMITIVES, what="primitives")
    if coordinates.ndim != 2 or primitives.ndim != 2 or coordinates.shape[1] != primitives.shape[0]:
        raise HyperofaError(f"{init_dir}: {COORDINATES} {coordinates.shape} and {PRIMITIVES} {primitives.shape} do not fit")
    return coordinates, primitives


def find_provenance(model_path: Path) -> Path:
    """The provenance beside a model directory (`init/<method>/model` -> `init/<method>/provenance.npy`)."""
    for candidate in (model_path.parent / PROVENANCE, model_path / PROVENANCE):
        if candidate.is_file():
            return candidate
    raise HyperofaError(
        f"{model_path}: no {PROVENANCE} beside the model (which rows were copied); the embedding warm-up needs "
        "a model written by the init stage"
    )


def load_provenance(path: Path) -> np.ndarray:
    provenance = load_npy(path, what="provenance")
    if provenance.ndim != 1 or provenance.dtype != np.uint8:
        raise HyperofaError(f"{path}: provenance must be uint8 [V_t], got {provenance.dtype} {provenance.shape}")
    return provenance
