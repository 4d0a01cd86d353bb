"""Deterministic webdataset shards: identical blocks give byte-identical tar files.

A shard is `{lang}/{lang}-{chunk:05d}-{index:06d}.tar` under its split's directory (`train/`, `heldout/`). Each
sample holds up to `blocks_per_sample` blocks as one `input_ids.npy` (uint32 `[n, block_size]`) plus
`lang.txt`, so no tar member is tiny. Every header field that could vary between runs or machines (mtime,
uid/gid, owner names, mode) is fixed, which is what lets a retried or re-run task rewrite identical bytes.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from hyperofa_dist.artifacts import atomic_write_bytes


def shard_name(lang: str, chunk: int, index: int) -> str:
    return f"{lang}/{lang}-{chunk:05d}-{index:06d}.tar"


def sample_key(lang: str, chunk: int, sample: int) -> str:
    # webdataset splits a member name at its first dot, so keys must not contain one.
    return f"{lang}-{chunk:05d}-{sample:08d}"


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A tar archive of (name, data) members with every run-dependent header field fixed."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o444
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@dataclass(frozen=True)
class Shard:
    name: str  # relative to the split directory
    index: int
    blocks: int
    data: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def build_shards(
    blocks: np.ndarray, lang: str, chunk: int, blocks_per_sample: int, samples_per_shard: int
) -> Iterator[Shard]:
    """The shards of one (language, chunk), in order; no shard at all when there is no block."""
    blocks_per_shard = blocks_per_sample * samples_per_shard
    lang_bytes = lang.encode("utf-8")
    for index, first in enumerate(range(0, blocks.shape[0], blocks_per_shard)):
        members = []
        stop = min(first + blocks_per_shard, blocks.shape[0])
        for start in range(first, stop, blocks_per_sample):
            key = sample_key(lang, chunk, start // blocks_per_sample)
            members.append((f"{key}.input_ids.npy", npy_bytes(blocks[start : min(start + blocks_per_sample, stop)])))
            members.append((f"{key}.lang.txt", lang_bytes))
        yield Shard(shard_name(lang, chunk, index), index, stop - first, tar_bytes(members))


def write_shard(path: Path, data: bytes, keep_existing: bool) -> bool:
    """Write under a temporary name, then rename; with keep_existing a file of the right size is left alone.

    Returns whether the file was (re)written.
    """
    if keep_existing and path.is_file() and path.stat().st_size == len(data):
        return False
    atomic_write_bytes(path, data)
    return True


def read_shard_blocks(path: str | Path) -> list[tuple[str, str, np.ndarray]]:
    """(key, lang, input_ids) of each sample of a shard, in order: for checks and tests without webdataset."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path, "r") as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return [
        (key, parts["lang.txt"].decode("utf-8"), np.load(io.BytesIO(parts["input_ids.npy"]), allow_pickle=False))
        for key, parts in samples.items()
    ]
