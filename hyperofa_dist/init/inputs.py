"""Reading what the init stage consumes: `<run_dir>/mapping/` (the mapping contract) and the hypernetwork's
predictions in `<run_dir>/hypernet/`, validated so that a mismatch fails here with a one-line error instead of
producing a silently wrong model (METHOD_REFERENCE §7.4).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..artifacts import Stage
from ..errors import HyperofaError


@dataclass
class Mapping:
    path: Path
    manifest: dict[str, Any]
    source_coordinates: np.ndarray  # F_s [V_s, k] (memory-mapped)
    primitives: np.ndarray  # P [k, D]
    overlap_target: np.ndarray
    overlap_source: np.ndarray
    split_test: np.ndarray
    source_postings: tuple[np.ndarray, np.ndarray]
    target_postings: tuple[np.ndarray, np.ndarray]
    word_vectors: np.ndarray  # [n_words, word_dim] (memory-mapped)
    words_path: Path

    @property
    def k(self) -> int:
        return int(self.primitives.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.primitives.shape[1])

    @property
    def source_vocab(self) -> int:
        return int(self.source_coordinates.shape[0])

    @property
    def target_vocab(self) -> int:
        return len(self.target_postings[0]) - 1

    def words(self) -> list[str]:
        with open(self.words_path, encoding="utf-8") as handle:
            return [line.rstrip("\n") for line in handle]


def _npz(path: Path, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise HyperofaError(f"{path}: file not found (mapping stage output)")
    with np.load(path, allow_pickle=False) as data:
        missing = [n for n in names if n not in data.files]
        if missing:
            raise HyperofaError(f"{path}: missing arrays {missing}")
        return {n: data[n] for n in names}


def _npy(path: Path, mmap: bool = True) -> np.ndarray:
    if not path.is_file():
        raise HyperofaError(f"{path}: file not found")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except ValueError as exc:
        raise HyperofaError(f"{path}: not a plain .npy array ({exc})") from None


def _postings(path: Path) -> tuple[np.ndarray, np.ndarray]:
    data = _npz(path, ("indptr", "indices"))
    indptr, indices = data["indptr"].astype(np.int64, copy=False), data["indices"]
    if indptr.ndim != 1 or len(indptr) < 1 or indptr[0] != 0 or indptr[-1] != len(indices) or np.any(np.diff(indptr) < 0):
        raise HyperofaError(f"{path}: indptr is not a valid CSR index for {len(indices)} postings")
    return indptr, indices


def load_mapping(run_dir: str | Path) -> Mapping:
    stage = Stage(run_dir, "mapping")
    manifest = stage.require()
    root = stage.path
    f_s = _npy(root / "coordinates_source.npy")
    p = np.asarray(_npy(root / "primitives.npy", mmap=False), dtype=np.float32)
    if f_s.ndim != 2 or p.ndim != 2 or f_s.shape[1] != p.shape[0]:
        raise HyperofaError(f"{root}: coordinates_source.npy {f_s.shape} and primitives.npy {p.shape} do not fit")
    overlap = _npz(root / "overlap.npz", ("target_ids", "source_ids"))
    split = _npz(root / "split.npz", ("train", "val", "test"))
    source_postings = _postings(root / "postings_source.npz")
    target_postings = _postings(root / "postings_target.npz")
    vectors = _npy(root / "word_vectors.npy")
    mapping = Mapping(
        path=root,
        manifest=manifest,
        source_coordinates=f_s,
        primitives=p,
        overlap_target=overlap["target_ids"].astype(np.int64),
        overlap_source=overlap["source_ids"].astype(np.int64),
        split_test=split["test"].astype(np.int64),
        source_postings=source_postings,
        target_postings=target_postings,
        word_vectors=vectors,
        words_path=root / "words.txt",
    )
    if len(source_postings[0]) - 1 != mapping.source_vocab:
        raise HyperofaError(
            f"{root}: postings_source.npz covers {len(source_postings[0]) - 1} tokens but F_s has {mapping.source_vocab}"
        )
    for name, (_, indices) in (("postings_source.npz", source_postings), ("postings_target.npz", target_postings)):
        if len(indices) and (int(indices.max()) >= len(vectors) or int(indices.min()) < 0):
            raise HyperofaError(f"{root / name}: word index out of range of word_vectors.npy ({len(vectors)} rows)")
    if len(mapping.split_test) and (mapping.split_test.min() < 0 or mapping.split_test.max() >= mapping.source_vocab):
        raise HyperofaError(f"{root / 'split.npz'}: test ids out of range of the source vocabulary")
    return mapping


def check_mapping_matches(
    mapping: Mapping, source_vocab: int, hidden_size: int, target_vocab: int, target_fingerprint: dict[str, str]
) -> None:
    """A mapping built for another source model or target tokenizer is refused, naming what differs."""
    where = mapping.path / "manifest.json"
    if mapping.source_vocab != source_vocab or mapping.hidden_size != hidden_size:
        raise HyperofaError(
            f"{where}: mapping was built for another source model (F_s {mapping.source_coordinates.shape}, "
            f"P {mapping.primitives.shape}; the source model has {source_vocab} tokens, hidden size {hidden_size})"
        )
    recorded = mapping.manifest.get("inputs", {}).get("target_tokenizer")
    if mapping.target_vocab != target_vocab or (recorded is not None and recorded != target_fingerprint):
        raise HyperofaError(f"{where}: mapping was built for another target tokenizer; re-run `hyperofa mapping`")


def check_source_identity(mapping: Mapping, identity: dict[str, Any]) -> None:
    """Compare the source-model identity the mapping recorded (data_prep.mapping_stage.source_identity: name
    and, for a local model, its file hashes) with this run's, key by key."""
    recorded = mapping.manifest.get("inputs", {}).get("source")
    if not isinstance(recorded, dict):
        return
    for key, value in identity.items():
        if key in recorded and recorded[key] != value:
            raise HyperofaError(
                f"{mapping.path / 'manifest.json'}: mapping was built for another source model "
                f"(source.{key} {recorded[key]!r}, this run {value!r})"
            )


