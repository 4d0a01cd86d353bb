"""`hyperofa prepare`: the corpus, once and in parallel, into language-sampled, tokenized, packed shards.

Ray core tasks work on (language, chunk) units planned by the corpus readers; small units are grouped so every
task reads about `prepare.chunk_bytes`. Two rounds:
1. count (only with a sentence budget or cap): the non-empty sentences of every unit, so the sampling plan can
   be fixed per chunk before anything is written (data_prep.sampling); without one a chunk's plan needs only
   its own size and the task makes it;
2. prepare: each task reads and normalises its units, selects sentences with a generator seeded by
   (seed, lang, chunk), tokenizes them with the target tokenizer's Rust backend (loaded once per worker
   process), packs them into blocks (data_prep.packing), writes deterministic tar shards (data_prep.shards)
   and finally a per-chunk record `chunks/{lang}-{chunk:05d}.json`. Tasks return that record only.

A chunk whose record matches the stage's inputs is not run again; one whose shard went missing runs again and
writes only the missing shard (the bytes are identical by construction). The manifest is written last from
the records alone, so a run whose workers died and were retried ends with the same manifest as one that ran
straight through.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np

from hyperofa_dist.artifacts import Stage, atomic_write_json, digest, sha256_file
from hyperofa_dist.config import Config
from hyperofa_dist.corpus import (
    LanguageSource,
    Unit,
    discover,
    normalize_line,
    plan_units,
    read_unit,
    read_unit_sentences,
)
from hyperofa_dist.errors import HyperofaError
from hyperofa_dist.target import target_tokenizer_dir, tokenizer_fingerprint

from .packing import Specials, flatten_ids, pack_sentences
from .sampling import ChunkPlan, kept_order, needs_corpus_counts, plan_chunks, select_sentences, unbudgeted_plan
from .shards import build_shards, write_shard

STAGE = "prepare"
SPLITS = ("train", "heldout")
RECORDS = "chunks"
SPLIT_STATS = ("sentences", "tokens", "tokens_in_blocks", "tokens_lost", "blocks", "shards")
READ_STATS = ("lines", "empty", "invalid_utf8", "sentences", "train_unique", "encoded_tokens")


# --- settings shared by every task -------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    stage_dir: str
    tokenizer_file: str
    tokenizer_key: str  # the tokenizer's fingerprint digest: a worker's cache key
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


def block_specials(tokenizer_dir: Path) -> Specials:
    """The family's frame and separator tokens (`<s>`/`</s>`, `[CLS]`/`[SEP]`) from the saved HF tokenizer."""
    config_path = tokenizer_dir / "tokenizer_config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise HyperofaError(f"{config_path}: not valid JSON") from None
    tokenizer = _load_backend(tokenizer_dir / "tokenizer.json")

    def token_id(*keys: str) -> Optional[int]:
        for key in keys:
            value = config.get(key)
            text = value.get("content") if isinstance(value, dict) else value
            if isinstance(text, str) and tokenizer.token_to_id(text) is not None:
                return int(tokenizer.token_to_id(text))
        return None

    cls, sep = token_id("cls_token", "bos_token"), token_id("sep_token", "eos_token")
    if cls is None or sep is None:
        raise HyperofaError(f"{config_path}: no cls/bos and sep/eos token found in the tokenizer's vocabulary")
    return Specials(cls=cls, sep=sep)


def _load_backend(path: Path) -> Any:
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust side raises plain Exception for a malformed file
        raise HyperofaError(f"{path}: cannot load tokenizer ({str(exc)[:160]})") from None


# --- the core: one chunk, no Ray ---------------------------------------------------------------------------


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
        "sentences": plan.n,
        "train_unique": int(np.count_nonzero(multiplicity)),
        "encoded_tokens": int(flat.size),
    }
    shards: list[dict[str, Any]] = []
    for split in SPLITS:
        packed = pack_sentences(flat, offsets, orders[split], settings.block_size, settings.specials)
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


# --- the Ray shell -----------------------------------------------------------------------------------------

_TOKENIZERS: dict[str, Any] = {}


