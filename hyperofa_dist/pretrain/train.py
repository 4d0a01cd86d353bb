"""The continued-pretraining job, run on every rank under the `deepspeed` launcher.

    deepspeed [--hostfile H --num_nodes N --launcher L] --module hyperofa_dist.pretrain.train --job job.json

`hyperofa pretrain` (stage.py) writes `job.json` (the effective config, resolved paths and the filled DeepSpeed
config) and launches this module; it can also be launched by hand with the same file (see launch/README.md).

The loop, top to bottom: load the HF masked LM (swapping in F_t P when the stage planned factorised embeddings), wrap it so the engine's forward returns the masked-positions-only
MLM loss (a causal LM, `objective: causal` in the job file: the next-token loss over documents with the chunked
head, models/causal.py), `deepspeed.initialize` with our AdamW groups, optionally resume, then per data epoch (checkpoint
interval) build a loader that yields exactly the epoch's micro-batches on every rank and train. Each micro-step's
dropout seed and each batch's mask are functions of (seed, rank, step), so a resumed run repeats the
uninterrupted one. A non-finite loss (checked on all ranks together, before backward) stops the job at once:
nothing is saved after it, so `latest` still names the last good checkpoint, and the message says which.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Optional

import torch

from ..formats import pretrain as out_format
from ..formats.jobdir import PretrainJobSpec
from ..formats.shards import ShardSet
from ..models.causal import Frame, HeadTransform, block_layout, causal_lm_loss, head_transform, hf_labels, output_head
from ..models.mlm import masked_lm_loss, sparse_embedding_grad
from ..runtime.checkpoint import Checkpointer
from ..runtime.faults import Hooks, hooks_from_env
from ..runtime.job import NAN_EXIT, JobContext, job_main
from ..runtime.seeds import mix_seed
from . import data as data_mod
from .meter import ThroughputMeter, Window
from .optim import EmbeddingWarmup, apply_settings, group_settings, lr_at, param_groups
from .perf import model_flops_per_token, mfu, peak_flops

COMMAND = "pretrain"


class MaskedLMObjective(torch.nn.Module):
    """Wraps the HF model so `engine(input_ids, labels[, attention_mask])` is the MLM loss with logits only at masked
    positions (training blocks are never padded; held-out ones may be, and carry their attention mask).

    Going through the engine's forward (rather than calling submodules from outside) is what lets ZeRO-3 gather
    and release the partitioned parameters around every submodule, the tied decoder included. A tied input
    lookup is made sparse (mlm.sparse_embedding_grad): the same gradient without a dense vocabulary-sized
    intermediate."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        sparse_embedding_grad(model)

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        loss, n_masked = masked_lm_loss(self.model, input_ids, labels, attention_mask)
        return loss, torch.tensor(float(n_masked), device=loss.device)


class CausalLMObjective(torch.nn.Module):
    """Wraps an HF causal LM so `engine(input_ids)` is the next-token loss over the blocks' documents, with the
    output projection applied chunk by chunk (models/causal.py); returns (mean loss, labelled positions).

    The head's weight is read here, outside the head module's own forward: under ZeRO-3 it is registered as this
    module's external parameter so DeepSpeed gathers it for the forward and again for the backward (the chunked
    loss recomputes logits from it there). A tied lookup gets the sparse gradient as in the masked LM."""

    def __init__(self, model: torch.nn.Module, frame: Frame, *, chunk: int, attention: str, zero3: bool):
        super().__init__()
        self.model = model
        self.frame, self.chunk, self.attention = frame, chunk, attention
        self.transform: HeadTransform = head_transform(model.config)
        sparse_embedding_grad(model)
        if zero3:
            import deepspeed

            for param in output_head(model):
                if param is not None:
                    deepspeed.zero.register_external_parameter(self, param)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        layout = block_layout(input_ids, self.frame, self.attention)
        loss, n = causal_lm_loss(self.model, input_ids, layout, chunk=self.chunk, transform=self.transform)
        return loss, torch.tensor(float(n), device=loss.device)


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    except Exception:  # noqa: BLE001 - memory is a nice-to-have metric
        return float("nan")


