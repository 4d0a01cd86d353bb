"""`hyperofa bench pretrain-sweep`: where a pretraining step's time goes, lever by lever, on one device.

Each configuration trains the bench model (XLM-R-base shape, Glot500's 401,145 rows, sequence 512; bf16 on a GPU)
on our DeepSpeed engine with the masked-position head, exactly as `hyperofa bench pretrain` does, and changes one
lever against the default:

    default             the job as it runs today
    pad64               vocabulary rows padded to a multiple of 64 (tensor-core shapes; the export would unpad)
    sdpa                scaled-dot-product attention kernels instead of eager attention
    fused_adamw         torch's fused AdamW through DeepSpeed's client optimizer (`fused=True`)
    device_checks       the non-finite loss check kept on the device and read every 50 steps (the job reads it
                        after every micro-step, a host sync each time)
    dense_lookup_grad   the stock dense gradient of the tied lookup instead of the sparse one
    gpu_masks           masks drawn on the device instead of on the host and copied
    zero1               ZeRO stage 1 instead of 2
    micro_batch_<n>     other micro-batch sizes (accumulation adjusted to keep the tokens per step)
    combined            pad64 + sdpa + fused_adamw + device_checks + gpu_masks together
    compile             `torch.compile` of the encoder (last: it leaves compiled code behind in the process)

For each it writes `<out>/<name>.json` and prints one JSON line: tokens/s, MFU (model FLOPs as
`pretrain/perf.py` counts them, the head at masked positions only), peak memory (CUDA peak allocation, reset per
configuration; on a CPU the process's peak RSS so far), and the time per optimizer step split into phases: data
(masking and the copy to the device), forward, backward, step (DeepSpeed's optimizer step and gradient
reduction) and sync (the non-finite checks that wait for the device). Phases come from CUDA events on a GPU and
wall-clock on a CPU. A last line names the fastest configuration.

`--dry-run` runs every lever but `compile` at a toy shape on whatever device there is, in seconds: it checks the
sweep end to end (CI runs it) and measures nothing worth reading. The import path needs torch, transformers,
deepspeed, pydantic and PyYAML only (no Ray, MLflow or webdataset), so a bare GPU machine needs just those wheels
(launch/gpu_sweep.sh).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

# Levers that combine into `combined` (compile stays separate: its cost is paid once per process).
COMBINED = ("pad64", "sdpa", "fused_adamw", "device_checks", "gpu_masks")
PHASES = ("data", "forward", "backward", "step", "sync")


@dataclass(frozen=True)
class Lever:
    pad_to: int = 1
    attention: str = "eager"
    fused: bool = False
    check_every: int = 0  # 0: read the non-finite check after every micro-step, as the job does
    sparse_lookup: bool = True
    gpu_masks: bool = False
    zero: Optional[str] = None
    micro_batch: Optional[int] = None
    compile: bool = False


SINGLE = {
    "default": Lever(),
    "pad64": Lever(pad_to=64),
    "sdpa": Lever(attention="sdpa"),
    "fused_adamw": Lever(fused=True),
    "device_checks": Lever(check_every=50),
    "dense_lookup_grad": Lever(sparse_lookup=False),
    "gpu_masks": Lever(gpu_masks=True),
    "zero1": Lever(zero="zero1"),
}


def combined() -> Lever:
    merged: dict[str, Any] = {}
    for name in COMBINED:
        lever = SINGLE[name]
        merged.update({k: v for k, v in lever.__dict__.items() if v != getattr(Lever(), k)})
    return Lever(**merged)


def configurations(micro_batches: tuple[int, ...], with_compile: bool) -> dict[str, Lever]:
    out = dict(SINGLE)
    for n in micro_batches:
        out[f"micro_batch_{n}"] = Lever(micro_batch=n)
    out["combined"] = combined()
    if with_compile:
        out["compile"] = Lever(compile=True)
    return out


@dataclass
class Shape:
    vocab_size: int = 401_145
    hidden_size: int = 768
    num_layers: int = 12
    seq_len: int = 512
    micro_batch_size: int = 16
    tokens_per_step: int = 16 * 512 * 2  # micro-batch x sequence x accumulation of the default
    warmup: int = 3
    steps: int = 8

    @property
    def grad_accum(self) -> int:
        return max(1, self.tokens_per_step // (self.micro_batch_size * self.seq_len))


TOY = Shape(vocab_size=3000, hidden_size=32, num_layers=1, seq_len=64, micro_batch_size=2,
            tokens_per_step=2 * 64 * 2, warmup=1, steps=2)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseClock:
    """Time per phase: CUDA events on a GPU (no host sync until the end), wall clock on a CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.marks: list[tuple[str, Any]] = []
        self.totals = {phase: 0.0 for phase in PHASES}

    def start(self) -> None:
        self.marks = [("", self._now())]

    def mark(self, phase: str) -> None:
        self.marks.append((phase, self._now()))

    def _now(self) -> Any:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def collect(self) -> None:
        _sync(self.device)
        for (_, before), (phase, after) in zip(self.marks, self.marks[1:]):
            if self.device.type == "cuda":
                self.totals[phase] += before.elapsed_time(after) / 1000.0
            else:
                self.totals[phase] += after - before
        self.marks = []


