"""`hyperofa prepare`: the corpus, once and in parallel, into language-sampled, tokenized, packed shards.

Ray core tasks work on (language, chunk) units planned by the corpus readers; small units are grouped so every
task reads about `prepare.chunk_bytes`. Two rounds:
1. count (only with a sentence budget or cap, and only for text and jsonl units): the non-empty sentences of
   every unit, so the sampling plan can be fixed per chunk before anything is written (`sampling`); a parquet or
   Arrow unit's plan is over its rows, known from the file's metadata, so such a corpus is read once; without a
   budget or cap a chunk's plan needs only its own size and the task makes it. Units of a published held-out
   split (`corpus.heldout_split`) are held out whole and take no part in the budgets;
2. prepare: each task runs `chunk.process_chunk` on its units with the target tokenizer's Rust backend (shipped
   once through the object store, loaded once per worker process), writing a chunk's shards on a background
   thread while the next one tokenizes, and returns the chunks' records only.

A chunk whose record matches the stage's inputs is not run again; one whose shard went missing or differs from
its recorded size or sha256 runs again and writes only that shard (the bytes are identical by construction). The
manifest is written last from the records alone, so a run whose workers died and were retried ends with the same
manifest as one that ran straight through.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterable, Optional

from hyperofa_dist.config import Config
from hyperofa_dist.formats.corpus import HELDOUT, LanguageSource, Unit, checked_samples, discover, plan_units
from hyperofa_dist.formats.files import digest, free_space, sha256_file, sync_files, used_bytes
from hyperofa_dist.formats.rundir import Stage
from hyperofa_dist.formats.shards import SPLITS, STAGE, prepare_bytes
from hyperofa_dist.formats.text import LINE_ENDS
from hyperofa_dist.formats.tokenizer import (
    backend_json,
    frame_ids,
    ignored_settings,
    load_tokenizer,
    target_tokenizer_dir,
    tokenizer_fingerprint,
)
from hyperofa_dist.runtime.ray import ray_session, run_tasks
from hyperofa_dist.runtime.stage import StageShell

from .chunk import RECORDS, ChunkJob, Settings, count_sentences, prepare_chunks, record_path
from .packing import RULES, Specials
from .sampling import ChunkPlan, all_heldout_plan, needs_corpus_counts, plan_chunks

SPLIT_STATS = ("sentences", "tokens", "tokens_in_blocks", "tokens_lost", "blocks", "padded_blocks", "shards")
READ_STATS = ("lines", "empty", "invalid_utf8", "cr_line_ends", "sentences", "train_unique", "encoded_tokens")
RETRIES_KEY = "prepare.max_retries"


# --- grouping units into Ray tasks ------------------------------------------------------------------------------


def group_units(units: list[Unit], chunk_bytes: int) -> list[list[Unit]]:
    """Consecutive units of about chunk_bytes per task (tiny languages share one), largest groups first.

    Largest-first keeps the tail short: the last tasks to start are the small ones.
    """
    groups: list[list[Unit]] = []
    current: list[Unit] = []
    size = 0
    for unit in units:
        if unit.end < 0:  # a remote stream planned whole has no known size: a task of its own
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


# --- the stage ---------------------------------------------------------------------------------------------


def corpus_fingerprint(sources: Iterable[LanguageSource], root: Optional[str]) -> dict[str, Any]:
    """sha256 of every corpus file (held-out split included) by its path inside the corpus, whose split folder
    says which split was read; hub languages: the dataset, the commit and the files read at it."""
    out: dict[str, Any] = {}
    for source in sources:
        if source.format == "hub":
            out[source.lang] = {
                "hub": source.hub_name, "revision": source.revision, "split": source.split,
                "files": [*source.remote_files, *source.remote_heldout],
            }
        else:
            files = [*source.files, *source.heldout_files]
            out[source.lang] = {Path(f).relative_to(root).as_posix(): sha256_file(f) for f in files}
    return out


def heldout_sources(sources: Iterable[LanguageSource], split: Optional[str]) -> dict[str, str]:
    """Where each language's held-out text comes from: its published held-out split, else a fraction of training."""
    return {
        s.lang: split if (s.heldout_files or s.remote_heldout) else "prepare.heldout_fraction" for s in sources
    }


