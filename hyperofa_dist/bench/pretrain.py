"""`hyperofa bench pretrain`: our DeepSpeed MLM step against a plain PyTorch loop with the stock full-logits head.

Both loops train the same model (XLM-R-base shape with Glot500's 401,145-token vocabulary by default, sequence
512; the `pretrain.bench.*` keys change it) on the same batch and mask, with the same accumulation (one optimizer
step every `pretrain.bench.grad_accum` micro-steps), in this process, one after the other:
  baseline  stock `XLMRobertaForMaskedLM(input_ids, labels).loss` (logits at every position), torch AdamW,
            clipping; autocast bf16 on a GPU;
  ours      a `deepspeed.initialize` engine on the job's template (`pretrain.zero`, ZeRO-2 by default; world size 1)
            whose forward is the masked-positions-only head with the sparse tied-lookup gradient, with the job's
            AdamW groups, clipping and precision; `pretrain.compile=true` compiles the encoder.
Untimed warm-up steps come first; tokens/s counts every position of every sequence. On a GPU, MFU counts model FLOPs as
`pretrain/perf.py` does, with the measured share of predicted positions (ours) or 1 (baseline). Prints one JSON line.

With `pretrain.embeddings=factorised` the comparison is factorised against full-rank embeddings, both on our
engine: each runs in its own fresh process (so each peak memory is its own: CUDA peak allocation on a GPU, peak RSS
on a CPU), the factorised one with F_t [V, k] and P [k, D] at k = `pretrain.bench.rank` (values drawn at random:
speed and memory do not depend on them). The line then carries `tokens_per_s` and `peak_memory_gib` of the
factorised run beside `baseline_*` of the full-rank one, and both parameter counts.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from ..config import Config
from ..models.mlm import mask_tokens
from ..pretrain.optim import param_groups
from ..pretrain.perf import model_flops_per_token, peak_flops
from ..runtime.device import resolve_precision
from .fresh import child_main, in_fresh_processes


def build_model(bench) -> torch.nn.Module:
    from transformers import XLMRobertaConfig, XLMRobertaForMaskedLM

    cfg = XLMRobertaConfig(
        vocab_size=bench.vocab_size,
        hidden_size=bench.hidden_size,
        num_hidden_layers=bench.num_layers,
        num_attention_heads=max(1, bench.hidden_size // 64),
        intermediate_size=4 * bench.hidden_size,
        max_position_embeddings=bench.seq_len + 2,
        tie_word_embeddings=True,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    return XLMRobertaForMaskedLM(cfg)


def make_batch(bench, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-length blocks framed like prepare's (`<s> ... </s>`), masked 15% with 80/10/10."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, bench.vocab_size, (batch, bench.seq_len), generator=gen)
    ids[:, 0], ids[:, -1] = 0, 2
    return mask_tokens(ids, torch.tensor([0, 1, 2, 3, 4]), 4, bench.vocab_size, gen, 0.15)


def _timed(step: Callable[[], None], warmup: int, steps: int, device: torch.device) -> float:
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def baseline_seconds(model, ids, labels, bench, device, precision: str) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda" or None)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(enabled=precision == "fp16")

    def step() -> None:
        for _ in range(bench.grad_accum):
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = model(input_ids=ids, labels=labels).loss
            scaler.scale(loss / bench.grad_accum).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return _timed(step, bench.warmup, bench.steps, device)  # the optimizer state goes with `step`


def ours_seconds(config: Config, model, ids, labels, bench, device, precision: str) -> float:
    """The job's own engine: `pretrain.zero` (or `pretrain.ds_config`) filled as `hyperofa pretrain` fills it,
    with the bench's micro-batch and accumulation."""
    import deepspeed

    from ..pretrain.stage import build_ds_config
    from ..pretrain.train import MaskedLMObjective

    ds_config = build_ds_config(config, precision)
    ds_config.update(train_micro_batch_size_per_gpu=ids.shape[0], gradient_accumulation_steps=bench.grad_accum)
    groups = param_groups(model, 0.0)
    if config.pretrain.compile:
        base = getattr(model, model.base_model_prefix)
        setattr(model, model.base_model_prefix, torch.compile(base))
    engine, *_ = deepspeed.initialize(model=MaskedLMObjective(model), model_parameters=groups, config=ds_config)

    def step() -> None:
        for _ in range(bench.grad_accum):
            loss, _ = engine(ids, labels)
            engine.backward(loss)
            engine.step()

    seconds = _timed(step, bench.warmup, bench.steps, device)
    engine.destroy() if hasattr(engine, "destroy") else None
    return seconds


def _init_single_process() -> None:
    import deepspeed

    from ..runtime.launch import free_port

    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def run(config: Config, args: Any = None) -> int:
    # DeepSpeed logs and prints to stdout (its logger binds the stream at import): keep stdout for the JSON line.
    with contextlib.redirect_stdout(sys.stderr):
        if config.pretrain.embeddings == "factorised":
            result = measure_factorised(config)
        else:
            result = measure(config)
    print(json.dumps(result), flush=True)
    return 0


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


@dataclass(frozen=True)
class Setup:
    """What both measurements share: the device, the precision and the one masked batch."""

    device: torch.device
    device_name: str
    precision: str
    batch: int
    ids: torch.Tensor  # on the CPU
    labels: torch.Tensor
    predicted: float  # share of positions the loss scores
    tokens: int  # positions in all timed steps


