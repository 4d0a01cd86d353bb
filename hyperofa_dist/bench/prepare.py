"""`hyperofa bench prepare`: end-to-end throughput of `prepare` against the raw tokenizer, 1 vs 2 Ray workers.

Baseline: the target tokenizer's batched encoder (`encode_batch_fast`, one thread) on the corpus's normalised
sentences, already in memory, language after language: what the stage could do per core if reading, normalising,
sampling, packing and writing cost nothing. The stage empties the tokenizer's word cache before each unit
(`formats.tokenizer.fresh_word_cache`), which the plain loop does not, so a second baseline does the same per
language: the ratio against it is what the stage's own work (and Ray's) costs beside equally cached tokenizing.
Then the whole stage (read, normalise, count, sample, tokenize, pack, write shards and manifest) with a local Ray
of 1 and of 2 CPUs; Ray's start-up (booting the workers, and each worker's one-time import of the stage's task
module) is timed apart and excluded.
Every sentence is kept once (no temperature budget), so both sides encode exactly the same text.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .. import synthetic
from ..config import Config
from ..formats.corpus import discover, iter_sentences
from ..formats.rundir import Stage
from ..formats.shards import STAGE
from ..formats.tokenizer import TOKENIZER_JSON, backend_from_json, fresh_word_cache, load_tokenizer, tokenizer_dir
from ..registry import command
from ..runtime.ray import ray_session, wait_for_workers
from ..tracking import NullTracker

MIN_CORPUS_BYTES = 20 * 2**20
# The module of prepare's Ray tasks: each worker imports it once, before the timing (start-up, like Ray's own).
TASK_MODULE = "data_prep.prepare.chunk"
MIN_TASKS = 24  # per run, so two workers stay busy to the end and a slow last task cannot dominate


def generate_corpus(root: Path, min_bytes: int = MIN_CORPUS_BYTES, seed: int = 0) -> Path:
    """6 languages in 3 scripts with skewed sizes, at least min_bytes in all."""
    world = synthetic.World(synthetic.default_languages(6), n_concepts=3000, seed=seed)
    probe = synthetic.skewed_sizes(world.languages, largest=2000, ratio=0.6)
    sample = root / "probe"
    synthetic.write_corpus(sample, world, probe, seed=seed)
    probe_bytes = sum(p.stat().st_size for p in sample.iterdir())
    shutil.rmtree(sample)
    largest = int(2000 * min_bytes / probe_bytes * 1.05) + 1
    synthetic.write_corpus(root / "corpus", world, synthetic.skewed_sizes(world.languages, largest, 0.6), seed=seed)
    return root / "corpus"


def _bench_config(config: Config, run_dir: Path, corpus: Path, tokenizer: Path, cpus: int, chunk_bytes: int) -> Config:
    data = config.effective()
    data["run"]["dir"] = str(run_dir)
    data["corpus"].update(path=str(corpus), format="dir")
    data["tokenizer"]["path"] = str(tokenizer)
    data["tracking"]["enabled"] = False
    data["ray"].update(num_cpus=cpus, address=None)
    data["prepare"]["chunk_bytes"] = chunk_bytes
    data["prepare"]["sampling"].update(total_sentences=None, cap_per_language=None)
    return Config.model_validate(data)


def raw_tokenizer_rate(
    tokenizer_file: Path, languages: list[list[str]], batch_size: int, fresh_cache: bool = False
) -> tuple[int, float]:
    """(tokens, seconds) of the batched encoder over every language's sentences in turn; with `fresh_cache` its
    word cache is emptied before each language."""
    tokenizer = backend_from_json(tokenizer_file.read_text(encoding="utf-8"))
    started = time.perf_counter()
    tokens = 0
    for sentences in languages:
        if fresh_cache:
            fresh_word_cache(tokenizer)
        for start in range(0, len(sentences), batch_size):
            encodings = tokenizer.encode_batch_fast(sentences[start : start + batch_size], add_special_tokens=False)
            tokens += sum(len(e) for e in encodings)
    return tokens, time.perf_counter() - started


def timed_prepare(config: Config) -> dict[str, Any]:
    """The prepare stage itself (through the registry, as the CLI runs it) inside a Ray whose start is timed apart."""
    started = time.perf_counter()
    with ray_session(config):
        wait_for_workers(config.ray.num_cpus, imports=(TASK_MODULE,))
        startup = time.perf_counter() - started
        began = time.perf_counter()
        command("prepare").load()(config, NullTracker())
        seconds = time.perf_counter() - began
    manifest = Stage(config.run_dir, STAGE).require()
    return {"startup_s": startup, "seconds": seconds, "tokens": manifest["counts"]["totals"]["encoded_tokens"]}


def run(config: Config, args) -> int:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    temporary = args.workdir is None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="hyperofa-bench-prepare-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        corpus = Path(args.corpus) if args.corpus else generate_corpus(workdir, seed=config.run.seed)
        probe = _bench_config(config, workdir / "probe", corpus, workdir, 1, config.prepare.chunk_bytes)
        sources = discover(probe.corpus)
        corpus_bytes = sum(s.bytes for s in sources)
        languages = [list(iter_sentences(source, config.prepare.normalization)) for source in sources]
        if config.tokenizer.path:
            tokenizer = tokenizer_dir(config.tokenizer.path, workdir, "tokenizer.path")  # SentencePiece-only: converted
        else:
            sentences = [s for language in languages for s in language]
            sample = sentences[:: max(1, len(sentences) // 60_000)]
            tokenizer = synthetic.train_source_tokenizer("xlmr", sample, 8000, workdir / "tokenizer")
        chunk_bytes = max(1024, min(config.prepare.chunk_bytes, corpus_bytes // MIN_TASKS))
        batch = config.prepare.tokenize_batch_size
        raw_tokens, raw_s = raw_tokenizer_rate(tokenizer / TOKENIZER_JSON, languages, batch)
        cached_tokens, cached_s = raw_tokenizer_rate(tokenizer / TOKENIZER_JSON, languages, batch, fresh_cache=True)
        del languages
        # The stage loads its tokenizer with AutoTokenizer; its first call in a process imports transformers'
        # tokenizer classes (about a second). That is start-up, counted apart like Ray's, not work per token.
        load_tokenizer(tokenizer)
        runs = {}
        for cpus in (1, 2):
            run_dir = workdir / f"run_{cpus}_workers"
            if run_dir.exists():
                shutil.rmtree(run_dir)
            runs[cpus] = timed_prepare(_bench_config(config, run_dir, corpus, tokenizer, cpus, chunk_bytes))
        raw_rate = raw_tokens / raw_s
        cached_rate = cached_tokens / cached_s
        rate = {cpus: r["tokens"] / r["seconds"] for cpus, r in runs.items()}
        result = {
            "raw_tokenizer_tokens_per_s": round(raw_rate),
            "tokens_per_s_1_worker": round(rate[1]),
            "tokens_per_s_2_workers": round(rate[2]),
            "ray_startup_s": round(runs[1]["startup_s"], 2),
            "ratio_1_worker_vs_raw": round(rate[1] / raw_rate, 3),
            "scaling_2_vs_1": round(rate[2] / rate[1], 3),
            "raw_tokenizer_fresh_cache_tokens_per_s": round(cached_rate),
            "ratio_1_worker_vs_raw_fresh_cache": round(rate[1] / cached_rate, 3),
            "ray_startup_2_workers_s": round(runs[2]["startup_s"], 2),
            "prepare_1_worker_s": round(runs[1]["seconds"], 2),
            "prepare_2_workers_s": round(runs[2]["seconds"], 2),
            "raw_tokenizer_s": round(raw_s, 2),
            "tokens": raw_tokens,
            "tokens_match": raw_tokens == cached_tokens == runs[1]["tokens"] == runs[2]["tokens"],
            "corpus_mb": round(corpus_bytes / 2**20, 1),
            "chunk_bytes": chunk_bytes,
            "block_size": config.prepare.block_size,
            "cpu_count": os.cpu_count(),
        }
        print(json.dumps(result, sort_keys=False))
        sys.stdout.flush()
        return 0
    finally:
        if temporary:
            shutil.rmtree(workdir, ignore_errors=True)