def _worker_tokenizer(settings: Settings) -> Any:
    """One tokenizer per worker process, kept across tasks: loading it per task would cost more than small tasks."""
    key = f"{settings.tokenizer_file}:{settings.tokenizer_key}"
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = _load_backend(Path(settings.tokenizer_file))
    return _TOKENIZERS[key]


def count_sentences(units: list[Unit], normalization: str) -> list[int]:
    return [count_unit(unit, normalization) for unit in units]


def prepare_chunks(jobs: list[ChunkJob], settings: Settings) -> list[dict[str, Any]]:
    tokenizer = _worker_tokenizer(settings)
    return [process_chunk(job, settings, tokenizer) for job in jobs]


def group_units(units: list[Unit], chunk_bytes: int) -> list[list[Unit]]:
    """Consecutive units of about chunk_bytes per task (tiny languages share one), largest groups first.

    Largest-first keeps the tail short: the last tasks to start are the small ones.
    """
    groups: list[list[Unit]] = []
    current: list[Unit] = []
    size = 0
    for unit in units:
        if unit.kind == "hub":  # a streamed hub language has no known size: a task of its own
            groups.append([unit])
            continue
        current.append(unit)
        size += unit.bytes
        if size >= chunk_bytes:
            groups.append(current)
            current, size = [], 0
    if current:
        groups.append(current)
    return sorted(groups, key=lambda g: -sum(u.bytes for u in g))


def run_tasks(fn: Callable, calls: list[tuple], max_retries: int, desc: str) -> list[Any]:
    """Submit fn(*args) for every call and idle in a ray.wait loop with a progress bar; results in call order."""
    import ray
    from tqdm import tqdm

    remote = ray.remote(num_cpus=1, max_retries=max_retries)(fn)
    refs = [remote.remote(*args) for args in calls]
    index = {ref: i for i, ref in enumerate(refs)}
    results: list[Any] = [None] * len(refs)
    pending = list(refs)
    with tqdm(total=len(refs), desc=desc, unit="task", file=sys.stderr, mininterval=1.0) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=2.0)
            for ref in done:
                try:
                    results[index[ref]] = ray.get(ref)
                except Exception as exc:
                    for other in pending:
                        ray.cancel(other, force=True)
                    raise _task_error(exc, desc) from None
                bar.update(1)
    return results


def _task_error(exc: Exception, desc: str) -> Exception:
    """A task's HyperofaError keeps its one line; a worker that kept dying past the retries becomes one too."""
    import ray.exceptions

    if isinstance(exc, ray.exceptions.RayTaskError) and isinstance(exc.cause, HyperofaError):
        return HyperofaError(str(exc.cause))
    died = (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError, ray.exceptions.OutOfMemoryError)
    if isinstance(exc, died):
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
        return HyperofaError(f"{desc}: a Ray task failed after prepare.max_retries retries ({first[:200]})")
    return exc


# --- the stage ---------------------------------------------------------------------------------------------


def corpus_fingerprint(sources: Iterable[LanguageSource], root: Optional[str]) -> dict[str, Any]:
    """sha256 of every corpus file by its path inside the corpus (hub languages: the dataset name)."""
    out: dict[str, Any] = {}
    for source in sources:
        if source.format == "hub":
            out[source.lang] = {"hub": source.hub_name}
        else:
            out[source.lang] = {Path(f).relative_to(root).as_posix(): sha256_file(f) for f in source.files}
    return out


def _unit_digest(inputs_digest: str, unit: Unit) -> str:
    return digest({"inputs": inputs_digest, "unit": [unit.lang, unit.chunk, unit.kind, unit.start, unit.end]})


def _finished_record(stage_dir: Path, unit: Unit, record_digest: str) -> Optional[dict[str, Any]]:
    """The unit's record from an earlier run with the same inputs, or None."""
    path = record_path(stage_dir, unit.lang, unit.chunk)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if record.get("digest") == record_digest else None


def _shards_intact(stage_dir: Path, files: Iterable[dict[str, Any]]) -> bool:
    paths = ((stage_dir / f["path"], f["bytes"]) for f in files)
    return all(path.is_file() and path.stat().st_size == size for path, size in paths)


