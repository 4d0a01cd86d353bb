"""What the hypernetwork stage reads from `<run_dir>/mapping/`, checked before any training starts.

Checks (each a one-line HyperofaError naming the file or key): the mapping stage completed; the postings were
built from the configured word vectors (the fingerprint recorded in the mapping manifest); the configured k is the
mapping's k; shapes agree (F_s rows = source vocabulary, word ids inside the table, one word dimension); and the
training split, restricted to tokens that have postings, is not empty.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..artifacts import Stage, digest, fingerprint_path
from ..config import Config
from ..errors import HyperofaError
from .data import Postings

FILES = (
    "postings_source.npz",
    "postings_target.npz",
    "word_vectors.npy",
    "coordinates_source.npy",
    "overlap.npz",
    "split.npz",
)


@dataclass
class MappingInputs:
    path: Path
    manifest: dict[str, Any]
    k: int
    word_dim: int
    n_words: int
    splits: dict[str, np.ndarray]  # train / val / test, restricted to tokens with postings
    without_postings: dict[str, int]

    @property
    def word_vectors(self) -> Path:
        return self.path / "word_vectors.npy"

    def source_postings(self) -> Postings:
        return Postings.load(self.path / "postings_source.npz")

    def target_postings(self) -> Postings:
        return Postings.load(self.path / "postings_target.npz")

    def coordinates(self) -> np.ndarray:
        return np.load(self.path / "coordinates_source.npy")

    def copied_target_ids(self) -> np.ndarray:
        with np.load(self.path / "overlap.npz") as data:
            return np.asarray(data["target_ids"], dtype=np.int64)

    def identity(self) -> str:
        """Digest of the mapping outputs this stage depends on (their sha256s from the mapping manifest)."""
        return digest(self.manifest.get("outputs", []))


def configured_vectors_path(config: Config) -> Optional[Path]:
    """The word-vector file the config names: vectors.path, or the vectors stage's default output if it exists."""
    section = getattr(config, "vectors", None)
    path = getattr(section, "path", None) if section is not None else None
    if path:
        return Path(path)
    default = config.run_dir / "vectors" / "vectors.kv"
    return default if default.is_file() else None


def configured_k(config: Config) -> Optional[int]:
    section = getattr(config, "mapping", None)
    return getattr(section, "num_primitives", None) if section is not None else None


def load_mapping(config: Config, *, check_vectors: bool = True) -> MappingInputs:
    stage = Stage(config.run_dir, "mapping")
    manifest = stage.require()
    where = stage.manifest_path
    for name in FILES:
        if not (stage.path / name).is_file():
            raise HyperofaError(f"{stage.path / name}: missing from the mapping stage output; re-run hyperofa mapping")
    inputs = manifest.get("inputs", {})
    counts = manifest.get("counts", {})

    vectors = configured_vectors_path(config)
    if check_vectors and vectors is not None:
        recorded = (inputs.get("vectors") or {}).get("fingerprint")
        actual = fingerprint_path(vectors)
        if recorded != actual:
            raise HyperofaError(
                f"{where}: postings were built from other word vectors than vectors.path={vectors} "
                f"(fingerprint {str(recorded)[:12]} vs {actual[:12]}); re-run hyperofa mapping"
            )

    coords = np.load(stage.path / "coordinates_source.npy", mmap_mode="r")
    if coords.ndim != 2:
        raise HyperofaError(f"{stage.path / 'coordinates_source.npy'}: expected a [V_s, k] matrix, got {coords.shape}")
    k = int(coords.shape[1])
    mapping_k = inputs.get("k", counts.get("k", k))
    wanted = configured_k(config)
    if wanted is not None and int(wanted) != int(mapping_k):
        raise HyperofaError(
            f"{where}: the mapping was built with k={mapping_k}, the config asks for mapping.num_primitives={wanted}; "
            "re-run hyperofa mapping or set mapping.num_primitives"
        )
    if counts.get("k", k) != k:
        raise HyperofaError(f"{where}: counts.k={counts.get('k')} but coordinates_source.npy has k={k}")

    table = np.load(stage.path / "word_vectors.npy", mmap_mode="r")
    if table.ndim != 2 or table.shape[0] == 0:
        raise HyperofaError(f"{stage.path / 'word_vectors.npy'}: expected a non-empty [n_words, dim] matrix")
    n_words, word_dim = int(table.shape[0]), int(table.shape[1])

    source = Postings.load(stage.path / "postings_source.npz")
    if source.vocab_size != coords.shape[0]:
        raise HyperofaError(
            f"{stage.path / 'postings_source.npz'}: {source.vocab_size} tokens, but F_s has {coords.shape[0]} rows"
        )
    for name, postings in (("postings_source.npz", source), ("postings_target.npz", Postings.load(stage.path / "postings_target.npz"))):
        if len(postings.indices) and (int(postings.indices.max()) >= n_words or int(postings.indices.min()) < 0):
            raise HyperofaError(f"{stage.path / name}: word indices outside the {n_words}-row word table")

    splits: dict[str, np.ndarray] = {}
    without: dict[str, int] = {}
    with np.load(stage.path / "split.npz") as data:
        for part in ("train", "val", "test"):
            if part not in data:
                raise HyperofaError(f"{stage.path / 'split.npz'}: array {part!r} missing")
            ids = np.asarray(data[part], dtype=np.int64)
            if len(ids) and (ids.min() < 0 or ids.max() >= source.vocab_size):
                raise HyperofaError(f"{stage.path / 'split.npz'}: {part} ids outside the source vocabulary")
            covered = source.lengths(ids) > 0
            splits[part], without[part] = ids[covered], int((~covered).sum())
    if len(splits["train"]) == 0:
        raise HyperofaError(f"{stage.path / 'split.npz'}: the training split is empty (no source token with postings)")
    return MappingInputs(stage.path, manifest, k, word_dim, n_words, splits, without)