def _unit_digest(inputs_digest: str, unit: Unit) -> str:
    key = [unit.lang, unit.chunk, unit.kind, unit.start, unit.end] + ([unit.role] if unit.role == HELDOUT else [])
    return digest({"inputs": inputs_digest, "unit": key})


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


def without_heldout(per_lang: dict[str, dict[str, int]], skipped: dict[str, str]) -> dict[str, str]:
    """Languages (with text) that got no held-out block, and why."""
    out = {}
    for lang, stats in per_lang.items():
        if lang in skipped or stats["heldout_blocks"]:
            continue
        n = stats["heldout_sentences"]
        out[lang] = "no held-out sentence" if n == 0 else f"{n} held-out sentences, shorter than a block, no pad token"
    return out


def heldout_summary(per_lang: dict[str, dict[str, int]], without: dict[str, str], skipped: dict[str, str]) -> str:
    """One line: how many languages got held-out blocks (the fewest, the padded ones) and which got none."""
    have = {lang: stats["heldout_blocks"] for lang, stats in per_lang.items() if lang not in skipped}
    if not any(per_lang[lang]["heldout_sentences"] for lang in have):
        return "held-out blocks: none (no language has a held-out sentence; prepare.heldout_fraction)"
    line = f"held-out blocks: {len(have) - len(without)} of {len(have)} languages have some"
    if len(have) > len(without):
        fewest = min((n, lang) for lang, n in have.items() if n)
        padded = sum(1 for lang in have if per_lang[lang]["heldout_padded_blocks"])
        line += f" (fewest: {fewest[1]} with {fewest[0]}; {padded} with a padded short block)"
    if without:
        line += "; none: " + ", ".join(f"{lang} ({why})" for lang, why in sorted(without.items()))
    return line


def _metrics(per_lang: dict[str, dict[str, int]], totals: dict[str, int]) -> dict[str, float]:
    metrics = {f"{lang}/{key}": value for lang, stats in per_lang.items() for key, value in stats.items()}
    metrics.update({f"total/{key}": value for key, value in totals.items()})
    return metrics


def _count_and_plan(
    units: list[Unit], previous: list[Optional[dict]], prep, holds_out: dict[str, bool]
) -> dict[tuple[str, int], ChunkPlan]:
    """Every chunk's plan from every unit's size: a table unit's rows come from its file's metadata, a text unit
    not finished before is counted (a Ray round reading it; `needs_corpus_counts`)."""
    to_count = [u for u, r in zip(units, previous) if r is None and u.rows < 0]
    groups = group_units(to_count, prep.chunk_bytes)
    counted = run_tasks(
        count_sentences, [(g, prep.normalization) for g in groups], desc="prepare: count", retries_key=RETRIES_KEY,
        max_retries=prep.max_retries,
    ) if groups else []
    n_of = {(u.lang, u.chunk): n for g, ns in zip(groups, counted) for u, n in zip(g, ns)}
    for unit, record in zip(units, previous):
        if record is not None:
            n_of[(unit.lang, unit.chunk)] = record["plan"]["n"]
        elif unit.rows >= 0:
            n_of[(unit.lang, unit.chunk)] = unit.rows
    chunk_counts: dict[str, list[int]] = {}
    for unit in units:
        if unit.role != HELDOUT:
            chunk_counts.setdefault(unit.lang, []).append(n_of[(unit.lang, unit.chunk)])
    sampling = prep.sampling
    fractions = {lang: prep.heldout_fraction if holds_out[lang] else 0.0 for lang in chunk_counts}
    per_lang = plan_chunks(
        chunk_counts, fractions, sampling.alpha, sampling.total_sentences, sampling.cap_per_language, sampling.upsample
    )
    plans: dict[tuple[str, int], ChunkPlan] = {}
    position = {lang: 0 for lang in per_lang}
    for unit in units:
        key = (unit.lang, unit.chunk)
        if unit.role == HELDOUT:
            plans[key] = all_heldout_plan(n_of[key])
        else:
            plans[key] = per_lang[unit.lang][position[unit.lang]]
            position[unit.lang] += 1
    return plans


