"""One unit of prepare's work, no Ray: read, normalise, select, tokenize, pack and shard a (language, chunk).

`process_chunk` writes the chunk's shards and, last, its record `chunks/{lang}-{chunk:05d}.json` (counts, plan and
shard hashes): a chunk counts as finished only once all of its shards are in place, and a retried task rewrites
identical bytes. Tasks write without fsync (one fsync after another was a tenth of the stage); the stage makes every
shard and record durable at once before its manifest names them, and a resumed stage checks each record's shards
(size and sha256), so what a crash lost in between is written again. The record format is private to this stage; later stages read the manifest.
"""

from __future__ import annotations

import gc
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from hyperofa_dist.errors import HyperofaError
from hyperofa_dist.formats.corpus import HELDOUT, Unit, read_unit_sentences
from hyperofa_dist.formats.files import atomic_write_json
from hyperofa_dist.formats.shards import SPLITS, build_shards, write_shard
from hyperofa_dist.formats.tokenizer import fresh_word_cache, worker_backend

from .packing import Specials, flatten_ids, pack_sentences
from .sampling import ChunkPlan, all_heldout_plan, kept_order, select_sentences, unbudgeted_plan

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
    holds_out: bool = True  # False: the language's held-out text is its published held-out split, not a fraction


# --- the core --------------------------------------------------------------------------------------------------


def count_unit(unit: Unit, normalization: str) -> int:
    """Non-empty sentences of a unit after normalisation: the n the sampling plan is built from."""
    return len(read_unit_sentences(unit, normalization)[0])


def encode(tokenizer: Any, sentences: list[str], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat uint32 ids and per-sentence offsets from the Rust tokenizer's batched encoder (no specials)."""
    fresh_word_cache(tokenizer)  # a worker's units come in any language order; the cache should serve this one's
    batches = (
        tokenizer.encode_batch_fast(sentences[start : start + batch_size], add_special_tokens=False)
        for start in range(0, len(sentences), batch_size)
    )
    # The loop allocates a list per sentence and makes no reference cycles: the cyclic collector would walk those
    # lists thousands of times for nothing (a few percent of the stage).
    collecting = gc.isenabled()
    gc.disable()
    try:
        return flatten_ids(encoding.ids for batch in batches for encoding in batch)
    finally:
        if collecting:
            gc.enable()


def record_path(stage_dir: Path, lang: str, chunk: int) -> Path:
    return stage_dir / RECORDS / f"{lang}-{chunk:05d}.json"


class BackgroundWrites:
    """The file writes of finished chunks, in order, on one thread: a chunk's writes and fsyncs overlap the
    tokenizing of the next chunk (the Rust tokenizer releases the GIL). At most one chunk's writes wait, so a task
    holds at most two chunks' shards; `close` waits for the last and raises any write's error."""

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare-writes")
        self._pending: Any = None

    def submit(self, write: Callable[[], None]) -> None:
        self.wait()
        self._pending = self._pool.submit(write)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)


def process_chunk(
    job: ChunkJob, settings: Settings, tokenizer: Any, writes: Optional[BackgroundWrites] = None
) -> dict[str, Any]:
    """Read, normalise, select, tokenize, pack and shard one unit; write its shards and record (now, or queued on
    `writes`: then they are on disk once `writes` is closed); return the record."""
    unit, plan = job.unit, job.plan
    # A table unit's plan is over its rows (known from the file's metadata, so no counting pass): empty rows
    # keep their place and are dropped after selection. A text unit's plan is over its non-empty lines.
    by_row = unit.rows >= 0
    sentences, line_stats = read_unit_sentences(unit, settings.normalization, keep_empty=by_row)
    if plan is None:
        if unit.role == HELDOUT:
            plan = all_heldout_plan(len(sentences))
        else:
            plan = unbudgeted_plan(len(sentences), settings.heldout_fraction if job.holds_out else 0.0)
    elif len(sentences) != plan.n:
        raise HyperofaError(
            f"{unit.path}: chunk {unit.chunk} of {unit.lang} has {len(sentences)} "
            f"{'rows' if by_row else 'sentences'} now but had {plan.n} when planned; the corpus changed during prepare"
        )
    heldout, multiplicity = select_sentences(plan, settings.seed, unit.lang, unit.chunk)
    train_order = kept_order(multiplicity)
    n_sentences = len(sentences)
    if by_row and line_stats.empty:
        present = np.fromiter((bool(text) for text in sentences), dtype=bool, count=len(sentences))
        heldout, train_order = heldout[present[heldout]], train_order[present[train_order]]
        multiplicity = np.where(present, multiplicity, 0)
        n_sentences -= line_stats.empty
    wanted = multiplicity != 0
    wanted[heldout] = True
    needed = np.flatnonzero(wanted)  # sorted, as the searchsorted below needs
    chosen = sentences if needed.size == len(sentences) else [sentences[i] for i in needed]
    flat, offsets = encode(tokenizer, chosen, settings.batch_size)
    del chosen
    del sentences  # the text is the largest thing a task holds; packing needs only the ids
    orders = {
        "train": np.searchsorted(needed, train_order),
        "heldout": np.searchsorted(needed, heldout),
    }
    stage_dir = Path(settings.stage_dir)
    stats: dict[str, int] = {
        "lines": line_stats.lines,
        "empty": line_stats.empty,
        "invalid_utf8": line_stats.invalid_utf8,
        "cr_line_ends": line_stats.cr_line_ends,
        "sentences": n_sentences,
        "train_unique": int(np.count_nonzero(multiplicity)),
        "encoded_tokens": int(flat.size),
    }
    shards: list[dict[str, Any]] = []
    files: list[tuple[Path, bytes]] = []
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
            files.append((stage_dir / relative, shard.data))
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

    def write() -> None:
        for path, data in files:
            write_shard(path, data, job.keep_existing, durable=False)
        # The record goes last: a chunk counts as finished only once all of its shards are in place.
        atomic_write_json(record_path(stage_dir, unit.lang, unit.chunk), record, durable=False)

    if writes is None:
        write()
    else:
        writes.submit(write)
    return record


# --- the Ray tasks (here, not in the stage: a worker imports only this module's light dependencies) -----------------


def count_sentences(units: list[Unit], normalization: str) -> list[int]:
    return [count_unit(unit, normalization) for unit in units]


def prepare_chunks(jobs: list[ChunkJob], settings: Settings, tokenizer_json: str) -> list[dict[str, Any]]:
    tokenizer = worker_backend(tokenizer_json)
    writes = BackgroundWrites()
    try:
        return [process_chunk(job, settings, tokenizer, writes) for job in jobs]
    finally:
        writes.close()  # every chunk's shards and record are on disk before the task reports them
