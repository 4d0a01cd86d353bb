"""`hyperofa pretrain`: check everything that can be checked, launch the DeepSpeed job, export, write the manifest.

Before any process is launched: the prepare shards must have been made with the model's tokenizer (the sha256
of `tokenizer.json` recorded by prepare against the model directory's), the blocks must fit the model's position
embeddings, the DeepSpeed config (template + our values) must parse under the installed DeepSpeed (removed keys
are rejected), and a resume must find a checkpoint written by the same number of ranks unless
`pretrain.universal` converts it. The job then runs under the `deepspeed` launcher; when it ends, the last
checkpoint is exported to a stock HF model directory `<run.dir>/pretrain/<method>/model/` and the manifest is
written last.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

from ..artifacts import Stage, atomic_write_json, digest, sha256_file
from ..config import Config
from ..errors import HyperofaError
from ..hypernet.launch import launch_command, planned_world_size, run_launcher
from ..target import tokenizer_fingerprint
from .data import load_shardset

STAGE = "pretrain"
JOB_MODULE = "hyperofa_dist.pretrain.train"
# Keys that change how the job is (re)started or benchmarked, not what it produces.
RESTART_KEYS = ("resume", "universal", "master_port", "launcher", "hostfile", "bench")
JOB_FILES = ("train_log.jsonl", "eval_log.jsonl", "probe.pt", "failure.json", "job.json")


def stage_of(config: Config) -> Stage:
    return Stage(config.run_dir / STAGE, config.pretrain.method)


def resolve_model(config: Config) -> Path:
    """The model to train: `pretrain.model`, else the init stage's `<run.dir>/init/<method>/model`."""
    p = config.pretrain
    if p.model:
        path = Path(p.model).resolve()
    else:
        Stage(config.run_dir / "init", p.method).require()
        path = config.run_dir / "init" / p.method / "model"
    if not (path / "config.json").is_file():
        raise HyperofaError(f"{path}: not an HF model directory (config.json missing)")
    if not (path / "tokenizer.json").is_file():
        raise HyperofaError(f"{path}: the model directory has no tokenizer.json (its tokenizer is needed)")
    return path


def check_tokenizer_match(prepare_manifest: dict, prepare_dir: Path, model_dir: Path) -> None:
    """Shards are token ids: they only mean something under the tokenizer that made them."""
    recorded = (prepare_manifest.get("inputs") or {}).get("tokenizer") or {}
    made_with = recorded.get("tokenizer.json")
    model_has = tokenizer_fingerprint(model_dir)["tokenizer.json"]
    if made_with is None:
        raise HyperofaError(f"{prepare_dir / 'manifest.json'}: records no tokenizer fingerprint; re-run prepare")
    if made_with != model_has:
        raise HyperofaError(
            f"{prepare_dir}: shards were made with another tokenizer than the model's ({model_dir}/tokenizer.json "
            f"sha256 {model_has[:12]} != {made_with[:12]} recorded by prepare); re-run prepare with the model's "
            "tokenizer or train the model that goes with these shards"
        )


def precision_for(choice: str) -> str:
    import torch

    from ..dsconfig import resolve_precision

    on_gpu = torch.cuda.is_available()
    if not on_gpu and choice in ("bf16", "fp16"):
        raise HyperofaError(f"pretrain.precision={choice} needs a GPU; this machine has none (use auto or fp32)")
    return resolve_precision(choice, "cuda" if on_gpu else "cpu")


def build_ds_config(config: Config, precision: str) -> dict[str, Any]:
    """The shipped template (or pretrain.ds_config) filled from our config, then parsed by the installed DeepSpeed:
    removed keys and any other rejected value fail here, before a process is launched."""
    from ..dsconfig import fill_ds_config, load_template

    p = config.pretrain
    template, source = load_template(p.ds_config or p.zero)
    cfg = fill_ds_config(
        template,
        micro_batch=p.micro_batch_size,
        grad_accum=p.grad_accum,
        lr=p.lr,
        precision=precision,
        weight_decay=p.weight_decay,
        clip=p.clip,
        torch_optimizer=True,
        source=source,
    )
    if "optimizer" in cfg:
        cfg["optimizer"]["params"].update(betas=list(p.betas), eps=p.eps)
    # torch's AdamW also steps offloaded (CPU) states; DeepSpeed otherwise insists on its compiled CPU Adam.
    if (cfg.get("zero_optimization") or {}).get("offload_optimizer"):
        cfg["zero_force_ds_cpu_optimizer"] = False
    validate_ds_config(cfg, source)
    return cfg