def _prepare_units(
    config: Config, shell: StageShell, units: list[Unit], holds_out: dict[str, bool], specials: Specials, tokenizer: Any
) -> tuple[list[dict[str, Any]], float, int]:
    """(every unit's record, seconds spent counting, Ray tasks run): units finished by an earlier run with the same
    inputs keep their records (a damaged shard of theirs is written again), the others run as Ray tasks."""
    prep = config.prepare
    started = time.perf_counter()
    unit_digests = [_unit_digest(shell.digest, u) for u in units]
    previous = [_finished_record(shell.path, u, d) for u, d in zip(units, unit_digests)]
    settings = Settings(
        stage_dir=str(shell.path),
        specials=specials,
        seed=config.run.seed,
        normalization=prep.normalization,
        heldout_fraction=prep.heldout_fraction,
        block_size=prep.block_size,
        blocks_per_sample=prep.blocks_per_sample,
        samples_per_shard=prep.samples_per_shard,
        batch_size=prep.tokenize_batch_size,
    )
    with ray_session(config) as ray:
        plans: Optional[dict[tuple[str, int], ChunkPlan]] = None
        if needs_corpus_counts(prep.sampling.total_sentences, prep.sampling.cap_per_language):
            plans = _count_and_plan(units, previous, prep, holds_out)
        count_s = time.perf_counter() - started

        jobs: list[ChunkJob] = []
        records: list[dict[str, Any]] = []
        for unit, record_digest, record in zip(units, unit_digests, previous):
            if record is not None:
                damaged = shell.stage.damaged_records(record["shards"])
                if not damaged:
                    records.append(record)
                    continue
                for shard, _ in damaged:  # a shard that differs is written again, like a missing one
                    (shell.path / shard["path"]).unlink(missing_ok=True)
            plan = plans[(unit.lang, unit.chunk)] if plans is not None else None
            jobs.append(
                ChunkJob(unit, plan, record_digest, keep_existing=record is not None, holds_out=holds_out[unit.lang])
            )
        by_unit = {job.unit: job for job in jobs}
        job_groups = [[by_unit[u] for u in g] for g in group_units([j.unit for j in jobs], prep.chunk_bytes)]
        tokenizer_ref = ray.put(backend_json(tokenizer))
        calls = [(g, settings, tokenizer_ref) for g in job_groups]
        for result in run_tasks(
            prepare_chunks, calls, desc="prepare", retries_key=RETRIES_KEY, max_retries=prep.max_retries
        ):
            records.extend(result)
    return records, count_s, len(job_groups)


def _shard_listing(shard_files: list[dict[str, Any]]) -> dict[str, Any]:
    """The manifest's outputs and shards, from the records alone."""
    return {
        # Tasks hashed every shard from the bytes they wrote; re-reading them all here would double the I/O of the
        # stage, so the records' hashes are the manifest's outputs.
        "outputs": sorted(
            ({k: s[k] for k in ("path", "bytes", "sha256")} for s in shard_files), key=lambda s: s["path"]
        ),
        "shards": sorted(
            ({k: v for k, v in s.items() if k not in ("bytes", "sha256")} for s in shard_files),
            key=lambda s: s["path"],
        ),
    }


def _report(shell: StageShell, per_lang: dict[str, dict[str, int]], totals: dict[str, int], skipped: dict[str, str],
            no_heldout: dict[str, str], block_size: int, run_metrics: dict[str, float]) -> None:
    """The stage's MLflow metrics and tags, and its closing lines."""
    run_ = shell.run
    run_.log_metrics(_metrics(per_lang, totals))
    run_.log_metrics(run_metrics)
    if skipped:
        run_.set_tags({"hyperofa.skipped_languages": ",".join(sorted(skipped))})
    if no_heldout:
        run_.set_tags({"hyperofa.languages_without_heldout": ",".join(sorted(no_heldout))})
    shell.say(heldout_summary(per_lang, no_heldout, skipped))
    crlf = {lang: stats["cr_line_ends"] for lang, stats in per_lang.items() if stats["cr_line_ends"]}
    if crlf:
        shell.say(f"{totals['cr_line_ends']} lines ended in \\r or \\r\\n, read as line ends: "
                  + ", ".join(f"{lang} {n}" for lang, n in sorted(crlf.items())))
    shell.say(
        f"{totals['train_blocks']} train and {totals['heldout_blocks']} held-out blocks of "
        f"{block_size} tokens from {len(per_lang) - len(skipped)} languages in {run_metrics['time/wall_s']:.1f}s -> "
        f"{shell.path}"
    )


