"""The hypernet stage's output, `<run.dir>/hypernet/`: the trained hypernetwork and its predictions.

    model.pt                     best weights by validation loss (a state dict; the word table is not in it)
    model_config.json            architecture and sizes to rebuild the model (`method.hypernet.models.model_from_spec`)
    metrics.jsonl                one line per epoch: train and validation losses, lr
    train_state.json             how the job ended: finished, last and best epoch, early stop
    predicted_ids.npy            target token ids that got a prediction (int64, ascending)
    predicted_coordinates.npy    their predicted coordinates, float32 [n, k]
    test_ids.npy                 the source tokens of the test split
    test_coordinates.npy         their predictions (to compare with F_s)
    test_metrics.json            test-split cosine and L1, and how many target tokens were predicted
    audit/                       with hypernet.data_audit: the token ids each rank trained on per epoch
    (job.json, ds_config.json and checkpoints/ are the DeepSpeed job directory: formats/jobdir.py)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..errors import HyperofaError
from .files import atomic_write_bytes, atomic_write_json, load_npy, read_json, save_npy
from .rundir import Stage

STAGE = "hypernet"
BEST_MODEL = "model.pt"
MODEL_SPEC = "model_config.json"
METRICS = "metrics.jsonl"
TRAIN_STATE = "train_state.json"
PREDICTED_IDS = "predicted_ids.npy"
PREDICTED_ROWS = "predicted_coordinates.npy"
TEST_IDS = "test_ids.npy"
TEST_ROWS = "test_coordinates.npy"
TEST_METRICS = "test_metrics.json"
AUDIT = "audit"
# The files a finished hypernet stage lists in its manifest (with the job's ds_config.json).
OUTPUTS = (BEST_MODEL, MODEL_SPEC, METRICS, PREDICTED_IDS, PREDICTED_ROWS, TEST_IDS, TEST_ROWS, TEST_METRICS)


def stage_of(run_dir: str | Path) -> Stage:
    return Stage(run_dir, STAGE)


def save_torch(path: Path, obj: Any) -> Path:
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def write_model_spec(out: Path, spec: dict[str, Any]) -> Path:
    return atomic_write_json(out / MODEL_SPEC, spec)


def read_model_spec(out: Path) -> dict[str, Any]:
    return read_json(out / MODEL_SPEC, "hypernetwork model spec")


def write_metrics(out: Path, history: list[dict[str, Any]]) -> Path:
    import json

    return atomic_write_bytes(out / METRICS, "".join(json.dumps(r, sort_keys=True) + "\n" for r in history).encode())


def write_train_state(out: Path, state: dict[str, Any]) -> Path:
    return atomic_write_json(out / TRAIN_STATE, state)


def read_train_state(out: Path) -> dict[str, Any]:
    if not (out / TRAIN_STATE).is_file():
        raise HyperofaError(f"{out / TRAIN_STATE}: the training job ended without writing its state")
    return read_json(out / TRAIN_STATE, "hypernetwork training state")


def audit_path(out: Path, epoch: int, rank: int) -> Path:
    return out / AUDIT / f"epoch{epoch:05d}_rank{rank}.npy"


def write_predictions(out: Path, ids: np.ndarray, rows: np.ndarray) -> None:
    save_npy(out / PREDICTED_IDS, np.asarray(ids, dtype=np.int64))
    save_npy(out / PREDICTED_ROWS, np.asarray(rows, dtype=np.float32))


def write_test_predictions(out: Path, ids: np.ndarray, rows: np.ndarray, metrics: dict[str, Any]) -> None:
    save_npy(out / TEST_IDS, np.asarray(ids, dtype=np.int64))
    save_npy(out / TEST_ROWS, np.asarray(rows, dtype=np.float32))
    atomic_write_json(out / TEST_METRICS, metrics)


def read_test_metrics(out: Path) -> dict[str, Any]:
    return read_json(out / TEST_METRICS, "hypernetwork test metrics")


def _prediction_pair(root: Path, ids_name: str, rows_name: str) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(load_npy(root / ids_name, what="predicted token ids"))
    rows = np.asarray(load_npy(root / rows_name, what="predicted coordinates"), dtype=np.float32)
    if not np.issubdtype(ids.dtype, np.integer):
        raise HyperofaError(f"{root / ids_name}: token ids must be integers, got {ids.dtype}")
    if ids.ndim != 1 or rows.ndim != 2 or len(ids) != len(rows):
        raise HyperofaError(f"{root / rows_name}: {rows.shape} rows do not fit the {ids.shape} ids of {ids_name}")
    return ids.astype(np.int64), rows


def load_predictions(run_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(target token ids [n], predicted coordinates [n, k]) of a finished hypernet stage."""
    stage = stage_of(run_dir)
    stage.require()
    return _prediction_pair(stage.path, PREDICTED_IDS, PREDICTED_ROWS)


def load_test_predictions(run_dir: str | Path) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """The hypernetwork's predictions for the source tokens of the test split, when it wrote them."""
    root = stage_of(run_dir).path
    if not (root / TEST_IDS).is_file():
        return None
    return _prediction_pair(root, TEST_IDS, TEST_ROWS)
