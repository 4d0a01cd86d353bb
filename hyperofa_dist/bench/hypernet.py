"""`hyperofa bench hypernet`: training throughput of the DeepSpeed job (1 and 2 ranks) against a plain loop.

All three runs train the same model on the same generated mapping with the same micro-batch, through the same
loop.train_epoch; every process uses one intra-op thread, so the 2-rank figure measures data-parallel efficiency
on 2 cores rather than thread-level parallelism. The baseline is a single-process PyTorch loop (torch.optim.Adam,
no DeepSpeed) in this process. Startup and warm-up steps are excluded from every figure. Prints one JSON line.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from ..config import Config, load_config
from ..errors import HyperofaError
from ..formats.files import atomic_write_json
from ..formats.jobdir import HypernetJobSpec, write_job
from ..formats.mapping import load_mapping
from ..hypernet.stage import build_ds_config, job_spec
from ..hypernet.train import HypernetJob
from ..method.hypernet import loop
from ..method.hypernet.data import TokenSet, WordTable, rank_batches
from ..method.hypernet.models import build_model
from ..method.hypernet.settings import augment_spec, loss_spec, training_split
from ..runtime.job import job_main
from ..runtime.launch import LaunchTarget, launch_command, run_launcher
from ..synthetic.mapping import make_mapping

# This module is also the job the 1- and 2-rank runs launch: the hypernet job's setup, then timed steps.
TARGET = LaunchTarget("hyperofa_dist.bench.hypernet", "hypernet")
RESULT = "bench.json"

# The benchmark's fixed workload; `hyperofa bench hypernet key=value` overrides apply on top.
DATA = dict(n_words=20000, word_dim=64, v_source=8000, v_target=2000, k=32, max_len=40)
PROFILE = (
    "hypernet.model=bilstm", "hypernet.num_layers=1", "hypernet.hidden_size=256", "hypernet.dropout=0.1",
    "hypernet.batch_size=128", "hypernet.lr=0.001", "hypernet.threads_per_rank=1", "hypernet.zero=zero0",
    "hypernet.precision=fp32", "tracking.enabled=false",
)
STEPS, WARMUP = 40, 5


def plain_training(hp: Any, word_dim: int, k: int, seed: int) -> tuple[torch.nn.Module, Any, Callable]:
    """The single-process baseline: the configured model (weights from `seed`), torch Adam, and the `update`
    step loop.train_epoch calls with each loss."""
    torch.manual_seed(seed)
    model = build_model(hp.model, word_dim=word_dim, k=k, num_layers=hp.num_layers, hidden_size=hp.hidden_size,
                        num_heads=hp.num_heads, dropout=hp.dropout)
    optimizer = torch.optim.Adam(model.parameters(), lr=hp.lr)

    def update(loss: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return model, optimizer, update


def _baseline(config: Config) -> float:
    hp = config.hypernet
    mapping = load_mapping(config.run_dir)
    table = WordTable(mapping.word_vectors_path)
    train_ids = training_split(mapping)[0]["train"]
    tokens = TokenSet(train_ids, mapping.source_postings, np.asarray(mapping.source_coordinates), mapping.k)
    model, _, update = plain_training(hp, mapping.word_dim, mapping.k, config.run.seed)
    batches: list[np.ndarray] = []
    epoch = 0
    while len(batches) < STEPS + WARMUP:
        batches += rank_batches(tokens.lengths, batch_size=hp.batch_size, world_size=1, rank=0,
                                seed=config.run.seed, epoch=epoch, group_factor=hp.group_factor)
        epoch += 1
    kwargs = dict(seed=config.run.seed, epoch=0, rank=0, cap=hp.max_context, augment=augment_spec(hp),
                  loss=loss_spec(hp), device=torch.device("cpu"))
    model.train()
    loop.train_epoch(model, update, table, tokens, batches[:WARMUP], **kwargs)
    start = time.perf_counter()
    sums = loop.train_epoch(model, update, table, tokens, batches[WARMUP : WARMUP + STEPS], **kwargs)
    return float(sums[-1]) / (time.perf_counter() - start)


def _deepspeed(config: Config, out: Path, ranks: int) -> float:
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULT).unlink(missing_ok=True)
    job = write_job(out, job_spec(config, out, build_ds_config(config, "cpu"), None))
    cmd = launch_command(config.hypernet, job, TARGET, ranks=ranks)
    done = run_launcher(cmd, capture=True)
    if done.returncode != 0 or not (out / RESULT).is_file():
        tail = "\n".join(done.stdout.strip().splitlines()[-15:])
        print(tail, file=sys.stderr)
        raise HyperofaError(f"bench hypernet: the {ranks}-rank DeepSpeed run failed (exit {done.returncode})")
    return float(json.loads((out / RESULT).read_text())["samples_per_s"])


# --- the job side: one rank of the 1- or 2-rank run -----------------------------------------------------------


def probe(worker: HypernetJob, steps: int, warmup: int) -> dict[str, Any]:
    """Samples per second of steady-state training steps (all ranks), startup and warm-up excluded."""
    hp = worker.hp
    batches: list[np.ndarray] = []
    epoch = 0
    while len(batches) < steps + warmup:
        batches += worker.epoch_batches(epoch)
        epoch += 1
    kwargs = dict(seed=worker.seed, epoch=0, rank=worker.rank, cap=hp.max_context, augment=augment_spec(hp),
                  loss=loss_spec(hp), device=worker.device, dtype=worker.dtype)
    worker.engine.train()
    loop.train_epoch(worker.engine, worker.update, worker.table, worker.train_set, batches[:warmup], **kwargs)
    worker.barrier()
    start = time.perf_counter()
    sums = loop.train_epoch(worker.engine, worker.update, worker.table, worker.train_set,
                            batches[warmup : warmup + steps], **kwargs)
    worker.barrier()
    seconds = time.perf_counter() - start
    total = worker.all_sum(np.array([sums[-1]]))[0]
    return {"samples_per_s": total / seconds, "seconds": seconds, "samples": int(total), "world_size": worker.world}


def _job(spec: HypernetJobSpec, args: Any) -> int:
    worker = HypernetJob(spec)
    worker.setup()
    result = probe(worker, STEPS, WARMUP)
    if worker.rank == 0:
        atomic_write_json(worker.out / RESULT, result)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    return job_main(argv, "bench hypernet", HypernetJobSpec, _job)


# --- the command ------------------------------------------------------------------------------------------------


def run(config: Config, args: Any) -> int:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="hyperofa-bench-hypernet-") as tmp:
        work = Path(args.workdir).resolve() if getattr(args, "workdir", None) else Path(tmp)
        m = make_mapping(work, seed=config.run.seed, **DATA)
        overrides = [f"run.dir={work}", f"run.seed={config.run.seed}", f"vectors.path={m.vectors_file}",
                     f"mapping.num_primitives={m.k}", *PROFILE, *getattr(args, "overrides", [])]
        bench_config = load_config(getattr(args, "config", None), overrides)
        baseline = _baseline(bench_config)
        one = _deepspeed(bench_config, work / "hypernet-1", 1)
        two = _deepspeed(bench_config, work / "hypernet-2", 2)
    hp = bench_config.hypernet
    print(json.dumps({
        "bench": "hypernet",
        "baseline_samples_per_s": round(baseline, 2),
        "samples_per_s_1_rank": round(one, 2),
        "samples_per_s_2_ranks": round(two, 2),
        "ratio_1_rank_vs_baseline": round(one / baseline, 4),
        "scaling_2_vs_1": round(two / one, 4),
        "threads_per_process": 1,
        "model": hp.model, "hidden_size": hp.hidden_size, "num_layers": hp.num_layers,
        "micro_batch_per_rank": hp.batch_size, "steps": STEPS, "warmup": WARMUP, "zero": hp.zero,
        "word_dim": DATA["word_dim"], "k": DATA["k"],
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
