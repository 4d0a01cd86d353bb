"""From DeepSpeed checkpoints to a stock HF model directory, and to universal checkpoints.

Export (docs/DISTRIBUTED.md §2.3): `get_fp32_state_dict_from_zero_checkpoint` consolidates the ZeRO-1/2/3 partitions into
one fp32 state dict; it is loaded into the stock HF class built from the starting model's config and written with
`save_pretrained`, which re-ties the shared embedding/decoder matrix (`zero_to_fp32.py --safe_serialization`
fails on the tied tensors). The result loads with `AutoModelForMaskedLM.from_pretrained` (a causal LM's with
`AutoModelForCausalLM`; the class follows the starting model's config) and no custom code.
A factorised checkpoint (F_t and P trained) is exported as the same stock model with E = F_t P, and F_t.npy and
P.npy are written beside it so a user can continue factorised.

Universal checkpoints (docs/DISTRIBUTED.md §2.4) let a job resume on a different number of ranks:

    python -m deepspeed.checkpoint.ds_to_universal --input_folder ckpt/<tag> \\
        --output_folder ckpt/<tag>_universal --inject_missing_state

then `"checkpoint": {"load_universal": true}` and `load_checkpoint(ckpt, tag="<tag>_universal")`. The
`--inject_missing_state` flag is required for a non-Megatron loop. `hyperofa pretrain pretrain.resume=true
pretrain.universal=true` does both. Command line: `python -m hyperofa_dist.pretrain.export CKPT_DIR OUT_DIR
--model START_MODEL_DIR [--tag TAG]`.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

from ..errors import HyperofaError, exit_status
from ..formats.tokenizer import TOKENIZER_CONFIG, portable_config
from ..runtime.checkpoint import universal_tag

PREFIX = "model."  # the training wrapper (train.MaskedLMObjective) holds the HF model as `.model`
TOKENIZER_GLOBS = ("tokenizer*", "special_tokens_map.json", "sentencepiece.bpe.model", "vocab.*", "merges.txt")


def consolidated_state_dict(ckpt_dir: str | Path, tag: Optional[str] = None) -> dict:
    """The full fp32 state dict of the HF model inside a (ZeRO-partitioned) checkpoint."""
    import contextlib
    import sys

    from ..runtime.dsconfig import import_deepspeed

    import_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(sys.stderr):  # it reports its progress with print()
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    return {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in state.items()}


def export_hf(ckpt_dir: str | Path, tag: Optional[str], start_model: str | Path,
              out_dir: str | Path) -> tuple[Path, list[str]]:
    """Write `out_dir` as a stock HF masked- or causal-LM directory (weights + config + tokenizer) from a checkpoint; for a
    factorised checkpoint also F_t.npy and P.npy beside it. Returns (out_dir, the factor files' names)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    from ..formats.init import save_factors
    from ..formats.models import CAUSAL, model_kind_of
    from ..models.factorised import full_rank_state

    out_dir, start_model = Path(out_dir), Path(start_model)
    state, factors = full_rank_state(consolidated_state_dict(ckpt_dir, tag))
    config = AutoConfig.from_pretrained(str(start_model))
    causal = model_kind_of(start_model) == CAUSAL
    model = (AutoModelForCausalLM if causal else AutoModelForMaskedLM).from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if causal:
        # Only the weights this instance really ties may be absent: the class attribute `_tied_weights_keys`
        # names lm_head.weight even for an untied Llama, whose missing head must be an error.
        tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    else:
        tied = set(getattr(model, "_tied_weights_keys", None) or {})
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise HyperofaError(
            f"{ckpt_dir}: checkpoint does not match {start_model}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.tie_weights()
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for pattern in TOKENIZER_GLOBS:
        for path in start_model.glob(pattern):
            if path.is_file():
                shutil.copy2(path, tmp / path.name)
    if (tmp / TOKENIZER_CONFIG).is_file():  # a starting model saved elsewhere may carry a 5.x-only config
        portable_config(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    names: list[str] = []
    if factors is not None:
        names = save_factors(out_dir.parent, factors[0].numpy(), factors[1].numpy())
    return out_dir, names


def to_universal(ckpt_dir: str | Path, tag: str) -> str:
    """Convert `ckpt_dir/<tag>` to `ckpt_dir/<tag>_universal` once (ds_to_universal); returns the new tag."""
    ckpt_dir = Path(ckpt_dir)
    target = universal_tag(tag)
    if not (ckpt_dir / target).is_dir():
        tmp = ckpt_dir / f".{target}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [
            sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
            "--input_folder", str(ckpt_dir / tag), "--output_folder", str(tmp),
            "--inject_missing_state", "--num_extract_workers", "1", "--num_merge_workers", "1",
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise HyperofaError(f"{ckpt_dir / tag}: conversion to a universal checkpoint failed: {tail[0][:300]}")
        tmp.rename(ckpt_dir / target)
    return target


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="export a DeepSpeed pretraining checkpoint as an HF model dir")
    parser.add_argument("checkpoint_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--model", required=True, help="the model directory training started from (config, tokenizer)")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the one `latest` names)")
    args = parser.parse_args(argv)

    def export() -> None:
        _, factors = export_hf(args.checkpoint_dir, args.tag, args.model, args.out_dir)
        if factors:
            print(f"export: factorised checkpoint: {', '.join(factors)} written beside {args.out_dir}", file=sys.stderr)

    return exit_status("export", export)


if __name__ == "__main__":
    sys.exit(main())