def measure(shape: Shape, lever: Lever, base_config: Any, device: torch.device, precision: str) -> dict[str, Any]:
    """One configuration on our engine; returns its JSON record."""
    import deepspeed

    from ..models.factorised import parameter_counts
    from ..models.mlm import mask_tokens
    from ..pretrain.optim import param_groups
    from ..pretrain.perf import model_flops_per_token, peak_flops
    from ..pretrain.stage import build_ds_config
    from ..pretrain.train import MaskedLMObjective
    from .pretrain import build_model

    micro = lever.micro_batch or shape.micro_batch_size
    accum = max(1, shape.tokens_per_step // (micro * shape.seq_len))
    rows = -(-shape.vocab_size // lever.pad_to) * lever.pad_to
    bench = replace_bench(base_config.pretrain.bench, shape, rows)
    model = build_model(bench)
    model.config._attn_implementation = lever.attention  # noqa: SLF001 - the documented switch after build
    if not lever.sparse_lookup:
        model.get_input_embeddings().sparse = False
    counts = parameter_counts(model)
    config = base_config.with_changes({"pretrain.zero": lever.zero or base_config.pretrain.zero})
    ds_config = build_ds_config(config, precision)
    ds_config.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum)
    if lever.fused:
        ds_config["optimizer"]["params"]["fused"] = True
    if lever.compile:
        base = getattr(model, model.base_model_prefix)
        setattr(model, model.base_model_prefix, torch.compile(base))
    objective = MaskedLMObjective(model)
    if not lever.sparse_lookup:
        model.get_input_embeddings().sparse = False  # MaskedLMObjective switched it on
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    engine, *_ = deepspeed.initialize(model=objective, model_parameters=param_groups(model, 0.0), config=ds_config)

    special = torch.tensor([0, 1, 2, 3, 4])
    host_gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, shape.vocab_size, (micro, shape.seq_len), generator=host_gen)
    ids[:, 0], ids[:, -1] = 0, 2
    mask_device = device if lever.gpu_masks else torch.device("cpu")
    gen = torch.Generator(device=mask_device).manual_seed(0)
    source = ids.to(mask_device)
    special = special.to(mask_device)
    clock = PhaseClock(device)
    pending = torch.zeros((), dtype=torch.float64, device=device)
    predicted = []

    def micro_step(step: int) -> None:
        nonlocal pending
        inputs, labels = mask_tokens(source, special, 4, shape.vocab_size, gen, 0.15)
        inputs = inputs.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        clock.mark("data")
        loss, _ = engine(inputs, labels)
        clock.mark("forward")
        check = loss.detach().double()
        if lever.check_every == 0:
            if not bool(torch.isfinite(check)):  # the job's per-micro-step read
                raise RuntimeError("non-finite loss")
            clock.mark("sync")
        else:
            pending = pending + check
            if step % lever.check_every == 0 and not bool(torch.isfinite(pending)):
                raise RuntimeError("non-finite loss")
        engine.backward(loss)
        clock.mark("backward")
        engine.step()
        clock.mark("step")
        predicted.append(labels)

    def optimizer_step(step: int) -> None:
        clock.start()
        for _ in range(accum):
            micro_step(step)
        clock.collect()

    for step in range(1, shape.warmup + 1):
        optimizer_step(step)
    clock.totals = {phase: 0.0 for phase in PHASES}
    predicted.clear()
    _sync(device)
    started = time.perf_counter()
    for step in range(1, shape.steps + 1):
        optimizer_step(step)
    _sync(device)
    seconds = time.perf_counter() - started
    tokens = micro * shape.seq_len * accum * shape.steps
    share = float(torch.stack([(p != -100).float().mean() for p in predicted]).mean())
    flops = model_flops_per_token(model, shape.seq_len, share)
    peak = peak_flops(base_config.pretrain.peak_tflops)
    record = {
        "vocab_rows": rows, "hidden_size": shape.hidden_size, "num_layers": shape.num_layers, "seq_len": shape.seq_len,
        "micro_batch_size": micro, "grad_accum": accum, "precision": precision,
        "zero": lever.zero or base_config.pretrain.zero, "lever": {k: v for k, v in lever.__dict__.items()},
        "tokens_per_s": tokens / seconds, "seconds_per_step": seconds / shape.steps,
        "phases_s_per_step": {phase: total / shape.steps for phase, total in clock.totals.items()},
        "peak_memory_gib": _peak_memory_gib(device), "parameters_total": counts["parameters_total"],
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
    record["mfu"] = tokens / seconds * flops / peak if peak else None
    if hasattr(engine, "destroy"):
        engine.destroy()
    return record


def replace_bench(bench: Any, shape: Shape, rows: int) -> Any:
    return bench.model_copy(update={"vocab_size": rows, "hidden_size": shape.hidden_size,
                                    "num_layers": shape.num_layers, "seq_len": shape.seq_len})


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def sweep(config: Any, out_dir: Optional[Path], dry_run: bool, only: Optional[list[str]] = None) -> list[dict]:
    from ..runtime.device import resolve_precision
    from .pretrain import _init_single_process

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda", 0) if on_gpu else torch.device("cpu")
    precision = resolve_precision(config.pretrain.precision, "cuda" if on_gpu else "cpu", "pretrain.precision")
    shape = TOY if dry_run else Shape(micro_batch_size=16 if on_gpu else 3, warmup=3 if on_gpu else 1,
                                      steps=8 if on_gpu else 2)
    micro_batches = (1, 4) if dry_run else ((8, 32) if on_gpu else (1, 6))
    chosen = configurations(micro_batches, with_compile=not dry_run)
    if only:
        unknown = sorted(set(only) - set(chosen))
        if unknown:
            from ..errors import HyperofaError

            raise HyperofaError(f"pretrain-sweep: unknown configurations {unknown}; known: {sorted(chosen)}")
        chosen = {name: chosen[name] for name in only}
    from ..runtime.dsconfig import import_deepspeed

    import_deepspeed()  # its logger binds stdout at import: bind it to stderr, stdout carries the JSON lines
    with contextlib.redirect_stdout(sys.stderr):
        _init_single_process()
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for name, lever in chosen.items():
        with contextlib.redirect_stdout(sys.stderr):
            record = {"configuration": name, **measure(shape, lever, config, device, precision)}
        gc.collect()  # the engine, model and optimizer state of the last configuration go before the next
        if on_gpu:
            torch.cuda.empty_cache()
        record["dry_run"] = dry_run
        if out_dir is not None:
            (out_dir / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        print(json.dumps(record), flush=True)
        records.append(record)
    best = max(records, key=lambda r: r["tokens_per_s"])
    default = next((r for r in records if r["configuration"] == "default"), None)
    print(json.dumps({"bench": "pretrain-sweep", "fastest": best["configuration"],
                      "tokens_per_s": best["tokens_per_s"], "mfu": best["mfu"],
                      "speedup_over_default": best["tokens_per_s"] / default["tokens_per_s"] if default else None,
                      "configurations": len(records), "dry_run": dry_run}), flush=True)
    return records


def run(config: Any, args: Any = None) -> int:
    out = Path(args.workdir) if args is not None and getattr(args, "workdir", None) else None
    sweep(config, out, dry_run=bool(getattr(args, "dry_run", False)))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m hyperofa_dist.bench.sweep [--dry-run] [--out DIR] [--only a,b] [key=value ...]`."""
    from ..config import load_config
    from ..errors import exit_status

    parser = argparse.ArgumentParser(description="pretraining step: time per lever and phase, one JSON line each")
    parser.add_argument("--dry-run", action="store_true", help="toy shape: checks the sweep runs, measures nothing")
    parser.add_argument("--out", help="write <configuration>.json files here")
    parser.add_argument("--only", help="comma-separated configurations to run")
    parser.add_argument("overrides", nargs="*", help="config key=value")
    args = parser.parse_args(argv)
    return exit_status("pretrain-sweep", lambda: sweep(
        load_config(None, ["tracking.enabled=false", *args.overrides]), Path(args.out) if args.out else None,
        args.dry_run, args.only.split(",") if args.only else None))


if __name__ == "__main__":
    sys.exit(main())
