"""The mapping stage's output, `<run.dir>/mapping/`: everything the hypernetwork and the init stage read.

    postings_source.npz      CSR token -> word postings of the source tokenizer (`indptr` int64 [V_s+1],
                             `indices` int32, `spellings` uint8): the sorted word indices whose spellings yield the
                             token, and how many of each word's three spellings do (OFA's weight, 1-3)
    postings_target.npz      the same for the target tokenizer ([V_t+1])
    overlap.npz              copy pairs: `target_ids`, `source_ids`, `kinds` (0 special, 1 exact, 2 fuzzy)
    split.npz                `train`, `val`, `test`: covered source token ids for the hypernetwork
    coordinates_source.npy   F_s float32 [V_s, k]
    primitives.npy           P float32 [k, D] (the identity when k = D: no factorisation)
    word_vectors.npy         float32 [n_words, dim]: the kept word vectors, row i is word index i
    words.txt                word i's key (`iso:word`), one per line
    stats.json               coverage, overlap and factorisation statistics
    manifest.json            written last

`write_mapping` is the one writer (the stage, the synthetic mappings of tests and benchmarks); `load_mapping` the
one reader, which checks every file and the shapes that tie them together, so a damaged or foreign mapping is
one line naming the file, never a wrong model later.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from ..errors import HyperofaError
from .files import atomic_write_bytes, atomic_write_json, digest, load_npy, load_npz, npy_writer, save_npy, save_npz
from .rundir import MANIFEST, Stage, portable

STAGE = "mapping"
# Part of the mapping stage's inputs: a mapping written in an older layout is rebuilt, never misread.
# 2: postings carry per-posting spelling counts.
FORMAT_VERSION = 2
POSTINGS_SOURCE = "postings_source.npz"
POSTINGS_TARGET = "postings_target.npz"
OVERLAP = "overlap.npz"
SPLIT = "split.npz"
COORDINATES = "coordinates_source.npy"
PRIMITIVES = "primitives.npy"
WORD_VECTORS = "word_vectors.npy"
WORDS = "words.txt"
STATS = "stats.json"
FILES = (POSTINGS_SOURCE, POSTINGS_TARGET, OVERLAP, SPLIT, COORDINATES, PRIMITIVES, WORD_VECTORS, WORDS, STATS)
SPLITS = ("train", "val", "test")
WORD_CHUNK_ROWS = 65536


class Postings:
    """token id -> sorted word indices, as CSR arrays (`indptr` int64 [V+1], `indices` int32), with each posting's
    spelling count (`spellings` uint8, 1-3: how many of the word's spellings yield the token)."""

    def __init__(self, indptr: np.ndarray, indices: np.ndarray, spellings: Optional[np.ndarray] = None):
        self.indptr = np.asarray(indptr, dtype=np.int64)
        self.indices = np.asarray(indices)
        self.spellings = (
            np.ones(len(self.indices), dtype=np.uint8) if spellings is None else np.asarray(spellings, dtype=np.uint8)
        )

    @classmethod
    def load(cls, path: str | Path) -> "Postings":
        data = load_npz(path, ("indptr", "indices", "spellings"), what="postings")
        indptr, indices, spellings = data["indptr"], data["indices"], data["spellings"]
        if (
            indptr.ndim != 1 or indices.ndim != 1 or len(indptr) < 1 or indptr[0] != 0
            or indptr[-1] != len(indices) or np.any(np.diff(indptr) < 0)
        ):
            raise HyperofaError(f"{path}: indptr is not a valid CSR index for {len(indices)} postings")
        if spellings.shape != indices.shape or (len(spellings) and not 1 <= int(spellings.min()) <= int(spellings.max()) <= 3):
            raise HyperofaError(f"{path}: spelling counts must be 1-3, one per posting")
        return cls(indptr, indices, spellings)

    def save(self, path: str | Path) -> Path:
        return save_npz(path, indptr=self.indptr, indices=self.indices, spellings=self.spellings)

    @property
    def vocab_size(self) -> int:
        return len(self.indptr) - 1

    def lengths(self, token_ids: Optional[np.ndarray] = None) -> np.ndarray:
        if token_ids is None:
            return np.diff(self.indptr)
        token_ids = np.asarray(token_ids, dtype=np.int64)
        return self.indptr[token_ids + 1] - self.indptr[token_ids]

    def covered(self) -> np.ndarray:
        """Token ids with at least one word, ascending."""
        return np.flatnonzero(np.diff(self.indptr) > 0).astype(np.int64)

    def words(self, token_id: int) -> np.ndarray:
        return self.indices[self.indptr[token_id] : self.indptr[token_id + 1]]

    def spelling_counts(self, token_id: int) -> np.ndarray:
        return self.spellings[self.indptr[token_id] : self.indptr[token_id + 1]]


@dataclass
class MappingParts:
    """Everything `write_mapping` writes except the word vectors, which stream in separately."""

    source_postings: Postings
    target_postings: Postings
    overlap_target: np.ndarray
    overlap_source: np.ndarray
    overlap_kinds: np.ndarray
    split: dict[str, np.ndarray]
    coordinates: np.ndarray
    primitives: np.ndarray
    words: Sequence[str]
    stats: dict[str, Any] = field(default_factory=dict)


def write_word_vectors(
    path: Path, n_words: int, dim: int, blocks: Iterable[np.ndarray], keys: Sequence[str], source: str | Path
) -> None:
    """Stream word-vector rows into a float32 .npy (never the whole table in memory); non-finite rows are refused."""
    with npy_writer(path, np.float32, (n_words, dim)) as out:
        start = 0
        for block in blocks:
            block = np.asarray(block, dtype=np.float32)
            if not np.isfinite(block).all():
                bad = start + int(np.argmax(~np.isfinite(block).all(axis=1)))
                raise HyperofaError(f"{source}: vector of key {keys[bad]!r} is not finite")
            out[start : start + len(block)] = block
            start += len(block)
        if start != n_words:
            raise HyperofaError(f"{source}: {start} word-vector rows for {n_words} words")


def write_mapping(root: Path, parts: MappingParts, word_blocks: Iterable[np.ndarray], word_dim: int, vectors_source: str | Path) -> list[str]:
    """Write every mapping file into `root` (the manifest is the caller's, last); returns the file names."""
    parts.source_postings.save(root / POSTINGS_SOURCE)
    parts.target_postings.save(root / POSTINGS_TARGET)
    save_npz(root / OVERLAP, target_ids=parts.overlap_target, source_ids=parts.overlap_source, kinds=parts.overlap_kinds)
    save_npz(root / SPLIT, **parts.split)
    save_npy(root / COORDINATES, parts.coordinates)
    save_npy(root / PRIMITIVES, parts.primitives)
    write_word_vectors(root / WORD_VECTORS, len(parts.words), word_dim, word_blocks, parts.words, vectors_source)
    atomic_write_bytes(root / WORDS, ("\n".join(parts.words) + "\n").encode("utf-8"))
    atomic_write_json(root / STATS, parts.stats)
    return list(FILES)


@dataclass
class Mapping:
    """A checked mapping directory. Large arrays (F_s, the word table) are memory-mapped."""

    path: Path
    manifest: dict[str, Any]
    source_coordinates: np.ndarray  # F_s [V_s, k]
    primitives: np.ndarray  # P [k, D]
    source_postings: Postings
    target_postings: Postings
    overlap_target: np.ndarray
    overlap_source: np.ndarray
    split: dict[str, np.ndarray]
    word_vectors: np.ndarray  # [n_words, word_dim]

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
        return self.target_postings.vocab_size

    @property
    def n_words(self) -> int:
        return int(self.word_vectors.shape[0])

    @property
    def word_dim(self) -> int:
        return int(self.word_vectors.shape[1])

    @property
    def word_vectors_path(self) -> Path:
        return self.path / WORD_VECTORS

    @property
    def stats_path(self) -> Path:
        return self.path / STATS

    def words(self) -> list[str]:
        with open(self.path / WORDS, encoding="utf-8") as handle:
            words = [line.rstrip("\n") for line in handle]
        if len(words) != self.n_words:
            raise HyperofaError(f"{self.path / WORDS}: {len(words)} words but {WORD_VECTORS} has {self.n_words} rows")
        return words

    def identity(self) -> str:
        """Digest of the mapping's outputs (their sha256s from the manifest): what later stages depend on."""
        return digest(self.manifest.get("outputs", []))

    def where(self, name: str = MANIFEST) -> Path:
        return self.path / name

    # --- does this mapping belong to this run? (each a one-line error naming what differs) ------------------

    def require_vectors(self, vectors_path: Path) -> None:
        """Postings built from the word vectors this run names (their recorded fingerprint)."""
        from .files import fingerprint_path

        recorded = (self.manifest.get("inputs", {}).get("vectors") or {}).get("fingerprint")
        actual = fingerprint_path(vectors_path)
        if recorded != actual:
            raise HyperofaError(
                f"{self.where()}: postings were built from other word vectors than vectors.path={vectors_path} "
                f"(fingerprint {str(recorded)[:12]} vs {actual[:12]}); re-run hyperofa mapping"
            )

    def require_k(self, k: int) -> None:
        if int(k) != self.k:
            raise HyperofaError(
                f"{self.where()}: the mapping was built with k={self.k}, the config asks for mapping.num_primitives={k}; "
                "re-run hyperofa mapping or set mapping.num_primitives"
            )

    def require_source(self, identity: dict[str, Any], vocab: int, hidden_size: int) -> None:
        """Built for this source model: its recorded identity (name and file hashes) and its shapes."""
        recorded = self.manifest.get("inputs", {}).get("source")
        identity = portable(identity, self.path.parent)  # as the stage shell recorded it (run-dir-relative paths)
        if isinstance(recorded, dict):
            for key, value in identity.items():
                if key in recorded and recorded[key] != value:
                    raise HyperofaError(
                        f"{self.where()}: mapping was built for another source model "
                        f"(source.{key} {recorded[key]!r}, this run {value!r})"
                    )
        if self.source_vocab != vocab or self.hidden_size != hidden_size:
            raise HyperofaError(
                f"{self.where()}: mapping was built for another source model (F_s {self.source_coordinates.shape}, "
                f"P {self.primitives.shape}; the source model has {vocab} tokens, hidden size {hidden_size})"
            )

    def require_target(self, vocab: int, fingerprint: dict[str, str]) -> None:
        recorded = self.manifest.get("inputs", {}).get("target_tokenizer")
        if self.target_vocab != vocab or (recorded is not None and recorded != fingerprint):
            raise HyperofaError(f"{self.where()}: mapping was built for another target tokenizer; re-run `hyperofa mapping`")


def stage_of(run_dir: str | Path) -> Stage:
    return Stage(run_dir, STAGE)


def load_mapping(run_dir: str | Path) -> Mapping:
    """The mapping of a run directory, every file present and consistent with the others."""
    stage = stage_of(run_dir)
    manifest = stage.require()
    root = stage.path
    for name in FILES:
        if not (root / name).is_file():
            raise HyperofaError(f"{root / name}: missing from the mapping stage output; re-run hyperofa mapping")
    f_s = load_npy(root / COORDINATES, mmap=True, what="F_s")
    p = np.asarray(load_npy(root / PRIMITIVES, what="P"), dtype=np.float32)
    if f_s.ndim != 2 or p.ndim != 2 or f_s.shape[1] != p.shape[0]:
        raise HyperofaError(f"{root}: {COORDINATES} {f_s.shape} and {PRIMITIVES} {p.shape} do not fit")
    counts_k = (manifest.get("counts") or {}).get("k")
    if counts_k is not None and int(counts_k) != f_s.shape[1]:
        raise HyperofaError(f"{root / MANIFEST}: counts.k={counts_k} but {COORDINATES} has k={f_s.shape[1]}")
    table = load_npy(root / WORD_VECTORS, mmap=True, what="word table")
    if table.ndim != 2 or table.shape[0] == 0:
        raise HyperofaError(f"{root / WORD_VECTORS}: expected a non-empty [n_words, dim] matrix, got {table.shape}")
    source = Postings.load(root / POSTINGS_SOURCE)
    target = Postings.load(root / POSTINGS_TARGET)
    if source.vocab_size != f_s.shape[0]:
        raise HyperofaError(f"{root / POSTINGS_SOURCE}: covers {source.vocab_size} tokens but F_s has {f_s.shape[0]} rows")
    for name, postings in ((POSTINGS_SOURCE, source), (POSTINGS_TARGET, target)):
        if len(postings.indices) and (int(postings.indices.max()) >= len(table) or int(postings.indices.min()) < 0):
            raise HyperofaError(f"{root / name}: word indices outside the {len(table)}-row word table")
    overlap = load_npz(root / OVERLAP, ("target_ids", "source_ids"), what="copy pairs")
    overlap_target = np.asarray(overlap["target_ids"], dtype=np.int64)
    overlap_source = np.asarray(overlap["source_ids"], dtype=np.int64)
    if overlap_target.shape != overlap_source.shape or (
        len(overlap_target) and (overlap_target.max() >= target.vocab_size or overlap_source.max() >= source.vocab_size
                                 or min(overlap_target.min(), overlap_source.min()) < 0)
    ):
        raise HyperofaError(f"{root / OVERLAP}: copy pairs do not fit the two vocabularies")
    split = {name: np.asarray(ids, dtype=np.int64) for name, ids in load_npz(root / SPLIT, SPLITS, what="split").items()}
    for name, ids in split.items():
        if len(ids) and (ids.min() < 0 or ids.max() >= source.vocab_size):
            raise HyperofaError(f"{root / SPLIT}: {name} ids outside the source vocabulary")
    return Mapping(root, manifest, f_s, p, source, target, overlap_target, overlap_source, split, table)