def _remove_strays(stage_dir: Path, keep: set[str]) -> None:
    """Delete files under the stage's data directories that this run did not produce (older configs, debris)."""
    for top in (*SPLITS, RECORDS):
        base = stage_dir / top
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*"), reverse=True):
            relative = path.relative_to(stage_dir).as_posix()
            if path.is_file() and relative not in keep:
                path.unlink()
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()


def aggregate(records: list[dict[str, Any]], languages: list[str]) -> dict[str, dict[str, int]]:
    keys = [*READ_STATS, *(f"{s}_{k}" for s in SPLITS for k in SPLIT_STATS)]
    per_lang = {lang: {k: 0 for k in keys} for lang in languages}
    for record in records:
        for key in keys:
            per_lang[record["lang"]][key] += record["stats"][key]
    return per_lang


def _metrics(per_lang: dict[str, dict[str, int]], totals: dict[str, int]) -> dict[str, float]:
    metrics = {f"{lang}/{key}": value for lang, stats in per_lang.items() for key, value in stats.items()}
    metrics.update({f"total/{key}": value for key, value in totals.items()})
    return metrics


def _count_and_plan(units: list[Unit], previous: list[Optional[dict]], prep) -> dict[str, list[ChunkPlan]]:
    """Count the sentences of every unit not finished before (a Ray round), then plan every chunk."""
    to_count = [u for u, r in zip(units, previous) if r is None]
    groups = group_units(to_count, prep.chunk_bytes)
    counted = run_tasks(count_sentences, [(g, prep.normalization) for g in groups], prep.max_retries, "prepare: count")
    n_of = {(u.lang, u.chunk): n for g, ns in zip(groups, counted) for u, n in zip(g, ns)}
    for unit, record in zip(units, previous):
        if record is not None:
            n_of[(unit.lang, unit.chunk)] = record["plan"]["n"]
    chunk_counts: dict[str, list[int]] = {}
    for unit in units:
        chunk_counts.setdefault(unit.lang, []).append(n_of[(unit.lang, unit.chunk)])
    sampling = prep.sampling
    return plan_chunks(
        chunk_counts,
        prep.heldout_fraction,
        sampling.alpha,
        sampling.total_sentences,
        sampling.cap_per_language,
        sampling.upsample,
    )