def setup(config: Config) -> Setup:
    bench = config.pretrain.bench
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda", 0) if on_gpu else torch.device("cpu")
    precision = resolve_precision(config.pretrain.precision, "cuda" if on_gpu else "cpu", "pretrain.precision")
    batch = bench.micro_batch_size or (16 if on_gpu else 3)
    ids, labels = make_batch(bench, batch, config.run.seed)
    return Setup(device, torch.cuda.get_device_name() if on_gpu else "cpu", precision, batch, ids, labels,
                 float((labels != -100).float().mean()), batch * bench.seq_len * bench.grad_accum * bench.steps)


def measure_one(config: Config, embeddings: str) -> dict[str, Any]:
    """Our engine on full-rank or factorised embeddings, in this (fresh) process: tokens/s, peak memory, sizes."""
    import numpy as np

    from ..models.factorised import factorise, parameter_counts, zero3_external_parameters

    bench, run = config.pretrain.bench, setup(config)
    model = build_model(bench)
    if embeddings == "factorised":
        rng = np.random.default_rng(config.run.seed)
        coordinates = rng.standard_normal((bench.vocab_size, bench.rank), dtype=np.float32) * 0.02
        primitives = rng.standard_normal((bench.rank, bench.hidden_size), dtype=np.float32) * 0.05
        factorise(model, coordinates, primitives)
        del coordinates
        if config.pretrain.zero.startswith("zero3"):
            zero3_external_parameters(model)
    counts = parameter_counts(model)
    flops = model_flops_per_token(model, bench.seq_len, run.predicted)
    model = model.to(run.device)
    _init_single_process()
    seconds = ours_seconds(config, model, run.ids.to(run.device), run.labels.to(run.device), bench, run.device,
                           run.precision)
    peak = peak_flops(config.pretrain.peak_tflops)
    out = {"embeddings": embeddings, "tokens_per_s": run.tokens / seconds,
           "peak_memory_gib": _peak_memory_gib(run.device), "micro_batch_size": run.batch,
           "precision": run.precision, **counts, "device": run.device_name}
    if peak:
        out["mfu"] = run.tokens / seconds * flops / peak
    return out


def measure_factorised(config: Config) -> dict[str, Any]:
    """Full-rank and factorised runs of our engine, each in a fresh process, compared in one line."""
    runs = in_fresh_processes(config, __name__, "one", {"full": "full", "factorised": "factorised"}, "pretrain")
    bench, full, fact = config.pretrain.bench, runs["full"], runs["factorised"]
    result = {
        "vocab_size": bench.vocab_size, "hidden_size": bench.hidden_size, "num_layers": bench.num_layers,
        "seq_len": bench.seq_len, "rank": bench.rank, "micro_batch_size": fact["micro_batch_size"],
        "grad_accum": bench.grad_accum, "zero": config.pretrain.ds_config or config.pretrain.zero,
        "precision": fact["precision"], "device": fact["device"], "embeddings": "factorised",
        "tokens_per_s": fact["tokens_per_s"], "baseline_tokens_per_s": full["tokens_per_s"],
        "speedup": fact["tokens_per_s"] / full["tokens_per_s"],
        "peak_memory_gib": fact["peak_memory_gib"], "baseline_peak_memory_gib": full["peak_memory_gib"],
        "memory_ratio": fact["peak_memory_gib"] / full["peak_memory_gib"],
        "parameters_total": fact["parameters_total"], "baseline_parameters_total": full["parameters_total"],
        "parameters_embeddings": fact["parameters_embeddings"],
        "baseline_parameters_embeddings": full["parameters_embeddings"],
    }
    if "mfu" in fact:
        result.update(mfu=fact["mfu"], baseline_mfu=full["mfu"])
    return result


def _main(argv: Optional[list[str]] = None) -> int:
    """One measurement in a fresh process: `python -m hyperofa_dist.bench.pretrain --one full --config c.json`."""
    return child_main(argv, "one", measure_one, choices=("full", "factorised"))


if __name__ == "__main__":
    sys.exit(_main())


def measure(config: Config) -> dict[str, Any]:
    bench, run = config.pretrain.bench, setup(config)
    device, precision, tokens = run.device, run.precision, run.tokens
    ids, labels = run.ids.to(device), run.labels.to(device)

    model = build_model(bench).to(device)
    full_flops = model_flops_per_token(model, bench.seq_len, 1.0)
    ours_flops = model_flops_per_token(model, bench.seq_len, run.predicted)
    base_s = baseline_seconds(model, ids, labels, bench, device, precision)
    model.zero_grad(set_to_none=True)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    _init_single_process()
    ours_s = ours_seconds(config, model, ids, labels, bench, device, precision)

    peak: Optional[float] = peak_flops(config.pretrain.peak_tflops)
    result: dict[str, Any] = {
        "vocab_size": bench.vocab_size,
        "hidden_size": bench.hidden_size,
        "num_layers": bench.num_layers,
        "seq_len": bench.seq_len,
        "micro_batch_size": run.batch,
        "grad_accum": bench.grad_accum,
        "zero": config.pretrain.ds_config or config.pretrain.zero,
        "precision": precision,
        "device": run.device_name,
        "tokens_per_s": tokens / ours_s,
        "baseline_tokens_per_s": tokens / base_s,
        "speedup": base_s / ours_s,
        "predicted_share": run.predicted,
    }
    if peak:
        result["mfu"] = tokens / ours_s * ours_flops / peak
        result["baseline_mfu"] = tokens / base_s * full_flops / peak
    return result
