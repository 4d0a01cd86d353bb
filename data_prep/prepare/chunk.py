"""One unit of prepare's work, no Ray: read, normalise, select, tokenize, pack and shard a (language, chunk).

`process_chunk` writes the chunk's shards and, last, its record `chunks/{lang}-{chunk:05d}.json` (counts, plan and
shard hashes): a chunk counts as finished only once all of its shards are in place, and a retried task rewrites
identical bytes. The record format is private to this stage; later stages read the manifest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from hyperofa_dist.errors import HyperofaError
from hyperofa_dist.formats.corpus import Unit, normalize_line, read_unit, read_unit_sentences
from hyperofa_dist.formats.files import atomic_write_json
from hyperofa_dist.formats.shards import SPLITS, build_shards, write_shard

from .packing import Specials, flatten_ids, pack_sentences
from .sampling import ChunkPlan, kept_order, select_sentences, unbudgeted_plan

RECORDS = "chunks"


# --- what a task gets ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    stage_dir: str
    specials: Specials
    seed: int
    normalization: str
    heldout_fraction: float
    block_size: int
    blocks_per_sample: int
    samples_per_shard: int
    batch_size: int


@dataclass(frozen=True)
class ChunkJob:
    unit: Unit
    plan: Optional[ChunkPlan]  # None: keep every sentence once, the task plans from its own sentence count
    record_digest: str
    keep_existing: bool  # True: the chunk was finished before and lost shards; leave the others untouched


# --- the core --------------------------------------------------------------------------------------------------


def count_unit(unit: Unit, normalization: str) -> int:
    """Non-empty sentences of a unit after normalisation: the n the sampling plan is built from."""
    return sum(1 for raw in read_unit(unit) if normalize_line(raw, normalization)[0])


def encode(tokenizer: Any, sentences: list[str], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat uint32 ids and per-sentence offsets from the Rust tokenizer's batched encoder (no specials)."""
    batches = (
        tokenizer.encode_batch_fast(sentences[start : start + batch_size], add_special_tokens=False)
        for start in range(0, len(sentences), batch_size)
    )
    return flatten_ids(encoding.ids for batch in batches for encoding in batch)


def record_path(stage_dir: Path, lang: str, chunk: int) -> Path:
    return stage_dir / RECORDS / f"{lang}-{chunk:05d}.json"


def process_chunk(job: ChunkJob, settings: Settings, tokenizer: Any) -> dict[str, Any]:
    """Read, normalise, select, tokenize, pack and shard one unit; write its record; return the record."""
    unit, plan = job.unit, job.plan
    sentences, line_stats = read_unit_sentences(unit, settings.normalization)
    if plan is None:
        plan = unbudgeted_plan(len(sentences), settings.heldout_fraction)
    elif len(sentences) != plan.n:
        raise HyperofaError(
            f"{unit.path}: chunk {unit.chunk} of {unit.lang} has {len(sentences)} sentences now but had {plan.n} "
            "when counted; the corpus changed during prepare"
        )
    heldout, multiplicity = select_sentences(plan, settings.seed, unit.lang, unit.chunk)
    needed = np.union1d(np.flatnonzero(multiplicity), heldout)
    flat, offsets = encode(tokenizer, [sentences[i] for i in needed], settings.batch_size)
    orders = {
        "train": np.searchsorted(needed, kept_order(multiplicity)),
        "heldout": np.searchsorted(needed, heldout),
    }
    stage_dir = Path(settings.stage_dir)
    stats: dict[str, int] = {
        "lines": line_stats.lines,
        "empty": line_stats.empty,
        "invalid_utf8": line_stats.invalid_utf8,
        "cr_line_ends": line_stats.cr_line_ends,
        "sentences": plan.n,
        "train_unique": int(np.count_nonzero(multiplicity)),
        "encoded_tokens": int(flat.size),
    }
    shards: list[dict[str, Any]] = []
    for split in SPLITS:
        # Held-out text shorter than one block still gives one (padded) block; training blocks are never padded.
        packed = pack_sentences(
            flat, offsets, orders[split], settings.block_size, settings.specials, pad_short=split == "heldout"
        )
        n_shards = 0
        for shard in build_shards(
            packed.blocks, unit.lang, unit.chunk, settings.blocks_per_sample, settings.samples_per_shard
        ):
            relative = f"{split}/{shard.name}"
            write_shard(stage_dir / relative, shard.data, job.keep_existing)
            shards.append(
                {
                    "path": relative,
                    "bytes": len(shard.data),
                    "sha256": shard.sha256,
                    "split": split,
                    "lang": unit.lang,
                    "chunk": unit.chunk,
                    "index": shard.index,
                    "blocks": shard.blocks,
                }
            )
            n_shards += 1
        stats.update(
            {
                f"{split}_sentences": packed.sentences,
                f"{split}_tokens": packed.tokens,
                f"{split}_tokens_in_blocks": packed.tokens_in_blocks,
                f"{split}_tokens_lost": packed.tokens_lost,
                f"{split}_blocks": int(packed.blocks.shape[0]),
                f"{split}_padded_blocks": packed.padded_blocks,
                f"{split}_shards": n_shards,
            }
        )
    record = {
        "digest": job.record_digest,
        "lang": unit.lang,
        "chunk": unit.chunk,
        "plan": asdict(plan),
        "stats": stats,
        "shards": shards,
    }
    # The record goes last: a chunk counts as finished only once all of its shards are in place.
    atomic_write_json(record_path(stage_dir, unit.lang, unit.chunk), record)
    return record


