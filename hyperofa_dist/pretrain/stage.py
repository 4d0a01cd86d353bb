"""`hyperofa pretrain`: check everything that can be checked, launch the DeepSpeed job, export, write the manifest.

Before any process is launched (runtime/preflight.py lists the shared checks): the model has whole weights and a
tokenizer of its size, every shard has its recorded size and parses, the filesystem has room for the
checkpoints and the export; the prepare shards must have been made with the model's tokenizer (the sha256
of `tokenizer.json` recorded by prepare against the model directory's), the blocks must fit the model's position
embeddings, the DeepSpeed config (template + our values) must parse under the installed DeepSpeed (removed keys
are rejected), and a resume must find a checkpoint written by the same number of ranks unless
`pretrain.universal` converts it. The job then runs under the `deepspeed` launcher; when it ends, the last
checkpoint is exported to a stock HF model directory `<run.dir>/pretrain/<method>/model/` and the manifest is
written last.

Factorised training (`pretrain.embeddings`, docs/METHOD.md §4.1): the word embeddings train as F_t P, read from the
F_t.npy and P.npy beside the model (the init stage writes them). Before launch the stage checks that the model's
own embeddings are F_t P on a sample of rows, so factors left beside another model are never trained silently.
The export then holds both forms: the stock full-rank `model/` (E = F_t P) and the trained F_t.npy and P.npy.

Causal LMs (Llama, Mistral, Qwen, Gemma; the model's config decides, `formats.models.model_kind`) train with the
next-token objective on the same shards (models/causal.py): the job file carries `objective: causal` and the
ids prepare framed the blocks with (from the prepare manifest, else the tokenizer), and the export is a stock
causal-LM directory. Their embeddings train full-rank (the factorised form is the masked-LM method's).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..config import Config
from ..errors import HyperofaError
from ..formats import init as init_format
from ..formats import pretrain as out_format
from ..formats.files import free_space, sha256_file, used_bytes
from ..formats.jobdir import CHECKPOINTS, PretrainJobSpec, previous_run_id, write_job
from ..formats.modelcard import ModelCard, corpus_facts, write_model_card
from ..formats.models import check_model, model_files, model_fingerprint, read_model_config, require_model_dir
from ..formats.rundir import MANIFEST, Stage
from ..formats.shards import ShardSet, check_shards, load_shardset
from ..formats.shards import prepare_dir as default_prepare_dir
from ..formats.tokenizer import TOKENIZER_JSON, tokenizer_fingerprint
from ..models import position_offset
from ..runtime.device import job_device_type, resolve_precision
from ..runtime.dsconfig import fill_ds_config, load_template, validate_ds_config
from ..runtime.checkpoint import Checkpointer, StartPlan
from ..runtime.job import change_tags, resume_fingerprint
from ..runtime.launch import LaunchTarget, launch_command, planned_world_size, run_launcher
from ..runtime.stage import StageShell
from ..tracking import METHOD_TAG, OBJECTIVE_TAG, STAGE_TAG, STEP_TAG, registered_model_name

TARGET = LaunchTarget("hyperofa_dist.pretrain.train", "pretrain")


def resolve_model(config: Config) -> Path:
    """The model to train: `pretrain.model`, else the init stage's `<run.dir>/init/<method>/model`."""
    p = config.pretrain
    if p.model:
        path = Path(p.model).resolve()
    else:
        init_format.stage_of(config.run_dir, p.method).require()
        path = init_format.model_dir(config.run_dir, p.method)
    return require_model_dir(path)


