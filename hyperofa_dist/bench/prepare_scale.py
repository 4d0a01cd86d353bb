"""`hyperofa bench prepare-scale`: prepare on one language at 1x, 4x and 16x size; memory must not grow with it.

The language is generated (the synthetic world) and written in Glot500-c's published parquet layout
(`<lang>/train/0000.parquet, 0001.parquet, ...`, one file per 1x piece, row groups of a quarter of
`chunk_bytes`), so the stage plans it by row group exactly as it plans the real corpus. Each size runs the whole
stage in a fresh local Ray (`ray.num_cpus` workers, 2 by default) with the same `prepare.chunk_bytes` (a quarter
of the 1x size: every size has several units per worker). Reported per size: throughput per worker (encoded
tokens per second of the stage, divided by the workers) and the peak resident memory (VmHWM) of every Ray worker
process, read after the stage while the workers still live. The figure: the largest worker peak at 16x over the
one at 1x (`rss_16x_vs_1x`, bounded when <= 1.3): a task holds one unit, never the language.
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
from ..formats.rundir import Stage
from ..formats.shards import STAGE
from ..registry import command
from ..runtime.ray import ray_session, wait_for_workers
from ..tracking import NullTracker
from .prepare import TASK_MODULE

SCALES = (1, 4, 16)
BASE_BYTES = 8 << 20  # text of the 1x language
DRY_BASE_BYTES = 256 << 10
UNITS_AT_1X = 4
GROUPS_PER_UNIT = 4
BOUND = 1.3
LANG = "qaa_Latn"


def _sentences_for(world: synthetic.World, target_bytes: int, seed: int) -> list[str]:
    """About target_bytes of generated sentences of LANG (different concepts per seed)."""
    probe = world.render(LANG, world.concept_sentences(2000, seed))
    per_sentence = sum(len(s.encode("utf-8")) + 1 for s in probe) / len(probe)
    return world.render(LANG, world.concept_sentences(max(1, int(target_bytes / per_sentence)), seed))


def generate(root: Path, world: synthetic.World, scale: int, base_bytes: int, rows_per_group: int, seed: int) -> Path:
    """LANG at `scale` times base_bytes in the published parquet layout, one file per 1x piece."""
    for piece in range(scale):  # piece by piece: the driver never holds more than 1x of text
        sentences = _sentences_for(world, base_bytes, seed * 1000 + piece)
        synthetic.glot500_standin(
            root, {LANG: {"train": sentences}}, "parquet", rows_per_group=rows_per_group, first_file=piece
        )
    return root


def worker_peaks() -> dict[int, float]:
    """Peak resident MiB (VmHWM) of every Ray worker process under this driver."""
    import psutil

    peaks = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            cmdline = proc.cmdline()
            if not cmdline or not cmdline[0].startswith("ray::"):
                continue
            with open(f"/proc/{proc.pid}/status", encoding="ascii") as handle:
                fields = dict(line.split(":", 1) for line in handle if ":" in line)
            peaks[proc.pid] = int(fields["VmHWM"].split()[0]) / 1024
        except (psutil.Error, OSError, KeyError, ValueError):
            continue  # a worker that exits meanwhile has nothing left to measure
    return peaks


def _config(config: Config, run_dir: Path, corpus: Path, tokenizer: Path, chunk_bytes: int) -> Config:
    data = config.effective()
    data["run"]["dir"] = str(run_dir)
    data["corpus"].update(path=str(corpus), format="glot500_local", languages=None, split="train", heldout_split=None)
    data["tokenizer"]["path"] = str(tokenizer)
    data["tracking"]["enabled"] = False
    data["ray"]["address"] = None
    data["prepare"]["chunk_bytes"] = chunk_bytes
    data["prepare"]["sampling"].update(total_sentences=None, cap_per_language=None)
    return Config.model_validate(data)


def measure(config: Config) -> dict[str, Any]:
    workers = config.ray.num_cpus
    with ray_session(config):
        wait_for_workers(workers, imports=(TASK_MODULE,))
        started = time.perf_counter()
        command("prepare").load()(config, NullTracker())
        seconds = time.perf_counter() - started
        peaks = worker_peaks()
    manifest = Stage(config.run_dir, STAGE).require()
    tokens = manifest["counts"]["totals"]["encoded_tokens"]
    return {
        "seconds": round(seconds, 2),
        "tokens": tokens,
        "units": manifest["counts"]["units"],
        "tokens_per_s_per_worker": round(tokens / seconds / workers),
        "peak_rss_mib_per_worker": round(max(peaks.values(), default=0.0), 1),
        "peak_rss_mib_workers": sorted(round(v, 1) for v in peaks.values()),
    }


def run(config: Config, args) -> int:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    dry_run = bool(getattr(args, "dry_run", False))
    base_bytes = DRY_BASE_BYTES if dry_run else BASE_BYTES
    chunk_bytes = base_bytes // UNITS_AT_1X
    temporary = args.workdir is None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="hyperofa-bench-prepare-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        world = synthetic.World(synthetic.default_languages(1), n_concepts=3000, seed=config.run.seed)
        sample = _sentences_for(world, min(base_bytes, 2 << 20), seed=config.run.seed + 7)
        per_row = sum(len(s.encode("utf-8")) + 1 for s in sample) / len(sample)
        rows_per_group = max(1, int(chunk_bytes / GROUPS_PER_UNIT / per_row))
        if config.tokenizer.path:
            tokenizer = Path(config.tokenizer.path)
        else:
            tokenizer = synthetic.train_source_tokenizer("xlmr", sample[:60_000], 8000, workdir / "tokenizer")
        sizes = []
        for scale in SCALES:
            corpus = generate(workdir / f"x{scale}", world, scale, base_bytes, rows_per_group, config.run.seed)
            corpus_bytes = sum(p.stat().st_size for p in (corpus / LANG / "train").iterdir())
            run_dir = workdir / f"run_x{scale}"
            shutil.rmtree(run_dir, ignore_errors=True)
            result = measure(_config(config, run_dir, corpus, tokenizer, chunk_bytes))
            sizes.append({"scale": scale, "text_mb": round(scale * base_bytes / 2**20, 1),
                          "parquet_mb": round(corpus_bytes / 2**20, 1), **result})
            shutil.rmtree(corpus, ignore_errors=True)
            shutil.rmtree(run_dir, ignore_errors=True)
        ratio = sizes[-1]["peak_rss_mib_per_worker"] / max(sizes[0]["peak_rss_mib_per_worker"], 1e-9)
        result = {
            "bench": "prepare-scale",
            "language": LANG,
            "workers": config.ray.num_cpus,
            "chunk_bytes": chunk_bytes,
            "rows_per_group": rows_per_group,
            "rss_16x_vs_1x": round(ratio, 3),
            "bounded": ratio <= BOUND,
            "throughput_16x_vs_1x": round(sizes[-1]["tokens_per_s_per_worker"] / sizes[0]["tokens_per_s_per_worker"], 3),
            "sizes": sizes,
            "dry_run": dry_run,
            "cpu_count": os.cpu_count(),
        }
        print(json.dumps(result))
        sys.stdout.flush()
        return 0 if result["bounded"] else 1
    finally:
        if temporary:
            shutil.rmtree(workdir, ignore_errors=True)
