"""`hyperofa bench causal-loss`: peak memory of a causal LM's loss with chunked logits against full logits.

The loss of `tokens` hidden states [T, H] under an output projection [V, H] (Llama 3's V = 128,256, 4,096 tokens,
H = 256 by default: `pretrain.bench.loss_*`), forward and backward, two ways, each in a fresh process so each
peak is its own:
  baseline  F.cross_entropy over the full [T, V] logits (what the stock HF head computes);
  ours      models/causal.py's ChunkedLinearCE, `pretrain.loss_chunk` tokens at a time (recomputing backward).
Peak memory is the growth of the process's peak above what the inputs, weights and their gradients' setup took:
peak RSS on a CPU, CUDA's peak allocation on a GPU (bf16 weights there, fp32 on a CPU, as the job trains). Both
losses and the time of each are in the line; the losses must agree. Prints one JSON line.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from typing import Any, Optional

from ..config import Config
from .fresh import child_main, in_fresh_processes


def measure_one(config: Config, chunk: int) -> dict[str, Any]:
    """One forward and backward of the loss in this (fresh) process: peak memory above setup, seconds, loss."""
    import torch

    from ..models.causal import IGNORE, linear_cross_entropy
    from ..runtime.device import resolve_precision

    bench = config.pretrain.bench
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda", 0) if on_gpu else torch.device("cpu")
    precision = resolve_precision(config.pretrain.precision, device.type, "pretrain.precision")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    gen = torch.Generator().manual_seed(config.run.seed)
    hidden = (torch.randn(bench.loss_tokens, bench.loss_hidden_size, generator=gen) * 0.5).to(device, dtype)
    weight = (torch.randn(bench.loss_vocab_size, bench.loss_hidden_size, generator=gen) * 0.02).to(device, dtype)
    labels = torch.randint(bench.loss_vocab_size, (bench.loss_tokens,), generator=gen).to(device)
    labels[:: 2 * max(1, bench.loss_tokens // 64)] = IGNORE  # a few unscored positions, as a block's last ones
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    # The gradients' own buffers belong to any training step: allocate them before the baseline reading.
    hidden.grad, weight.grad = torch.zeros_like(hidden), torch.zeros_like(weight)
    base = _peak_bytes(device, reset=True)
    start = time.perf_counter()
    loss = linear_cross_entropy(hidden, weight, labels, chunk=chunk)
    loss.backward()
    if on_gpu:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"peak_memory_gib": (_peak_bytes(device) - base) / 2**30, "seconds": seconds, "loss": float(loss.detach()),
            "precision": precision, "device": torch.cuda.get_device_name() if on_gpu else "cpu"}


def _peak_bytes(device: Any, reset: bool = False) -> float:
    import torch

    if device.type == "cuda":
        if reset:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
            return float(torch.cuda.memory_allocated(device))
        return float(torch.cuda.max_memory_allocated(device))
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0  # KiB on Linux


def run(config: Config, args: Any = None) -> int:
    from ..errors import HyperofaError

    bench, chunk = config.pretrain.bench, config.pretrain.loss_chunk
    if chunk <= 0:
        raise HyperofaError("bench causal-loss: pretrain.loss_chunk must be positive (0 is the full-logits baseline)")
    with contextlib.redirect_stdout(sys.stderr):
        runs = in_fresh_processes(config, __name__, "chunk", {"full": "0", "chunked": str(chunk)}, "causal-loss")
    full, ours = runs["full"], runs["chunked"]
    result = {
        "vocab_size": bench.loss_vocab_size, "tokens": bench.loss_tokens, "hidden_size": bench.loss_hidden_size,
        "chunk": chunk, "precision": ours["precision"], "device": ours["device"],
        "peak_memory_gib": ours["peak_memory_gib"], "baseline_peak_memory_gib": full["peak_memory_gib"],
        "memory_ratio": ours["peak_memory_gib"] / full["peak_memory_gib"] if full["peak_memory_gib"] > 0 else None,
        "seconds": ours["seconds"], "baseline_seconds": full["seconds"],
        "loss": ours["loss"], "baseline_loss": full["loss"],
        "loss_relative_difference": abs(ours["loss"] - full["loss"]) / abs(full["loss"]),
    }
    print(json.dumps(result), flush=True)
    return 0


def _main(argv: Optional[list[str]] = None) -> int:
    """One measurement in a fresh process: `python -m hyperofa_dist.bench.causal_loss --chunk N --config c.json`."""
    return child_main(argv, "chunk", measure_one, type=int, help="tokens per chunk; 0: full logits")


if __name__ == "__main__":
    sys.exit(_main())