def run(config: Config, tracker) -> int:
    prep = config.prepare
    tokenizer_dir = target_tokenizer_dir(config)
    tokenizer = load_tokenizer(tokenizer_dir)
    pad = tokenizer.pad_token_id
    specials = Specials(*frame_ids(tokenizer, tokenizer_dir), pad=int(pad) if pad is not None else None)
    sources = discover(config.corpus)
    samples = checked_samples(sources, config.corpus.max_noise_share)
    inputs = {
        "config": config.fingerprint("prepare", "corpus", "run"),
        "packing": RULES,
        "line_ends": LINE_ENDS,  # a corpus read with another rule gave other sentences
        "tokenizer": tokenizer_fingerprint(tokenizer_dir),
        "corpus": corpus_fingerprint(sources, config.corpus.path),
    }
    languages = [s.lang for s in sources]
    stage_dir = Stage(config.run_dir, STAGE).path
    free_space(
        stage_dir, prepare_bytes(samples, tokenizer, config),
        "prepare's shards (estimated from a sample of the corpus)", reclaimable=used_bytes(stage_dir),
    )

    with StageShell.open(config, tracker, STAGE, Stage(config.run_dir, STAGE), inputs) as shell:
        if shell.up_to_date:
            shell.run.log_metrics(_metrics(shell.manifest["counts"]["languages"], shell.manifest["counts"]["totals"]))
            return 0

        started = time.perf_counter()
        units = plan_units(sources, prep.chunk_bytes)
        heldout_from = heldout_sources(sources, config.corpus.heldout_split)
        holds_out = {lang: heldout_from[lang] == "prepare.heldout_fraction" for lang in languages}
        with_units = {u.lang for u in units if u.role != HELDOUT}
        skipped = {lang: "empty file" for lang in languages if lang not in with_units}
        shell.begin()
        records, count_s, tasks = _prepare_units(config, shell, units, holds_out, specials, tokenizer)
        wall_s = time.perf_counter() - started

        records.sort(key=lambda r: (r["lang"], r["chunk"]))
        for lang in languages:
            if lang not in skipped and not any(r["stats"]["sentences"] for r in records if r["lang"] == lang):
                skipped[lang] = "no non-empty sentence"
        shard_files = [s for r in records for s in r["shards"]]
        keep = {s["path"] for s in shard_files} | {
            record_path(shell.path, r["lang"], r["chunk"]).relative_to(shell.path).as_posix() for r in records
        }
        _remove_strays(shell.path, keep)
        sync_files(shell.path / path for path in sorted(keep))  # tasks wrote without fsync; durable before the manifest

        per_lang = aggregate(records, languages)
        totals = {key: sum(stats[key] for stats in per_lang.values()) for key in next(iter(per_lang.values()))}
        for lang, reason in sorted(skipped.items()):
            shell.say(f"skipped language {lang} ({reason})")
        no_heldout = without_heldout(per_lang, skipped)
        counts = {
            "languages": per_lang,
            "totals": totals,
            "skipped_languages": skipped,
            "languages_without_heldout": no_heldout,
            "units": len(units),
            "splits": {s.lang: s.split for s in sources if s.split},
            "heldout_from": {lang: heldout_from[lang] for lang in languages},
        }
        shell.finish(outputs=[], counts=counts, extra={
            **_shard_listing(shard_files),
            "block_size": prep.block_size,
            "special_tokens": {"cls": specials.cls, "sep": specials.sep, "pad": specials.pad},
            **ignored_settings({"tokenizer": tokenizer_dir}, shell.say),
        })
        _report(shell, per_lang, totals, skipped, no_heldout, prep.block_size, {
            "time/wall_s": wall_s,
            "time/count_s": count_s,
            "time/encoded_tokens_per_s": totals["encoded_tokens"] / max(wall_s, 1e-9),
            "tasks": tasks,
            "languages_without_heldout": len(no_heldout),
        })
    return 0