class PretrainJob(JobContext):
    def __init__(self, spec: PretrainJobSpec, hooks: Optional[Hooks] = None):
        import deepspeed

        from ..formats.models import load_model
        from ..formats.tokenizer import load_tokenizer

        super().__init__(spec, COMMAND)
        self.hooks = hooks or Hooks()
        self.p = self.config.pretrain
        self.init_distributed()
        self.checkpoints = Checkpointer(self.out, COMMAND, keep=self.p.keep_checkpoints, rank=self.rank,
                                        barrier=self.barrier)

        self.causal = spec.objective == "causal"
        self.frame = Frame(**spec.frame) if self.causal else None
        # A causal LM predicts every position: no masking, so no mask token is needed.
        self.mask = None if self.causal else data_mod.mask_spec(load_tokenizer(spec.model_dir), self.p.mlm_probability)
        torch.manual_seed(self.seed)
        model = load_model(spec.model_dir, "AutoModelForCausalLM" if self.causal else "AutoModelForMaskedLM",
                           dtype=torch.float32)
        zero3 = (spec.ds_config.get("zero_optimization") or {}).get("stage") == 3
        if spec.factors_dir:
            from pathlib import Path

            from ..formats.init import load_factors
            from ..models.factorised import factorise, zero3_external_parameters

            factorise(model, *load_factors(Path(spec.factors_dir)))
            if zero3:
                zero3_external_parameters(model)
        if self.rank == 0:
            from ..models.factorised import parameter_counts

            out_format.write_parameter_counts(self.out, parameter_counts(model))
        self.seq_len = spec.block_size
        self.flops_token = model_flops_per_token(model, self.seq_len, 1.0 if self.causal else self.p.mlm_probability)
        self.peak = peak_flops(self.p.peak_tflops)
        self.warmup: Optional[EmbeddingWarmup] = None
        if self.p.embedding_warmup_steps > 0:
            rows = torch.load(spec.trainable_rows, weights_only=True)
            self.warmup = EmbeddingWarmup(model, rows)
        if self.p.gradient_checkpointing:
            # Non-reentrant: works with ZeRO-3's parameter hooks and inputs that need no gradient; the RNG state is
            # restored for the recomputation, so dropout (and with it every number) is what it would have been.
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.p.compile:
            base = getattr(model, model.base_model_prefix)
            setattr(model, model.base_model_prefix, torch.compile(base))
        groups = param_groups(model, self.p.weight_decay)
        self.group_names = [g["name"] for g in groups]
        # AdamW comes from the config's optimizer block (torch's implementation); the groups carry their names so
        # the loop can set each group's lr and weight decay per step.
        objective = (
            CausalLMObjective(model, self.frame, chunk=self.p.loss_chunk, attention=self.p.causal_attention, zero3=zero3)
            if self.causal else MaskedLMObjective(model)
        )
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=objective, model_parameters=groups, config=spec.ds_config
        )
        self.shardset = ShardSet(spec.train_shards, spec.heldout_shards, spec.train_blocks)
        self.probs = data_mod.mixing_probabilities(
            sorted(self.shardset.train), self.shardset.blocks, self.p.language_weights
        )
        self.step, self.tokens_seen, self.micro_steps = 0, 0, 0
        self.eval_sets = {
            lang: data_mod.heldout_batches(shards, self.p.eval_blocks, self.p.micro_batch_size, self.mask, self.seed, lang)
            for lang, shards in sorted(self.shardset.heldout.items())
        }

    # --- checkpoints ------------------------------------------------------------------------------------------

    def resume(self) -> None:
        tag, client = self.checkpoints.load(self.engine, self.spec.resume_tag, self.world,
                                            load_optimizer_states=True, load_lr_scheduler_states=False)
        self.step = int(client["step"])
        self.tokens_seen = int(client["tokens_seen"])
        self.say(f"resumed from {self.checkpoints.where(tag)} at step {self.step} ({self.tokens_seen} tokens seen)")

    def save(self) -> None:
        client = {"step": self.step, "data_seed": self.seed, "tokens_seen": self.tokens_seen, "world_size": self.world}
        self.checkpoints.save(self.engine, self.step, client, info=client, provenance=self.spec.provenance)

    # --- evaluation -------------------------------------------------------------------------------------------

    def _loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        ids = batch["input_ids"].to(self.device, non_blocking=True)
        if self.causal:
            return self.engine(ids)
        labels = batch["labels"].to(self.device, non_blocking=True)
        if "attention_mask" in batch:
            return self.engine(ids, labels, batch["attention_mask"].to(self.device, non_blocking=True))
        return self.engine(ids, labels)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out loss per language (MLM: masked-token mean; causal: next-token mean), the batches spread over all
        ranks."""
        self.engine.eval()
        out: dict[str, float] = {}
        for lang, batches in self.eval_sets.items():
            total = torch.zeros(2, dtype=torch.float64, device=self.device)
            n_rounds = -(-len(batches) // self.world)
            for r in range(n_rounds):
                index = r * self.world + self.rank
                # Every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively).
                batch = batches[index if index < len(batches) else 0]
                loss, n = self._loss(batch)
                if index < len(batches):
                    total += torch.stack([loss.double() * n.double(), n.double()])
            torch.distributed.all_reduce(total)
            if total[1] > 0:
                out[lang] = float(total[0] / total[1])
        self.engine.train()
        return out

    def evaluate_and_log(self, tracker) -> None:
        """`eval/<lang>/loss` and their mean `eval/loss` at the current step, to MLflow and eval_log.jsonl."""
        losses = self.evaluate()
        evals = {f"eval/{lang}/loss": v for lang, v in losses.items()}
        if losses:
            evals["eval/loss"] = sum(losses.values()) / len(losses)
        tracker.log_metrics(evals, step=self.step)
        if self.rank == 0:
            out_format.append_line(self.out / out_format.EVAL_LOG, {"step": self.step, "loss": losses})

    # --- the loop -----------------------------------------------------------------------------------------------

    def run(self, tracker) -> int:
        self.start(tracker)
        audit = open(out_format.audit_path(self.out, self.rank), "a") if self.p.data_audit else None
        meter = ThroughputMeter()
        self.engine.train()
        try:
            while self.step < self.p.steps:
                code = self.train_epoch(tracker, meter, audit)
                if code:
                    return code
        finally:
            if audit is not None:
                audit.close()
        self.finish(self.micro_steps)
        return 0

    def start(self, tracker) -> None:
        """Resume (the tag the stage planned), end a finished warm-up, drop the log lines of steps that are trained
        again, and evaluate the starting model: every held-out curve begins at step 0."""
        if self.spec.resume:
            self.resume()
        if self.warmup is not None and self.step >= self.p.embedding_warmup_steps:
            self.warmup.remove()
        if self.rank == 0:
            # Steps a killed run logged after its last checkpoint are trained again now: drop their old lines.
            for name in (out_format.TRAIN_LOG, out_format.EVAL_LOG):
                out_format.truncate_log(self.out / name, self.step)
        if self.step == 0:
            self.evaluate_and_log(tracker)

    def epoch_loader(self) -> Any:
        """The data epoch from this step to the next checkpoint step (or the end): a function of (seed, epoch
        start, rank, worker), so a resumed run reads what the uninterrupted one read."""
        p = self.p
        epoch_steps = min(p.save_every - self.step % p.save_every, p.steps - self.step)
        return data_mod.train_loader(
            self.shardset, self.probs, seed=self.seed, epoch_start=self.step, rank=self.rank, world_size=self.world,
            micro_batch_size=p.micro_batch_size, n_batches=epoch_steps * p.grad_accum,
            shuffle_buffer=p.shuffle_buffer, mask=self.mask, num_workers=p.num_workers,
            prefetch_factor=p.prefetch_factor, audit=p.data_audit,
        )

    def train_epoch(self, tracker, meter: ThroughputMeter, audit: Any) -> int:
        """The data epoch's micro-batches; 0, or NAN_EXIT when the loss became non-finite."""
        p = self.p
        step_loss = torch.zeros(2, dtype=torch.float64, device=self.device)
        settings: dict[str, Any] = {}
        for index, batch in enumerate(self.epoch_loader()):
            micro = index % p.grad_accum
            if micro == 0:
                settings = self.begin_step()
            check = self.micro_step(batch, micro)
            if not torch.isfinite(check[0]):
                return self.stop_non_finite(float(check[0]), micro)
            step_loss += check
            self.micro_steps += 1
            meter.micro_batch(batch["input_ids"].numel() * self.world, batch["input_ids"].shape[0] * self.world)
            if audit is not None:
                audit.write(json.dumps({"step": self.step + 1, "blocks": batch["block_ids"]}) + "\n")
            if micro == p.grad_accum - 1:
                loss_value = float(step_loss[0] / step_loss[1])
                step_loss.zero_()
                self.end_step(tracker, meter, loss_value, settings)
        return 0

    def begin_step(self) -> dict[str, Any]:
        """The fault hook, then each parameter group's lr and weight decay for the coming step."""
        p = self.p
        self.hooks.before_step(self.step + 1, self.rank)
        settings = group_settings(
            self.step, lr=lr_at(self.step, peak=p.lr, warmup=p.warmup_steps, total=p.steps, schedule=p.schedule),
            weight_decay=p.weight_decay, warmup_embedding_steps=p.embedding_warmup_steps,
        )
        apply_settings(self.optimizer, self.group_names, settings)
        return settings

    def micro_step(self, batch: dict, micro: int) -> torch.Tensor:
        """Forward; the loss summed over ranks with the rank count ([loss, ranks]) is checked on every rank
        before the backward, so a non-finite loss stops every rank before any update."""
        torch.manual_seed(mix_seed(self.seed, "dropout", self.rank, self.step, micro))
        loss, _ = self._loss(batch)
        loss = self.hooks.loss(self.step + 1, loss)
        check = torch.stack([loss.detach().double(), torch.ones((), dtype=torch.float64, device=self.device)])
        torch.distributed.all_reduce(check)
        if torch.isfinite(check[0]):
            self.engine.backward(loss)
            self.engine.step()
        return check

    def end_step(self, tracker, meter: ThroughputMeter, loss_value: float, settings: dict[str, Any]) -> None:
        """After a step's last micro-batch: its log line, the end of the warm-up, and at their intervals the
        window's metrics, the held-out evaluation and the checkpoint."""
        p = self.p
        self.step += 1
        self.tokens_seen += p.grad_accum * p.micro_batch_size * self.seq_len * self.world
        meter.step(loss_value)
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        lr_now = settings["embedding"][0] if "embedding" in settings else p.lr
        if self.rank == 0:
            out_format.append_line(self.out / out_format.TRAIN_LOG, {
                "step": self.step, "loss": loss_value, "lr": lr_now, "grad_norm": grad_norm,
                "tokens_seen": self.tokens_seen})
        if self.warmup is not None and self.step == p.embedding_warmup_steps:
            self.warmup.remove()
            self.say(f"embedding warm-up done at step {self.step}; training every parameter")
        if self.step % p.log_every == 0 or self.step == p.steps:
            self.log_window(tracker, meter.take(), lr_now, grad_norm)
        if self.step % p.eval_every == 0 or self.step == p.steps:
            self.evaluate_and_log(tracker)
        if self.step % p.save_every == 0 or self.step == p.steps:
            self.save()
        if self.step % p.log_every == 0:  # the next window starts after this step's evaluation and checkpoint
            meter.restart()

    def log_window(self, tracker, window: Window, lr_now: float, grad_norm: float) -> None:
        metrics = {
            "train/loss": window.loss,
            "train/lr": lr_now,
            "train/grad_norm": grad_norm,
            "perf/tokens_per_s": window.tokens_per_s,
            "perf/samples_per_s": window.samples_per_s,
            "perf/memory_gb": _memory_gb(self.device),
            "train/tokens_seen": self.tokens_seen,
        }
        share = mfu(window.tokens_per_s / self.world, self.flops_token, self.peak)
        if share is not None:
            metrics["perf/mfu"] = share
        tracker.log_metrics(metrics, step=self.step)
        self.say(
            f"step {self.step}/{self.p.steps} loss {window.loss:.4f} lr {lr_now:.3g} "
            f"{window.tokens_per_s:,.0f} tok/s" + (f" mfu {share:.3f}" if share is not None else "")
        )

    def stop_non_finite(self, value: float, micro: int) -> int:
        last = self.checkpoints.latest()
        where = (
            f"the last good checkpoint is {self.checkpoints.where(last)} and `latest` still names it; "
            "resume with pretrain.resume=true after lowering pretrain.lr or checking the data"
            if last
            else "no checkpoint had been written yet"
        )
        message = f"loss became {value} at step {self.step + 1} (micro-batch {micro}); stopped without saving: {where}"
        if self.rank == 0:
            out_format.write_failure(self.out, "non-finite loss", message)
        self.say(message)
        return NAN_EXIT

    def finish(self, micro_steps: int) -> None:
        out_format.write_rank_summary(
            self.out, self.rank, {"rank": self.rank, "world_size": self.world, "steps": self.step,
                                  "micro_steps": micro_steps},
        )
        # The engine's own loss on a fixed held-out batch: the exported HF model must reproduce it.
        probe = next((batches[0] for _, batches in sorted(self.eval_sets.items()) if batches), None)
        if probe is not None:
            self.engine.eval()
            with torch.no_grad():
                loss, _ = self._loss(probe)
            self.engine.train()
            if self.rank == 0:
                torch.save(self._probe_record(probe, float(loss)), self.out / out_format.PROBE)
        torch.distributed.barrier()


    def _probe_record(self, probe: dict, loss: float) -> dict:
        """What a stock HF model needs to recompute the loss: for a causal LM the 4D mask, positions and the
        targets in HF's unshifted convention, so `model(**inputs, labels=hf_labels).loss` is the same number."""
        if not self.causal:
            return {"input_ids": probe["input_ids"], "labels": probe["labels"],
                    "attention_mask": probe["attention_mask"], "loss": loss}
        layout = block_layout(probe["input_ids"], self.frame, self.p.causal_attention)
        return {"objective": "causal", "input_ids": probe["input_ids"], "hf_labels": hf_labels(layout),
                "position_ids": layout.position_ids, "attention_mask": layout.attention_mask(torch.float32),
                "loss": loss}


def run(spec: PretrainJobSpec, args: Any) -> int:
    job = PretrainJob(spec, hooks_from_env())
    for sub in (out_format.RANKS, out_format.AUDIT):
        (job.out / sub).mkdir(parents=True, exist_ok=True)
    with job.tracked() as run_:  # rank 0: the stage's `pretrain/<method>` run; no run of the job's own
        if job.rank == 0:
            run_.log_params(out_format.read_parameter_counts(job.out))
        return job.run(run_)


def main(argv: Optional[list[str]] = None) -> int:
    return job_main(argv, COMMAND, PretrainJobSpec, run)


if __name__ == "__main__":
    sys.exit(main())