def validate_ds_config(cfg: dict[str, Any], source: Path) -> None:
    from deepspeed.runtime.config import DeepSpeedConfig

    try:
        DeepSpeedConfig(json.loads(json.dumps(cfg)))
    except Exception as exc:  # DeepSpeedConfigError, pydantic errors, assertion errors: all mean "fix the file"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise HyperofaError(f"{source}: DeepSpeed {_ds_version()} rejects this config: {first[:300]}") from None


def _ds_version() -> str:
    import deepspeed

    return deepspeed.__version__


# --- checkpoints -------------------------------------------------------------------------------------------


def latest_tag(ckpt_dir: Path) -> Optional[str]:
    latest = ckpt_dir / "latest"
    return latest.read_text(encoding="utf-8").strip() if latest.is_file() else None


def resume_plan(config: Config, ckpt_dir: Path, world: int) -> tuple[Optional[str], bool]:
    """(tag to load or None for `latest`, load_universal) after checking the checkpoint fits this launch."""
    p = config.pretrain
    tag = latest_tag(ckpt_dir)
    if tag is None:
        raise HyperofaError(f"{ckpt_dir}: no checkpoint to resume from (pretrain.resume=true)")
    info_file = ckpt_dir / tag / "hyperofa.json"
    written_by = json.loads(info_file.read_text(encoding="utf-8"))["world_size"] if info_file.is_file() else None
    if not p.universal:
        if written_by is not None and written_by != world:
            raise HyperofaError(
                f"{ckpt_dir / tag}: written by {written_by} ranks, this launch has {world}; set "
                "pretrain.universal=true to resume through a universal checkpoint"
            )
        return None, False
    from .export import to_universal

    return to_universal(ckpt_dir, tag), True


# --- the stage ---------------------------------------------------------------------------------------------


def trainable_rows_file(config: Config, model_dir: Path, out: Path) -> Optional[Path]:
    """Rows that train during the embedding warm-up, from the init stage's provenance (copied rows freeze)."""
    if config.pretrain.embedding_warmup_steps == 0:
        return None
    import numpy as np
    import torch

    from .optim import trainable_rows_from_provenance

    candidates = [model_dir.parent / "provenance.npy", model_dir / "provenance.npy"]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise HyperofaError(
            f"pretrain.embedding_warmup_steps needs the init stage's provenance.npy next to {model_dir} "
            "(which rows were copied); none found"
        )
    vocab = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))["vocab_size"]
    rows = trainable_rows_from_provenance(np.load(found), vocab)
    path = out / "trainable_rows.pt"
    torch.save(rows, path)
    return path


