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
from typing import Any

import numpy as np
import torch

from ..config import Config, load_config
from ..errors import HyperofaError
from . import loop
from .data import TokenSet, WordTable, rank_batches
from .inputs import load_mapping
from .launch import launch_command, run_launcher
from .models import build_model
from .synthetic_mapping import make_mapping
from .train import augment_spec, loss_spec

# The benchmark's fixed workload; `hyperofa bench hypernet key=value` overrides apply on top.
DATA = dict(n_words=20000, word_dim=64, v_source=8000, v_target=2000, k=32, max_len=40)
PROFILE = (
    "hypernet.model=bilstm", "hypernet.num_layers=1", "hypernet.hidden_size=256", "hypernet.dropout=0.1",
    "hypernet.batch_size=128", "hypernet.lr=0.001", "hypernet.threads_per_rank=1", "hypernet.zero=zero0",
    "hypernet.precision=fp32", "tracking.enabled=false",
)
STEPS, WARMUP = 40, 5


def _baseline(config: Config) -> float:
    hp = config.hypernet
    mapping = load_mapping(config, check_vectors=False)
    table = WordTable(mapping.word_vectors)
    tokens = TokenSet(mapping.splits["train"], mapping.source_postings(), mapping.coordinates(), mapping.k)
    torch.manual_seed(config.run.seed)
    model = build_model(hp.model, word_dim=mapping.word_dim, k=mapping.k, num_layers=hp.num_layers,
                        hidden_size=hp.hidden_size, num_heads=hp.num_heads, dropout=hp.dropout)
    optimizer = torch.optim.Adam(model.parameters(), lr=hp.lr)

    def update(loss: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

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
    from .stage import build_ds_config, write_job

    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").unlink(missing_ok=True)
    job = write_job(config, out, build_ds_config(config, "cpu"), None)
    cmd = launch_command(config.hypernet, job, ranks=ranks,
                         extra=("--bench-steps", str(STEPS), "--bench-warmup", str(WARMUP)))
    done = run_launcher(cmd, None, capture=True)
    if done.returncode != 0 or not (out / "bench.json").is_file():
        tail = "\n".join(done.stdout.strip().splitlines()[-15:])
        print(tail, file=sys.stderr)
        raise HyperofaError(f"bench hypernet: the {ranks}-rank DeepSpeed run failed (exit {done.returncode})")
    return float(json.loads((out / "bench.json").read_text())["samples_per_s"])


def bench_hypernet(config: Config, args: Any) -> int:
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