def pretrain_card(config: Config, exported: Path, objective: str, final_eval: Optional[dict[str, Any]]) -> ModelCard:
    """The exported model's card: sizes from the init stage that made the starting model (when training started
    from it), the held-out loss of the last evaluation."""
    from ..formats.tokenizer import load_tokenizer

    p = config.pretrain
    init_counts = {} if p.model else (init_format.stage_of(config.run_dir, p.method).manifest() or {}).get("counts", {})
    languages, data = corpus_facts(config)
    step = (final_eval or {}).get("step", p.steps)
    return ModelCard(
        base_model=config.source.model, method=p.method, stage="pretrain", kind=objective, languages=languages,
        data=data, source_vocab=init_counts.get("V_s"), target_vocab=len(load_tokenizer(exported)),
        model_vocab=read_model_config(exported).get("vocab_size"), steps=p.steps,
        target_tokenizer=config.tokenizer.path or "built by `hyperofa tokenizer`",
        metrics={f"held-out loss, step {step}": (final_eval or {}).get("loss", {})} if final_eval else {},
    )


def objective_of(model_dir: Path) -> str:
    """"masked" or "causal": what the model directory's config says it is; anything else is refused in one line."""
    from ..formats.models import model_kind_of

    return model_kind_of(model_dir)


def block_frame(shardset: ShardSet, model_dir: Path) -> dict[str, Optional[int]]:
    """The ids that frame the blocks (start, separator, padding): as the prepare manifest recorded them, else as
    prepare would take them from the model's tokenizer."""
    from ..formats.tokenizer import load_tokenizer
    from ..models.causal import recorded_frame

    frame = recorded_frame(shardset.special_tokens, load_tokenizer(model_dir), model_dir)
    return {"start": frame.start, "sep": frame.sep, "pad": frame.pad}


def embeddings_plan(config: Config, model_dir: Path, objective: str = "masked") -> tuple[str, Optional[Path]]:
    """("factorised", the directory holding F_t.npy and P.npy) or ("full", None)."""
    from ..models.factorised import plan_factorised

    if objective == "causal":
        if config.pretrain.embeddings == "factorised":
            raise HyperofaError(
                f"{model_dir}: pretrain.embeddings=factorised trains a masked LM's tied F_t P; this is a causal LM, "
                "whose embeddings train full-rank: set pretrain.embeddings=full or auto"
            )
        return "full", None

    where = plan_factorised(model_dir, config.pretrain.embeddings, "pretrain.embeddings")
    return ("factorised", where) if where is not None else ("full", None)


DEFAULT_GRAD_ACCUM = 4  # pretrain.grad_accum when neither it nor pretrain.global_batch_size is set


def batch_plan(config: Config, world: int) -> tuple[int, int]:
    """(micro-batches per optimizer step, sequences per optimizer step) for a launch of `world` ranks.

    `pretrain.global_batch_size` fixes the step's size and the accumulation follows from the ranks, so a config is
    the same run on 4 GPUs or 2 x 8; a `grad_accum` set beside it must give the same step, else the config says
    two different things and is refused."""
    p = config.pretrain
    per_micro = world * p.micro_batch_size
    if p.global_batch_size is None:
        accum = p.grad_accum or DEFAULT_GRAD_ACCUM
        return accum, accum * per_micro
    if p.global_batch_size % per_micro:
        raise HyperofaError(
            f"pretrain.global_batch_size={p.global_batch_size} is not a multiple of {world} ranks x "
            f"pretrain.micro_batch_size={p.micro_batch_size} = {per_micro}; change one of them"
        )
    accum = p.global_batch_size // per_micro
    if p.grad_accum is not None and p.grad_accum != accum:
        raise HyperofaError(
            f"pretrain.grad_accum={p.grad_accum} gives {p.grad_accum * per_micro} sequences per step on {world} ranks, "
            f"pretrain.global_batch_size says {p.global_batch_size}; unset pretrain.grad_accum"
        )
    return accum, p.global_batch_size


def check_tokenizer_match(shardset: ShardSet, prepare_dir: Path, model_dir: Path) -> None:
    """Shards are token ids: they only mean something under the tokenizer that made them."""
    model_has = tokenizer_fingerprint(model_dir)[TOKENIZER_JSON]
    shardset.require_tokenizer(
        model_has, f"the model's ({model_dir}/{TOKENIZER_JSON})",
        "re-run prepare with the model's tokenizer or train the model that goes with these shards",
    )