def run_pretrain_stage(config: Config, tracker) -> int:
    p = config.pretrain
    stage = stage_of(config)
    model_dir = resolve_model(config)
    prepare_dir = Path(p.shards).resolve() if p.shards else config.run_dir / "prepare"
    shardset, prep_manifest = load_shardset(prepare_dir)
    check_tokenizer_match(prep_manifest, prepare_dir, model_dir)
    block_size = int(prep_manifest.get("block_size") or config.prepare.block_size)
    model_cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    max_pos = int(model_cfg.get("max_position_embeddings", 10**9)) - (
        2 if model_cfg.get("model_type") in ("xlm-roberta", "roberta") else 0
    )
    if block_size > max_pos:
        raise HyperofaError(f"{prepare_dir}: blocks of {block_size} tokens exceed the model's {max_pos} positions")
    if p.language_weights:
        from .data import mixing_probabilities

        mixing_probabilities(sorted(shardset.train), shardset.blocks, p.language_weights)
    precision = precision_for(p.precision)
    ds_config = build_ds_config(config, precision)
    world = planned_world_size(p)

    inputs = {
        "config": {
            **{k: v for k, v in config.section("pretrain")["pretrain"].items() if k not in RESTART_KEYS},
            "run.seed": config.run.seed,
        },
        "model": {"config.json": sha256_file(model_dir / "config.json"), "tokenizer": tokenizer_fingerprint(model_dir)},
        "shards": prep_manifest.get("inputs_digest"),
        "ds_config": ds_config,
        "precision": precision,
    }
    inputs_digest = digest(inputs)
    if stage.is_complete(inputs_digest) and not p.resume:
        print(f"hyperofa pretrain: up to date ({stage.manifest_path})", file=sys.stderr)
        return 0
    out = stage.path
    ckpt_dir = out / "checkpoints"
    resume_tag, universal = None, False
    if p.resume:
        resume_tag, universal = resume_plan(config, ckpt_dir, world)
    elif latest_tag(ckpt_dir) is not None:
        raise HyperofaError(
            f"{ckpt_dir}: checkpoints of an earlier run exist; set pretrain.resume=true to continue it, or remove "
            "the directory to start over"
        )
    if universal:
        ds_config.setdefault("checkpoint", {})["load_universal"] = True

    with tracker.stage(STAGE, config) as run:
        stage.begin(inputs_digest)
        if stage.manifest_path.is_file():
            stage.manifest_path.unlink()
        if not p.resume:
            for name in JOB_FILES:
                (out / name).unlink(missing_ok=True)
            for sub in ("ranks", "audit", "model"):
                shutil.rmtree(out / sub, ignore_errors=True)
        (out / "failure.json").unlink(missing_ok=True)
        rows_file = trainable_rows_file(config, model_dir, out)
        job = {
            "config": config.effective(),
            "stage_dir": str(out),
            "checkpoint_dir": str(ckpt_dir),
            "model_dir": str(model_dir),
            "block_size": block_size,
            "train_shards": shardset.train,
            "heldout_shards": shardset.heldout,
            "train_blocks": shardset.blocks,
            "ds_config": ds_config,
            "precision": precision,
            "resume": p.resume,
            "resume_tag": resume_tag,
            "trainable_rows": str(rows_file) if rows_file else None,
            # Remote rank 0 (multi-node) gets no environment from here: the MLflow parent travels in the job file.
            "parent_run_id": run.run_id,
        }
        job_file = atomic_write_json(out / "job.json", job)
        cmd = launch_command(p, job_file, module=JOB_MODULE)
        run.set_tags({"hyperofa.world_size": world, "hyperofa.precision": precision, "hyperofa.zero": p.zero})
        print(f"hyperofa pretrain: launching {world} ranks: {' '.join(cmd)}", file=sys.stderr, flush=True)
        if world > 1 and not p.hostfile and precision == "fp32":
            # CPU ranks: split the cores instead of every rank spawning a thread per core.
            os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world)))
        code = run_launcher(cmd, run.run_id).returncode
        failure = out / "failure.json"
        if failure.is_file():
            raise HyperofaError(json.loads(failure.read_text(encoding="utf-8"))["message"])
        if code != 0:
            last = latest_tag(ckpt_dir)
            kept = f"; the last checkpoint is {ckpt_dir / last} (resume with pretrain.resume=true)" if last else ""
            raise HyperofaError(f"the training job exited with status {code}{kept}")

        from .export import export_hf

        tag = latest_tag(ckpt_dir)
        export_hf(ckpt_dir, tag, model_dir, out / "model")
        final_eval = _last_json_line(out / "eval_log.jsonl")
        model_files = sorted(f.relative_to(out).as_posix() for f in (out / "model").iterdir() if f.is_file())
        counts = {"steps": p.steps, "world_size": world, "final_checkpoint": tag}
        stage.write_manifest(
            config=config.effective(),
            inputs=inputs,
            outputs=model_files,
            counts=counts,
            extra={"eval_loss": (final_eval or {}).get("loss", {})},
        )
        run.log_artifact(out / "job.json")
        run.set_tags({"hyperofa.checkpoints": str(ckpt_dir)})
        print(f"hyperofa pretrain: {p.steps} steps done; model exported to {out / 'model'}", file=sys.stderr)
    return 0


def _last_json_line(path: Path) -> Optional[dict]:
    if not path.is_file():
        return None
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return json.loads(lines[-1]) if lines else None