def run_prepare_stage(config: Config, tracker) -> int:
    from hyperofa_dist.raycluster import ray_session

    prep = config.prepare
    tokenizer_dir = target_tokenizer_dir(config)
    specials = block_specials(tokenizer_dir)
    sources = discover(config.corpus)
    tok_fingerprint = tokenizer_fingerprint(tokenizer_dir)
    inputs = {
        "config": {**config.section("prepare", "corpus"), "run.seed": config.run.seed},
        "tokenizer": tok_fingerprint,
        "corpus": corpus_fingerprint(sources, config.corpus.path),
    }
    inputs_digest = digest(inputs)
    stage = Stage(config.run_dir, STAGE)
    languages = [s.lang for s in sources]

    with tracker.stage(STAGE, config) as run:
        manifest = stage.manifest() if stage.manifest_path.is_file() else None
        if (
            manifest is not None
            and manifest.get("inputs_digest") == inputs_digest
            and _shards_intact(stage.path, manifest["outputs"])
        ):
            print(f"hyperofa prepare: up to date ({stage.manifest_path})", file=sys.stderr)
            run.set_tags({"hyperofa.up_to_date": "true"})
            run.log_metrics(_metrics(manifest["counts"]["languages"], manifest["counts"]["totals"]))
            return 0

        started = time.perf_counter()
        units = plan_units(sources, prep.chunk_bytes)
        with_units = {u.lang for u in units}
        skipped = {lang: "empty file" for lang in languages if lang not in with_units}
        # The stage must not look complete while its shards are being replaced or regenerated.
        if stage.manifest_path.is_file():
            stage.manifest_path.unlink()
        stage.begin(inputs_digest)

        unit_digests = [_unit_digest(inputs_digest, u) for u in units]
        previous = [_finished_record(stage.path, u, d) for u, d in zip(units, unit_digests)]
        settings = Settings(
            stage_dir=str(stage.path),
            tokenizer_file=str(tokenizer_dir / "tokenizer.json"),
            tokenizer_key=digest(tok_fingerprint),
            specials=specials,
            seed=config.run.seed,
            normalization=prep.normalization,
            heldout_fraction=prep.heldout_fraction,
            block_size=prep.block_size,
            blocks_per_sample=prep.blocks_per_sample,
            samples_per_shard=prep.samples_per_shard,
            batch_size=prep.tokenize_batch_size,
        )
        with ray_session(config):
            plans: Optional[dict[str, list[ChunkPlan]]] = None
            if needs_corpus_counts(prep.sampling.total_sentences, prep.sampling.cap_per_language):
                plans = _count_and_plan(units, previous, prep)
            count_s = time.perf_counter() - started

            jobs: list[ChunkJob] = []
            records: list[dict[str, Any]] = []
            for unit, record_digest, record in zip(units, unit_digests, previous):
                if record is not None and _shards_intact(stage.path, record["shards"]):
                    records.append(record)
                    continue
                plan = plans[unit.lang][unit.chunk] if plans is not None else None
                jobs.append(ChunkJob(unit, plan, record_digest, keep_existing=record is not None))
            by_unit = {job.unit: job for job in jobs}
            job_groups = [[by_unit[u] for u in g] for g in group_units([j.unit for j in jobs], prep.chunk_bytes)]
            for result in run_tasks(prepare_chunks, [(g, settings) for g in job_groups], prep.max_retries, "prepare"):
                records.extend(result)
        wall_s = time.perf_counter() - started

        records.sort(key=lambda r: (r["lang"], r["chunk"]))
        for lang in languages:
            if lang not in skipped and not any(r["plan"]["n"] for r in records if r["lang"] == lang):
                skipped[lang] = "no non-empty sentence"
        shard_files = [s for r in records for s in r["shards"]]
        keep = {s["path"] for s in shard_files} | {
            record_path(stage.path, r["lang"], r["chunk"]).relative_to(stage.path).as_posix() for r in records
        }
        _remove_strays(stage.path, keep)

        per_lang = aggregate(records, languages)
        totals = {key: sum(stats[key] for stats in per_lang.values()) for key in next(iter(per_lang.values()))}
        for lang, reason in sorted(skipped.items()):
            print(f"hyperofa prepare: skipped language {lang} ({reason})", file=sys.stderr)
        counts = {"languages": per_lang, "totals": totals, "skipped_languages": skipped, "units": len(units)}
        stage.write_manifest(
            config=config.effective(),
            inputs=inputs,
            outputs=[],
            counts=counts,
            extra={
                # Tasks hashed every shard from the bytes they wrote; re-reading them all here would double
                # the I/O of the stage, so the records' hashes are the manifest's outputs.
                "outputs": sorted(
                    ({k: s[k] for k in ("path", "bytes", "sha256")} for s in shard_files), key=lambda s: s["path"]
                ),
                "shards": sorted(
                    ({k: v for k, v in s.items() if k not in ("bytes", "sha256")} for s in shard_files),
                    key=lambda s: s["path"],
                ),
                "block_size": prep.block_size,
                "special_tokens": {"cls": specials.cls, "sep": specials.sep},
            },
        )
        run.log_metrics(_metrics(per_lang, totals))
        run.log_metrics(
            {
                "time/wall_s": wall_s,
                "time/count_s": count_s,
                "time/encoded_tokens_per_s": totals["encoded_tokens"] / max(wall_s, 1e-9),
                "tasks": len(job_groups),
            }
        )
        if skipped:
            run.set_tags({"hyperofa.skipped_languages": ",".join(sorted(skipped))})
        print(
            f"hyperofa prepare: {totals['train_blocks']} train and {totals['heldout_blocks']} held-out blocks of "
            f"{prep.block_size} tokens from {len(languages) - len(skipped)} languages in {wall_s:.1f}s "
            f"-> {stage.path}",
            file=sys.stderr,
        )
    return 0