def build_ds_config(config: Config, precision: str) -> dict[str, Any]:
    """The shipped template (or pretrain.ds_config) filled from our config, then parsed by the installed DeepSpeed."""
    p = config.pretrain
    template, source = load_template(p.ds_config or p.zero)
    cfg = fill_ds_config(
        template,
        micro_batch=p.micro_batch_size,
        grad_accum=p.grad_accum or DEFAULT_GRAD_ACCUM,  # `run` resolves global_batch_size first; benches set their own
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


# --- the stage ---------------------------------------------------------------------------------------------


def trainable_rows_file(config: Config, model_dir: Path, out: Path) -> Optional[Path]:
    """Rows that train during the embedding warm-up, from the init stage's provenance (copied rows freeze)."""
    if config.pretrain.embedding_warmup_steps == 0:
        return None
    import torch

    from .optim import trainable_rows_from_provenance

    provenance = init_format.load_provenance(init_format.find_provenance(model_dir))
    rows = trainable_rows_from_provenance(provenance, read_model_config(model_dir)["vocab_size"])
    path = out / out_format.TRAINABLE_ROWS
    torch.save(rows, path)
    return path


@dataclass(frozen=True)
class Plan:
    """Everything `run` resolved and checked before the stage shell opens."""

    config: Config  # with pretrain.grad_accum resolved
    model_dir: Path
    objective: str
    shardset: ShardSet
    block_size: int
    world: int
    global_batch: int
    precision: str
    ds_config: dict[str, Any]
    embeddings: str
    factors: Optional[Path]
    frame: Optional[dict[str, Optional[int]]]
    parameters: int  # of the model to train


def checkpointer(config: Config, out: Path) -> Checkpointer:
    return Checkpointer(out, "pretrain", keep=config.pretrain.keep_checkpoints)


def checked_shards(config: Config, model_dir: Path) -> tuple[ShardSet, int]:
    """The prepare shards (made with the model's tokenizer, whole, their blocks within the model's positions,
    every weighted language among them) and their block size."""
    p = config.pretrain
    prepare_dir = Path(p.shards).resolve() if p.shards else default_prepare_dir(config.run_dir)
    shardset = load_shardset(prepare_dir)
    if not shardset.train:
        raise HyperofaError(f"{prepare_dir / MANIFEST}: no training shards")
    check_tokenizer_match(shardset, prepare_dir, model_dir)
    block_size = shardset.block_size or config.prepare.block_size
    every_shard = [s for split in (shardset.train, shardset.heldout) for paths in split.values() for s in paths]
    check_shards(every_shard, prepare_dir, verify=config.run.verify_inputs, block_size=block_size)
    model_cfg = read_model_config(model_dir)
    max_pos = int(model_cfg.get("max_position_embeddings", 10**9)) - position_offset(model_cfg)
    if block_size > max_pos:
        raise HyperofaError(f"{prepare_dir}: blocks of {block_size} tokens exceed the model's {max_pos} positions")
    if p.language_weights:
        from .data import mixing_probabilities

        mixing_probabilities(sorted(shardset.train), shardset.blocks, p.language_weights)
    return shardset, block_size


def check_space(config: Config, parameters: int, world: int, stage: Stage, *, rebuild: bool = False) -> None:
    """Room for the checkpoints still to come and the export. Before the shell opens (and before the device is
    probed, whose libraries talk on stderr): for a resume (the tags on disk count as written) or a fresh run over no
    committed checkpoint. `rebuild`: in the shell, for a fresh run that removes a finished run's checkpoints (an
    up-to-date stage is never refused for space)."""
    p = config.pretrain
    ckpt = checkpointer(config, stage.path)
    if not (p.resume or ckpt.latest() is None or rebuild):
        return  # up to date, refused by the checkpoint plan, or checked again as a rebuild in the shell
    kept = len(ckpt.tags()) if p.resume else 0
    free_space(
        stage.path, out_format.pretrain_bytes(parameters, config, world, kept),
        f"pretraining ({parameters} parameters: every checkpoint and the exported model)",
        0 if p.resume else used_bytes(ckpt.dir),
    )


def plan_run(config: Config, stage: Stage) -> Plan:
    """Resolve and check every input before anything is written or launched."""
    p = config.pretrain
    model_dir = resolve_model(config)
    objective = objective_of(model_dir)
    # A causal tokenizer has no mask token and needs none: only masked-LM training asks for one.
    model = check_model(model_dir, "pretrain.model" if p.model else "pretrain.method", mask=objective == "masked")
    shardset, block_size = checked_shards(config, model_dir)
    world = planned_world_size(p, "pretrain")
    accum, global_batch = batch_plan(config, world)
    # Every reader downstream (the DeepSpeed config, the job file the ranks read) sees the resolved accumulation.
    config = config.with_changes({"pretrain.grad_accum": accum})
    check_space(config, model.parameters, world, stage)
    precision = resolve_precision(p.precision, job_device_type(), "pretrain.precision")
    embeddings, factors = embeddings_plan(config, model_dir, objective)
    plan = Plan(config, model_dir, objective, shardset, block_size, world, global_batch, precision,
                build_ds_config(config, precision), embeddings, factors,
                block_frame(shardset, model_dir) if objective == "causal" else None, model.parameters)
    return plan


def stage_inputs(plan: Plan) -> dict[str, Any]:
    inputs = {
        "config": plan.config.fingerprint("pretrain", "run"),
        "model": model_fingerprint(plan.model_dir),
        "shards": plan.shardset.inputs_digest,
        "ds_config": plan.ds_config,
        "precision": plan.precision,
        "world_size": plan.world,
        "embeddings": plan.embeddings,
    }
    if plan.factors is not None:
        inputs["factors"] = {n: sha256_file(plan.factors / n) for n in (init_format.COORDINATES, init_format.PRIMITIVES)}
    if plan.frame is not None:
        inputs["objective"] = {"kind": plan.objective, "frame": plan.frame}
    return inputs


def job_spec(plan: Plan, out: Path, start: StartPlan, rows_file: Optional[Path], run_id: Optional[str]) -> PretrainJobSpec:
    return PretrainJobSpec(
        config=plan.config.effective(), out_dir=str(out), model_dir=str(plan.model_dir), block_size=plan.block_size,
        train_shards=plan.shardset.train, heldout_shards=plan.shardset.heldout, train_blocks=plan.shardset.blocks,
        ds_config=plan.ds_config, precision=plan.precision, resume=plan.config.pretrain.resume,
        resume_tag=start.resume_tag, trainable_rows=str(rows_file) if rows_file else None,
        factors_dir=str(plan.factors) if plan.factors else None, objective=plan.objective, frame=plan.frame,
        # Rank 0, wherever it runs, logs into this stage's run (no environment reaches a remote node).
        provenance=start.provenance, run_id=run_id,
    )


def launch(plan: Plan, shell: Any, start: StartPlan, ckpt: Checkpointer) -> Path:
    """Write the job file, launch the ranks, turn a failed job into one line; returns the job file."""
    p, out = plan.config.pretrain, shell.path
    rows_file = trainable_rows_file(plan.config, plan.model_dir, out)
    job_file = write_job(out, job_spec(plan, out, start, rows_file, shell.run.run_id))
    cmd = launch_command(p, job_file, TARGET)
    shell.run.set_tags({"hyperofa.world_size": plan.world, "hyperofa.grad_accum": p.grad_accum,
                        "hyperofa.global_batch_size": plan.global_batch, "hyperofa.precision": plan.precision,
                        "hyperofa.zero": p.zero, "hyperofa.embeddings": plan.embeddings, OBJECTIVE_TAG: plan.objective,
                        **change_tags(start.provenance)})
    shell.say(f"launching {plan.world} ranks ({plan.global_batch} sequences per step: {p.micro_batch_size} per "
              f"micro-batch x {p.grad_accum} micro-batches x {plan.world} ranks): {' '.join(cmd)}")
    if plan.world > 1 and not p.hostfile and plan.precision == "fp32":
        # CPU ranks: split the cores instead of every rank spawning a thread per core.
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // plan.world)))
    code = run_launcher(cmd).returncode
    failure = out_format.read_failure(out)
    if failure:
        raise HyperofaError(failure)
    if code != 0:
        raise HyperofaError(ckpt.failure(code, out))
    return job_file


def export(plan: Plan, shell: Any, start: StartPlan, ckpt: Checkpointer, job_file: Path) -> None:
    """The last checkpoint as a stock HF model directory with its card, the manifest, the MLflow model."""
    from .export import export_hf

    config, p, out, run_ = plan.config, plan.config.pretrain, shell.path, shell.run
    tag = ckpt.latest()
    exported, factor_files = export_hf(ckpt.dir, tag, plan.model_dir, out / out_format.MODEL)
    final_eval = out_format.last_line(out / out_format.EVAL_LOG)
    write_model_card(exported, pretrain_card(config, exported, plan.objective, final_eval))
    sizes = out_format.read_parameter_counts(out)
    shell.finish(
        outputs=model_files(exported) + factor_files,
        counts={"steps": p.steps, "world_size": plan.world, "final_checkpoint": tag, "grad_accum": p.grad_accum,
                "global_batch_size": plan.global_batch, **sizes},
        extra={"eval_loss": (final_eval or {}).get("loss", {}), "embeddings": plan.embeddings,
               "objective": plan.objective, "config_changes": start.provenance["changes"]},
    )
    run_.log_artifact(job_file)
    run_.set_tags({"hyperofa.checkpoints": str(ckpt.dir)})
    run_.log_model(exported, registered_model_name(config.tracking.experiment, p.method),
                   {STAGE_TAG: "pretrain", METHOD_TAG: p.method, STEP_TAG: p.steps})
    shell.say(f"{p.steps} steps done ({plan.objective} LM, {plan.embeddings} embeddings); model exported to {exported}"
              + (f", factors beside it ({', '.join(factor_files)})" if factor_files else ""))


def to_universal(ckpt_dir: Path, tag: str) -> str:
    from .export import to_universal as convert

    return convert(ckpt_dir, tag)


def run(config: Config, tracker: Any) -> int:
    stage = out_format.stage_of(config.run_dir, config.pretrain.method)
    plan = plan_run(config, stage)
    p = plan.config.pretrain
    inputs = stage_inputs(plan)
    # What a checkpoint must have been trained with for a resume to continue it (runtime/job.py).
    fingerprint = resume_fingerprint(plan.config, ("pretrain", "run"),
                                     {k: inputs[k] for k in ("model", "shards", "precision")})
    # One MLflow run per method holds the job's curves: the shell opens `pretrain/<method>`, the job's rank 0 logs
    # into it (its id travels in job.json); a resumed job continues the run of the interrupted one.
    resume_run = previous_run_id(stage.path) if p.resume else None
    with StageShell.open(plan.config, tracker, "pretrain", stage, inputs, run_name=f"pretrain/{p.method}",
                         tags={METHOD_TAG: p.method}, resume_run_id=resume_run) as shell:
        if shell.up_to_date and not p.resume:
            return 0
        ckpt = checkpointer(plan.config, stage.path)
        start = ckpt.plan_start(resume=p.resume, finished=stage.manifest_path.is_file(), world=plan.world,
                                fingerprint=fingerprint, allow_change=p.allow_config_change, universal=p.universal,
                                convert=to_universal)
        if start.clear and stage.manifest_path.is_file():
            check_space(plan.config, plan.parameters, plan.world, stage, rebuild=True)
        if start.universal:
            plan.ds_config.setdefault("checkpoint", {})["load_universal"] = True
        shell.begin()
        if start.clear:
            stage.clear((*out_format.JOB_OUTPUTS, *out_format.FACTORS, out_format.RANKS, out_format.AUDIT,
                         out_format.MODEL, CHECKPOINTS))
        stage.clear((out_format.FAILURE,))
        job_file = launch(plan, shell, start, ckpt)
        export(plan, shell, start, ckpt, job_file)
    return 0
