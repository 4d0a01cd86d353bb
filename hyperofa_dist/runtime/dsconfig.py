"""DeepSpeed JSON configs: templates in `ds_configs/` filled from our config at run time, never edited per run.

The templates live at the top of the repository; the build copies them into the package (`setup.py`), so an
installed package finds them as `hyperofa_dist/ds_configs/` through `importlib.resources`, and a source checkout
or an editable install finds them at the top of the repository.

A template fixes the ZeRO stage, buckets and offload; the values that belong to a run (micro-batch, gradient
accumulation, clipping, learning rate, weight decay, precision) are written there as "auto" and filled here from
the stage's config section, so the config tree stays the one source of truth. Precision "auto" means bf16 on a
GPU that supports it (fp16 on older GPUs) and fp32 on CPU. Keys that DeepSpeed 0.19.8 removed are rejected
here with the file and key named, before any process is launched (docs/DISTRIBUTED.md §2.1).
"""

from __future__ import annotations

import contextlib
import importlib.resources
import json
import sys
from pathlib import Path
from typing import Any, Optional

from ..errors import HyperofaError

TEMPLATE_NAMES = ("zero0", "zero1", "zero2", "zero2-offload", "zero3", "zero3-offload")
SOURCE_TEMPLATES_DIR = Path(__file__).resolve().parents[2] / "ds_configs"  # a source checkout, editable install


def templates_dir() -> Path:
    """Where the shipped templates are: inside the installed package, else at the top of the source tree."""
    packaged = importlib.resources.files("hyperofa_dist") / "ds_configs"
    if packaged.is_dir():
        return Path(str(packaged))  # a wheel is installed unpacked, so the resource is a plain directory
    if SOURCE_TEMPLATES_DIR.is_dir():
        return SOURCE_TEMPLATES_DIR
    raise HyperofaError(
        f"{packaged}: the DeepSpeed templates are missing from this installation (and no source tree's "
        f"{SOURCE_TEMPLATES_DIR} exists); reinstall hyperofa-dist from a wheel or a checkout"
    )

# DeepSpeed 0.19.8 raises DeepSpeedConfigError on these (deepspeed/runtime/config.py, issue #8489); a test keeps
# this list in step with the installed DeepSpeed.
REMOVED_TOP_LEVEL_KEYS = (
    "amp",
    "compression_training",
    "curriculum_learning",
    "eigenvalue",
    "elasticity",
    "graph_harvesting",
    "nebula",
    "progressive_layer_drop",
    "quantize_training",
    "sparse_attention",
    "sparse_gradients",
)
REMOVED_ZERO_KEYS = ("mics_hierarchical_params_gather", "mics_shard_size", "zeropp_loco_param")


def template_path(name_or_path: str) -> Path:
    """`zero1`..`zero3-offload` name a shipped template; anything else is a path to the user's own template."""
    path = templates_dir() / f"{name_or_path}.json" if name_or_path in TEMPLATE_NAMES else Path(name_or_path)
    if not path.is_file():
        raise HyperofaError(f"{path}: DeepSpeed config template not found (shipped: {', '.join(TEMPLATE_NAMES)})")
    return path


def load_template(name_or_path: str) -> tuple[dict[str, Any], Path]:
    path = template_path(name_or_path)
    try:
        template = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HyperofaError(f"{path}: not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(template, dict):
        raise HyperofaError(f"{path}: a DeepSpeed config must be a JSON object")
    reject_removed_keys(template, path)
    return template, path


def reject_removed_keys(cfg: dict[str, Any], source: Path | str) -> None:
    for key in REMOVED_TOP_LEVEL_KEYS:
        if key in cfg:
            raise HyperofaError(f"{source}: key {key!r} was removed in DeepSpeed 0.19.8 (issue #8489); delete it")
    zero = cfg.get("zero_optimization")
    if isinstance(zero, dict):
        for key in REMOVED_ZERO_KEYS:
            if key in zero:
                raise HyperofaError(
                    f"{source}: key 'zero_optimization.{key}' was removed in DeepSpeed 0.19.8 (issue #8489); delete it"
                )


def fill_ds_config(
    template: dict[str, Any],
    *,
    micro_batch: int,
    grad_accum: int,
    lr: float,
    precision: str,
    weight_decay: float = 0.0,
    clip: float = 0.0,
    torch_optimizer: bool = False,
    source: Path | str = "<template>",
) -> dict[str, Any]:
    """The template with every run value written in; fails if a template hard-codes one of them.

    `torch_optimizer` makes DeepSpeed use torch's Adam(W) instead of a compiled op: on CPU the fused/CPU Adam is
    compiled on first use (minutes), and the hypernetwork's reference optimizer is torch's Adam anyway.
    """
    if precision not in ("fp32", "bf16", "fp16"):
        raise HyperofaError(f"precision {precision!r} must be resolved to fp32, bf16 or fp16 before filling")
    cfg = json.loads(json.dumps(template))
    reject_removed_keys(cfg, source)
    ours: dict[tuple[str, ...], Any] = {
        ("train_micro_batch_size_per_gpu",): micro_batch,
        ("gradient_accumulation_steps",): grad_accum,
        ("gradient_clipping",): clip,
        ("bf16", "enabled"): precision == "bf16",
        ("fp16", "enabled"): precision == "fp16",
    }
    if "optimizer" in cfg:
        ours[("optimizer", "params", "lr")] = lr
        ours[("optimizer", "params", "weight_decay")] = weight_decay
    for keys, value in ours.items():
        _set_owned(cfg, keys, value, source)
    if "optimizer" in cfg and torch_optimizer:
        cfg["optimizer"]["params"]["torch_adam"] = True
    cfg.pop("train_batch_size", None)  # micro x accumulation x world size: left to DeepSpeed for any rank count
    leftover = _find_auto(cfg)
    if leftover:
        raise HyperofaError(f"{source}: key {leftover} is 'auto' but nothing fills it; give it a value")
    return cfg


def _set_owned(cfg: dict[str, Any], keys: tuple[str, ...], value: Any, source: Path | str) -> None:
    node = cfg
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise HyperofaError(f"{source}: key {'.'.join(keys[:-1])} must be an object")
    current = node.get(keys[-1], "auto")
    if current != "auto":
        raise HyperofaError(
            f"{source}: key {'.'.join(keys)} is {current!r}; it must be \"auto\" (it is filled from the config)"
        )
    node[keys[-1]] = value


def _find_auto(node: Any, prefix: str = "") -> Optional[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            found = _find_auto(value, f"{prefix}{key}.")
            if found:
                return found
    elif node == "auto":
        return prefix.rstrip(".")
    return None


def import_deepspeed() -> Any:
    """DeepSpeed, imported with stdout pointed at stderr: its logger binds the stream it finds at first import and
    its checkpoint tools print, while a driver's stdout carries results only (the demo's table, a bench's JSON)."""
    with contextlib.redirect_stdout(sys.stderr):
        import deepspeed
    return deepspeed


def validate_ds_config(cfg: dict[str, Any], source: Path | str) -> None:
    """Parse the filled config with the installed DeepSpeed: removed keys and any other rejected value fail here,
    before a process is launched."""
    import_deepspeed()
    from deepspeed.runtime.config import DeepSpeedConfig

    try:
        DeepSpeedConfig(json.loads(json.dumps(cfg)))
    except Exception as exc:  # DeepSpeedConfigError, pydantic errors, assertion errors: all mean "fix the file"
        import deepspeed

        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise HyperofaError(f"{source}: DeepSpeed {deepspeed.__version__} rejects this config: {first[:300]}") from None
