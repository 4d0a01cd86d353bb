"""`hyperofa hypernet`: check the mapping, launch the DeepSpeed training job, write `<run_dir>/hypernet/`.

Everything that can be checked is checked before a process is launched (the mapping's files and shapes, the
vectors fingerprint, k, a training split large enough for one batch per rank; the DeepSpeed template). The job
(train.py) trains, keeps the best model, and predicts; this process then writes the manifest. A run ended on
purpose by `hypernet.stop_after_epoch` leaves checkpoints and no manifest; `hypernet.resume=true` continues it.
Checkpoints (names, resume plan, what a fresh run does over old ones, the rank count) are runtime/checkpoint.py's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ..config import Config
from ..errors import HyperofaError
from ..formats import hypernet as out_format
from ..formats.jobdir import CHECKPOINTS, DS_CONFIG, FAILURE, HypernetJobSpec, previous_run_id, read_failure, write_job
from ..formats.mapping import SPLIT, Mapping, load_mapping
from ..formats.vectors import configured_vectors_path
from ..method.hypernet.models import model_spec
from ..method.hypernet.settings import check_batches, training_split
from ..runtime.checkpoint import Checkpointer, StartPlan
from ..runtime.device import job_device_type, resolve_precision
from ..runtime.dsconfig import fill_ds_config, load_template, validate_ds_config
from ..runtime.job import change_tags, resume_fingerprint
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


def job_spec(config: Config, out: Path, ds_config: dict[str, Any], run_id: Optional[str],
             plan: Optional[StartPlan] = None) -> HypernetJobSpec:
    return HypernetJobSpec(
        config=config.effective(), out_dir=str(out), ds_config=ds_config, run_id=run_id,
        provenance=plan.provenance if plan else None, resume=bool(plan and plan.resume_tag),
        resume_tag=plan.resume_tag if plan else None,
    )


def checkpointer(config: Config, out: Path) -> Checkpointer:
    return Checkpointer(out, "hypernet", keep=config.hypernet.keep_checkpoints)


def checked_mapping(config: Config) -> tuple[Mapping, dict[str, Any], dict[str, int], int]:
    """The mapping, its training split (tokens with postings) and what each part lost, and the planned rank
    count, after every check that needs no process: vectors, k, a split large enough for one batch per rank."""
    hp = config.hypernet
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
    return mapping, splits, without, world


def launch(config: Config, shell: Any, plan: StartPlan, ds_config: dict[str, Any], world: int,
           ckpt: Checkpointer) -> None:
    """Write the job file, launch the ranks, turn a failed job into one line."""
    out = shell.path
    job = write_job(out, job_spec(config, out, ds_config, shell.run.run_id, plan))
    if plan.provenance["changes"]:
        shell.run.set_tags(change_tags(plan.provenance, "epoch"))
    cmd = launch_command(config.hypernet, job, TARGET, extra=("--resume",) if plan.resume_tag else ())
    shell.say(f"launching {world} ranks: {' '.join(cmd)}")
    done = run_launcher(cmd)
    failure = read_failure(out)
    if failure:  # the job's own stop (a non-finite loss): its one line, not the launcher's status
        raise HyperofaError(failure)
    if done.returncode != 0:
        raise HyperofaError(ckpt.failure(done.returncode, out))


def run(config: Config, tracker: Any) -> int:
    hp = config.hypernet
    stage = out_format.stage_of(config.run_dir)
    mapping, splits, without, world = checked_mapping(config)
    ds_config = build_ds_config(config, job_device_type())
    inputs = {
        "config": config.fingerprint("hypernet", "run"),
        "mapping": mapping.identity(),
        "world_size": world,
        "ds_config": ds_config,
    }
    # What a checkpoint must have been trained with for a resume to continue it (runtime/job.py).
    fingerprint = resume_fingerprint(config, ("hypernet", "run"), {"mapping": inputs["mapping"]})
    # The shell opens the stage's MLflow run; the job's rank 0 logs every epoch into it (its id is in job.json), and
    # a resumed job continues the run of the interrupted one.
    resume_run = previous_run_id(stage.path) if hp.resume else None
    with StageShell.open(config, tracker, "hypernet", stage, inputs, resume_run_id=resume_run) as shell:
        if shell.up_to_date:
            return 0
        ckpt = checkpointer(config, stage.path)
        plan = ckpt.plan_start(resume=hp.resume, finished=stage.manifest_path.is_file(), world=world,
                               fingerprint=fingerprint, allow_change=hp.allow_config_change)
        shell.begin()
        if plan.clear:
            stage.clear((CHECKPOINTS, out_format.AUDIT, out_format.TRAIN_STATE))
        stage.clear((FAILURE,))
        out_format.write_model_spec(stage.path, model_spec(hp, word_dim=mapping.word_dim, k=mapping.k))
        launch(config, shell, plan, ds_config, world, ckpt)
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
            extra={"config_changes": plan.provenance["changes"]},
        )
        shell.say(f"wrote {stage.path} (best epoch {state['best_epoch']}, test cosine {test['test_mean_cosine']:.4f})")
    return 0