# --- hypernetwork predictions ------------------------------------------------------------------------------

# The hypernet stage's predict step names its files (hypernet/predict.py); read them under the same names.
from ..hypernet.predict import PREDICTED_IDS as PREDICTION_IDS  # noqa: E402
from ..hypernet.predict import PREDICTED_ROWS as PREDICTION_ROWS  # noqa: E402
from ..hypernet.predict import TEST_IDS as TEST_PREDICTION_IDS  # noqa: E402
from ..hypernet.predict import TEST_ROWS as TEST_PREDICTION_ROWS  # noqa: E402


def _prediction_pair(root: Path, ids_name: str, rows_name: str) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(_npy(root / ids_name, mmap=False))
    rows = np.asarray(_npy(root / rows_name, mmap=False), dtype=np.float32)
    if not np.issubdtype(ids.dtype, np.integer):
        raise HyperofaError(f"{root / ids_name}: token ids must be integers, got {ids.dtype}")
    return ids.astype(np.int64), rows


def load_predictions(run_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(target token ids [n], predicted coordinates [n, k]) written by the hypernetwork's predict step."""
    stage = Stage(run_dir, "hypernet")
    stage.require()
    return _prediction_pair(stage.path, PREDICTION_IDS, PREDICTION_ROWS)


def load_test_predictions(run_dir: str | Path) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """The hypernetwork's predictions for the source tokens of the test split, when it wrote them."""
    root = Stage(run_dir, "hypernet").path
    if not (root / TEST_PREDICTION_IDS).is_file():
        return None
    return _prediction_pair(root, TEST_PREDICTION_IDS, TEST_PREDICTION_ROWS)
