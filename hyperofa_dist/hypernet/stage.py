"""`hyperofa hypernet`: check the mapping, launch the DeepSpeed training job, write `<run_dir>/hypernet/`.

Everything that can be checked is checked before a process is launched (hypernet.inputs: vectors fingerprint,
k, shapes, a non-empty training split; the DeepSpeed template). The job (train.py) trains, keeps the best model,
and predicts; this process then writes the manifest. A run ended on purpose by `hypernet.stop_after_epoch`
leaves checkpoints and no manifest; `hypernet.resume=true` continues it.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

from ..artifacts import Stage, atomic_write_json, digest
from ..config import Config
from ..dsconfig import fill_ds_config, load_template, resolve_precision
from ..errors import HyperofaError
from . import predict as pred
from . import train
from .inputs import load_mapping
from .launch import launch_command, planned_world_size, run_launcher

# Keys that change how a run is executed, not what it computes: left out of the stage's inputs digest.
EXECUTION_KEYS = (
    "resume", "stop_after_epoch", "master_port", "launcher", "hostfile", "num_nodes", "ranks_per_node",
    "threads_per_rank", "data_audit",
)
OUTPUTS = (
    train.BEST_MODEL, train.MODEL_SPEC, train.METRICS, "ds_config.json",
    pred.PREDICTED_IDS, pred.PREDICTED_ROWS, pred.TEST_IDS, pred.TEST_ROWS, pred.TEST_METRICS,
)


def job_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def build_ds_config(config: Config, device: str) -> dict[str, Any]:
    hp = config.hypernet
    template, source = load_template(hp.zero)
    return fill_ds_config(
        template, micro_batch=hp.batch_size, grad_accum=hp.grad_accum, lr=hp.lr,
        precision=resolve_precision(hp.precision, device), weight_decay=0.0, clip=0.0,
        torch_optimizer=True, source=source,
    )


def stage_inputs(config: Config, mapping_identity: str, world: int, ds_config: dict[str, Any]) -> dict[str, Any]:
    hp = {k: v for k, v in config.section("hypernet")["hypernet"].items() if k not in EXECUTION_KEYS}
    return {"hypernet": hp, "seed": config.run.seed, "mapping": mapping_identity, "world_size": world,
            "ds_config": ds_config}


def write_job(config: Config, out: Path, ds_config: dict[str, Any], parent_run_id: Any) -> Path:
    atomic_write_json(out / "ds_config.json", ds_config)
    return atomic_write_json(
        out / "job.json",
        {"config": config.effective(), "out_dir": str(out), "ds_config": ds_config, "parent_run_id": parent_run_id},
    )


def run_hypernet_stage(config: Config, tracker) -> int:
    hp = config.hypernet
    stage = Stage(config.run_dir, "hypernet")
    mapping = load_mapping(config)
    world = planned_world_size(hp)
    need = hp.batch_size * world * hp.grad_accum
    if len(mapping.splits["train"]) < need:
        raise HyperofaError(
            f"{mapping.path / 'split.npz'}: {len(mapping.splits['train'])} training tokens, fewer than "
            f"hypernet.batch_size x ranks x grad_accum = {need}; lower hypernet.batch_size"
        )
    ds_config = build_ds_config(config, job_device())
    inputs = stage_inputs(config, mapping.identity(), world, ds_config)
    key = digest(inputs)
    if stage.is_complete(key):
        print(f"hyperofa hypernet: {stage.path} is up to date", file=sys.stderr)
        return 0
    ckpt = stage.path / train.CHECKPOINTS
    if hp.resume and not (ckpt / "latest").is_file():
        raise HyperofaError(f"{ckpt}: no checkpoint to resume from (hypernet.resume=true)")
    stage.begin(key)
    if not hp.resume:
        for stale in (ckpt, stage.path / train.AUDIT):
            shutil.rmtree(stale, ignore_errors=True)
        (stage.path / train.TRAIN_STATE).unlink(missing_ok=True)

    from .models import model_spec

    atomic_write_json(stage.path / train.MODEL_SPEC, model_spec(hp, word_dim=mapping.word_dim, k=mapping.k))
    job = write_job(config, stage.path, ds_config, tracker.parent_run_id)
    cmd = launch_command(hp, job, extra=("--resume",) if hp.resume else ())
    print(f"hyperofa hypernet: launching {world} ranks: {' '.join(cmd)}", file=sys.stderr, flush=True)
    done = run_launcher(cmd, tracker.parent_run_id)
    if done.returncode != 0:
        raise HyperofaError(f"hypernet training job failed (launcher exit {done.returncode}); see the ranks' output above")
    state_file = stage.path / train.TRAIN_STATE
    if not state_file.is_file():
        raise HyperofaError(f"{state_file}: the training job ended without writing its state")
    state = json.loads(state_file.read_text(encoding="utf-8"))
    if not state["finished"]:
        print(
            f"hyperofa hypernet: stopped after epoch {state['last_epoch']} (hypernet.stop_after_epoch); "
            "continue with hypernet.resume=true",
            file=sys.stderr,
        )
        return 0
    test = json.loads((stage.path / pred.TEST_METRICS).read_text(encoding="utf-8"))
    stage.write_manifest(
        config=config.effective(),
        inputs=inputs,
        outputs=list(OUTPUTS),
        counts={
            "train": len(mapping.splits["train"]), "val": len(mapping.splits["val"]), "test": len(mapping.splits["test"]),
            "split_without_postings": mapping.without_postings, "predicted": test["predicted_count"], "k": mapping.k,
            "word_dim": mapping.word_dim, "world_size": world, "epochs_run": state["epochs_run"],
            "best_epoch": state["best_epoch"], "stopped_early": state["stopped_early"],
        },
    )
    print(f"hyperofa hypernet: wrote {stage.path} (best epoch {state['best_epoch']}, test cosine "
          f"{test['test_mean_cosine']:.4f})", file=sys.stderr)
    return 0
