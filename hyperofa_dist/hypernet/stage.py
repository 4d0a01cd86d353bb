"""`hyperofa hypernet`: check the mapping, launch the DeepSpeed training job, write `<run_dir>/hypernet/`.

Everything that can be checked is checked before a process is launched (the mapping's files and shapes, the
vectors fingerprint, k, a training split large enough for one batch per rank; the DeepSpeed template). The job
(train.py) trains, keeps the best model, and predicts; this process then writes the manifest. A run ended on
purpose by `hypernet.stop_after_epoch` leaves checkpoints and no manifest; `hypernet.resume=true` continues it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import HyperofaError
from ..formats import hypernet as out_format
from ..formats.jobdir import (
    DS_CONFIG, FAILURE, RUN_ID, checkpoint_dir, has_checkpoint, latest_tag, previous_run_id, read_failure, write_job,
)
from ..formats.mapping import SPLIT, load_mapping
from ..formats.vectors import configured_vectors_path
from ..method.hypernet.models import model_spec
from ..method.hypernet.settings import check_batches, training_split
from ..runtime.device import job_device_type, resolve_precision
from ..runtime.dsconfig import fill_ds_config, load_template, validate_ds_config
from ..runtime.job import change_tags, check_resume, fresh_provenance, resume_fingerprint
from ..runtime.launch import LaunchTarget, launch_command, planned_world_size, run_launcher
from ..runtime.stage import StageShell

TARGET = LaunchTarget("hyperofa_dist.hypernet.train", "hypernet")


def build_ds_config(config: Config, device: str) -> dict[str, Any]:
    hp = config.hypernet
    template, source = load_template(hp.zero)
    cfg = fill_ds_config(
        template, micro_batch=hp.batch_size, grad_accum=hp.grad_accum, lr=hp.lr,
        precision=resolve_precision(hp.precision, device, "hypernet.precision"), weight_decay=0.0, clip=0.0,
        torch_optimizer=True, source=source,
    )
    validate_ds_config(cfg, source)
    return cfg


def job_spec(config: Config, out: Path, ds_config: dict[str, Any], run_id: Any,
             provenance: Any = None) -> dict[str, Any]:
    return {"config": config.effective(), "out_dir": str(out), "ds_config": ds_config, RUN_ID: run_id,
            "provenance": provenance}


def run(config: Config, tracker: Any) -> int:
    hp = config.hypernet
    stage = out_format.stage_of(config.run_dir)
    mapping = load_mapping(config.run_dir)
    vectors = configured_vectors_path(config)
    if vectors is not None:
        mapping.require_vectors(vectors)
    mapping.require_k(config.mapping.num_primitives)
    splits, without = training_split(mapping)
    if len(splits["train"]) == 0:
        raise HyperofaError(f"{mapping.where(SPLIT)}: the training split is empty (no source token with postings)")
    world = planned_world_size(hp, "hypernet")
    check_batches(mapping, splits["train"], hp.batch_size, world, hp.grad_accum)
    ds_config = build_ds_config(config, job_device_type())
    inputs = {
        "config": config.fingerprint("hypernet", "run"),
        "mapping": mapping.identity(),
        "world_size": world,
        "ds_config": ds_config,
    }
    # What a checkpoint must have been trained with for a resume to continue it (runtime/job.py).
    provenance = fresh_provenance(resume_fingerprint(config, ("hypernet", "run"), {"mapping": inputs["mapping"]}))
    # The shell opens the stage's MLflow run; the job's rank 0 logs every epoch into it (its id is in job.json), and
    # a resumed job continues the run of the interrupted one.
    resume_run = previous_run_id(stage.path) if hp.resume else None
    with StageShell.open(config, tracker, "hypernet", stage, inputs, resume_run_id=resume_run) as shell:
        if shell.up_to_date:
            return 0
        ckpt = checkpoint_dir(stage.path)
        if hp.resume and not has_checkpoint(stage.path):
            raise HyperofaError(f"{ckpt}: no checkpoint to resume from (hypernet.resume=true)")
        if hp.resume:
            provenance = check_resume(ckpt, latest_tag(ckpt), provenance["fingerprint"], position="epoch",
                                      allow=hp.allow_config_change, allow_key="hypernet.allow_config_change")
        shell.begin()
        if not hp.resume:
            for stale in (ckpt, stage.path / out_format.AUDIT):
                shutil.rmtree(stale, ignore_errors=True)
            (stage.path / out_format.TRAIN_STATE).unlink(missing_ok=True)
        (stage.path / FAILURE).unlink(missing_ok=True)

        out_format.write_model_spec(stage.path, model_spec(hp, word_dim=mapping.word_dim, k=mapping.k))
        job = write_job(stage.path, job_spec(config, stage.path, ds_config, shell.run.run_id, provenance))
        if provenance["changes"]:
            shell.run.set_tags(change_tags(provenance, "epoch"))
        cmd = launch_command(hp, job, TARGET, extra=("--resume",) if hp.resume else ())
        shell.say(f"launching {world} ranks: {' '.join(cmd)}")
        done = run_launcher(cmd)
        failure = read_failure(stage.path)
        if failure:  # the job's own stop (a non-finite loss): its one line, not the launcher's status
            raise HyperofaError(failure)
        if done.returncode != 0:
            raise HyperofaError(f"hypernet training job failed (launcher exit {done.returncode}); see the ranks' output above")
        state = out_format.read_train_state(stage.path)
        if not state["finished"]:
            shell.say(
                f"stopped after epoch {state['last_epoch']} (hypernet.stop_after_epoch); continue with hypernet.resume=true"
            )
            return 0
        test = out_format.read_test_metrics(stage.path)
        shell.finish(
            outputs=[*out_format.OUTPUTS, DS_CONFIG],
            counts={
                "train": len(splits["train"]), "val": len(splits["val"]), "test": len(splits["test"]),
                "split_without_postings": without, "predicted": test["predicted_count"], "k": mapping.k,
                "word_dim": mapping.word_dim, "world_size": world, "epochs_run": state["epochs_run"],
                "best_epoch": state["best_epoch"], "stopped_early": state["stopped_early"],
            },
            extra={"config_changes": provenance["changes"]},
        )
        shell.say(f"wrote {stage.path} (best epoch {state['best_epoch']}, test cosine {test['test_mean_cosine']:.4f})")
    return 0
