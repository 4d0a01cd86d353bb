"""The hypernetwork training job, run on every rank under the `deepspeed` launcher:

    deepspeed [--hostfile H --num_nodes N --launcher L] --module hyperofa_dist.hypernet.train --job job.json [--resume]

`hyperofa hypernet` writes job.json (the effective config, the filled DeepSpeed config, the output directory and
the id of the stage's MLflow run, which rank 0 logs into) and launches this module. Each rank memory-maps the word
table once, builds the model, and drives a raw `deepspeed.initialize` engine: per epoch its disjoint share of the
length-grouped batches (loop.train_epoch), then validation (loss and mean cosine) all-reduced over ranks.
Checkpoints are written by all ranks every `checkpoint_every` epochs with client state (epoch, metric history, best
loss); each rank also stores its RNG states next to them, so a resumed run reproduces an uninterrupted one. Rank 0
keeps the best model by validation loss (weights only, no word table; a candidate every `select_every` epochs and
the last), logs per-epoch metrics to MLflow, and at the end predicts the new tokens' coordinates (predict.py). A
non-finite epoch loss (all-reduced, so every rank agrees) stops the job before it saves or predicts anything, as
pretrain's guard does: `failure.json` and `NAN_EXIT`.
"""

from __future__ import annotations

import math
import random
import sys
import time
from typing import Any, Optional

import numpy as np
import torch

from ..formats import hypernet as out_format
from ..formats.jobdir import DS_CONFIG, HypernetJobSpec, read_rng, write_failure
from ..formats.mapping import load_mapping
from ..method.hypernet import loop
from ..method.hypernet.data import TokenSet, WordTable, rank_batches
from ..method.hypernet.models import build_model, model_spec, trainable_parameters
from ..method.hypernet.settings import augment_spec, check_batches, context_rule, loss_spec, training_split
from ..runtime.checkpoint import Checkpointer
from ..runtime.job import NAN_EXIT, JobContext, job_main
from ..runtime.seeds import mix_seed

COMMAND = "hypernet"


RNG_ARRAYS = ("torch", "numpy_keys", "numpy_rest", "python", "cuda")


def rng_state() -> dict[str, np.ndarray]:
    """This process's RNG states as plain arrays (what `jobdir.write_rng` stores; no pickle)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, mt, python_gauss = random.getstate()
    cuda = [s.numpy() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []
    return {
        "torch": torch.get_rng_state().numpy(),
        "numpy_keys": np.asarray(keys, dtype=np.uint32),
        "numpy_rest": np.asarray([pos, has_gauss, gauss], dtype=np.float64),
        # Python's Mersenne Twister: 624 words and a position, then its cached gauss (NaN: none).
        "python": np.asarray([version, *mt, np.nan if python_gauss is None else python_gauss], dtype=np.float64),
        "cuda": np.stack(cuda) if cuda else np.zeros((0, 0), dtype=np.uint8),
    }


def set_rng_state(state: dict[str, np.ndarray]) -> None:
    torch.set_rng_state(torch.from_numpy(np.ascontiguousarray(state["torch"], dtype=np.uint8)))
    pos, has_gauss, gauss = state["numpy_rest"].tolist()
    np.random.set_state(("MT19937", state["numpy_keys"], int(pos), int(has_gauss), float(gauss)))
    python = state["python"].tolist()
    random.setstate((int(python[0]), tuple(int(x) for x in python[1:-1]), None if np.isnan(python[-1]) else python[-1]))
    if len(state["cuda"]) and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.from_numpy(np.ascontiguousarray(s)) for s in state["cuda"]])


class HypernetJob(JobContext):
    """One rank's view of the training job."""

    def __init__(self, spec: HypernetJobSpec, resume: bool = False):
        super().__init__(spec, COMMAND)
        self.hp = self.config.hypernet
        self.ds_config = spec.ds_config
        self.resume = spec.resume or resume  # `--resume`: a launch by hand over the newest checkpoint

    # --- setup -------------------------------------------------------------------------------------------------

    def setup(self) -> None:
        import deepspeed

        self.init_distributed(self.hp.threads_per_rank)
        self.checkpoints = Checkpointer(self.out, COMMAND, keep=self.hp.keep_checkpoints, rank=self.rank,
                                        barrier=self.barrier)
        # The stage shell checked the vectors' fingerprint; ranks may not see the original vector file.
        self.mapping = load_mapping(self.config.run_dir)
        self.splits, _ = training_split(self.mapping)
        check_batches(self.mapping, self.splits["train"], self.hp.batch_size, self.world, self.hp.grad_accum)
        self.table = WordTable(self.mapping.word_vectors_path, self.device)
        coords = np.asarray(self.mapping.source_coordinates)
        source = self.mapping.source_postings
        context = context_rule(self.hp, self.seed, "source")
        self.train_set = TokenSet(self.splits["train"], source, coords, self.mapping.k, context)
        self.val_set = TokenSet(self.splits["val"], source, coords, self.mapping.k, context)

        torch.manual_seed(self.seed)  # same initial weights on every rank (DeepSpeed also broadcasts rank 0's)
        self.model_spec = model_spec(self.hp, word_dim=self.mapping.word_dim, k=self.mapping.k)
        model = build_model(
            self.hp.model, word_dim=self.mapping.word_dim, k=self.mapping.k, num_layers=self.hp.num_layers,
            hidden_size=self.hp.hidden_size, num_heads=self.hp.num_heads, dropout=self.hp.dropout,
        )
        self.trainable = trainable_parameters(model)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=self.ds_config
        )
        self.dtype = next(self.engine.module.parameters()).dtype
        self.zero_stage = self.engine.zero_optimization_stage()
        torch.manual_seed(mix_seed(self.seed, "dropout", self.rank))  # dropout streams differ per rank

    # --- collectives -------------------------------------------------------------------------------------------

    def gather_negatives(self, target: torch.Tensor) -> tuple[torch.Tensor, int]:
        import torch.distributed as dist

        parts = [torch.empty_like(target) for _ in range(self.world)]
        dist.all_gather(parts, target.contiguous())
        return torch.cat(parts), self.rank * target.shape[0]

    # --- checkpoints -------------------------------------------------------------------------------------------

    def save_checkpoint(self, epoch: int, client: dict[str, Any]) -> None:
        self.checkpoints.save(self.engine, epoch, client, rng=rng_state(), provenance=self.spec.provenance,
                              info={"epoch": epoch, "world_size": self.world, "seed": self.seed})

    def load_checkpoint(self) -> dict[str, Any]:
        tag, client = self.checkpoints.load(self.engine, self.spec.resume_tag, self.world)
        set_rng_state(read_rng(self.checkpoints.dir, tag, self.rank, RNG_ARRAYS))
        return client

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The module's weights on every rank's call; under ZeRO-3 the shards are gathered first (collective)."""
        module = self.engine.module
        if self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
        return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}

    # --- the loop ----------------------------------------------------------------------------------------------

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        return rank_batches(
            self.train_set.lengths, batch_size=self.hp.batch_size, world_size=self.world, rank=self.rank,
            seed=self.seed, epoch=epoch, group_factor=self.hp.group_factor, multiple_of=self.hp.grad_accum,
        )

    def update(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        self.engine.step()

    def train(self, tracker: Any) -> dict[str, Any]:
        """Every epoch from the checkpoint's next (or 0) to the last, early stop or `stop_after_epoch`: the job's
        result for train_state.json, or {"finished": False, "failure": line} after a non-finite loss."""
        hp = self.hp
        client: dict[str, Any] = {"epoch": -1, "history": [], "best_loss": None, "best_epoch": None, "since_best": 0}
        if self.resume:
            client.update(self.load_checkpoint())
        state = {key: client[key] for key in ("best_loss", "best_epoch", "since_best")}
        history: list[dict[str, Any]] = list(client["history"])
        finished, stopped_early, epoch = True, False, client["epoch"]
        from tqdm import tqdm

        epochs = range(client["epoch"] + 1, hp.epochs)
        for epoch in tqdm(epochs, desc="hypernet epochs", disable=self.rank != 0, file=sys.stderr):
            row, seconds, samples, audit = self.train_one_epoch(epoch)
            diverged = [key for key in ("train_loss", "val_loss") if not math.isfinite(row[key])]
            if diverged:  # sums are all-reduced: every rank stops here, before anything of this epoch is saved
                return {"finished": False, "failure": self.non_finite(diverged[0], row[diverged[0]], epoch, row["lr"])}
            history.append(row)
            if audit is not None:
                from ..formats.files import save_npy

                save_npy(out_format.audit_path(self.out, epoch, self.rank), audit)
            self.select(epoch, row, state)
            if self.rank == 0:
                out_format.write_metrics(self.out, history)
                tracker.log_metrics({**{k: v for k, v in row.items() if k != "epoch"}, "epoch_seconds": seconds,
                                     "train_samples_per_s": samples / max(seconds, 1e-9)}, step=epoch)
            stopped_early = (hp.early_stopping_patience is not None and state["best_epoch"] is not None
                             and state["since_best"] >= hp.early_stopping_patience)
            last = epoch == hp.epochs - 1 or stopped_early
            stop_here = hp.stop_after_epoch is not None and epoch >= hp.stop_after_epoch and not last
            if last or stop_here or (epoch + 1) % hp.checkpoint_every == 0:
                self.save_checkpoint(epoch, {"epoch": epoch, "history": history, **state, "world_size": self.world,
                                             "seed": self.seed})
            if stopped_early or stop_here:
                finished = not stop_here
                break
        return {"finished": finished, "last_epoch": epoch, "best_epoch": state["best_epoch"],
                "best_val_loss": state["best_loss"], "stopped_early": stopped_early, "epochs_run": len(history)}

    def train_one_epoch(self, epoch: int) -> tuple[dict[str, Any], float, float, Optional[np.ndarray]]:
        """One epoch's training and validation, summed over ranks: (the metrics row, seconds of training, samples
        trained, with `data_audit` this rank's token ids of the epoch)."""
        hp = self.hp
        lr = loop.lr_at(epoch, hp.lr, hp.lr_decay, hp.lr_decay_every)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        audit: list[np.ndarray] = []
        negatives = self.gather_negatives if hp.gather_negatives and self.world > 1 else None
        start = time.perf_counter()
        self.engine.train()
        sums = loop.train_epoch(
            self.engine, self.update, self.table, self.train_set, self.epoch_batches(epoch),
            seed=self.seed, epoch=epoch, rank=self.rank, cap=hp.max_context, augment=augment_spec(hp),
            loss=loss_spec(hp), device=self.device, dtype=self.dtype, negatives=negatives,
            on_batch=(lambda b: audit.append(b.token_ids.numpy())) if hp.data_audit else None,
        )
        seconds = time.perf_counter() - start
        self.engine.eval()
        val = loop.evaluate(
            self.engine, self.table, self.val_set, batch_size=hp.batch_size, world_size=self.world,
            rank=self.rank, cap=hp.max_context, loss=loss_spec(hp), device=self.device, dtype=self.dtype,
        )
        sums, val = self.all_sum(sums), self.all_sum(val)
        row = {"epoch": epoch, "lr": lr, **loop.means(sums, loop.TRAIN_KEYS, "train_"),
               **loop.means(val, loop.EVAL_KEYS, "val_")}
        ids = (np.concatenate(audit) if audit else np.zeros(0, np.int64)) if hp.data_audit else None
        return row, seconds, float(sums[-1]), ids

    def select(self, epoch: int, row: dict[str, Any], state: dict[str, Any]) -> None:
        """Keep the model of a candidate epoch whose validation loss is the lowest so far (rank 0 saves it)."""
        candidate = loop.selects(epoch, self.hp.select_every, self.hp.epochs)
        improved = candidate and (state["best_loss"] is None or row["val_loss"] < state["best_loss"])
        weights = self.full_state_dict() if improved else None  # `improved` agrees on all ranks
        if improved:
            state.update(best_loss=row["val_loss"], best_epoch=epoch, since_best=0)
            if self.rank == 0:
                out_format.save_torch(self.out / out_format.BEST_MODEL, weights)
        else:
            state["since_best"] += 1

    def non_finite(self, key: str, value: float, epoch: int, lr: float) -> str:
        last = self.checkpoints.latest()
        kept = f"the last checkpoint is {self.checkpoints.where(last)}" if last else "no checkpoint had been written yet"
        return (f"hypernet {key.replace('_', ' ')} became {value} in epoch {epoch} (lr {lr:g}); stopped without "
                f"saving, {kept}: lower hypernet.lr or check the mapping's word vectors")

    def predict(self, tracker: Any) -> dict[str, Any]:
        from ..method.hypernet.models import model_from_spec
        from ..method.hypernet.predict import predict_all

        model = model_from_spec(self.model_spec).to(self.device)
        model.load_state_dict(
            torch.load(self.out / out_format.BEST_MODEL, map_location=self.device, weights_only=True)
        )
        metrics = predict_all(
            model, self.table, source=self.mapping.source_postings, target=self.mapping.target_postings,
            coordinates=np.asarray(self.mapping.source_coordinates), copied=self.mapping.overlap_target,
            test_ids=self.splits["test"], out_dir=self.out, batch_size=self.hp.predict_batch_size,
            context={side: context_rule(self.hp, self.seed, side) for side in ("source", "target")},
            cap=self.hp.max_context, device=self.device,
        )
        tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        return metrics

def run(spec: HypernetJobSpec, args: Any) -> int:
    worker = HypernetJob(spec, args.resume)
    worker.setup()
    with worker.tracked() as stage_run:  # rank 0: the stage shell's `hypernet` run, named in the job file
        stage_run.log_params({"trainable_params": worker.trainable, "world_size": worker.world,
                              "zero_stage": worker.zero_stage, "dtype": str(worker.dtype)})
        if worker.rank == 0:
            stage_run.log_artifact(worker.out / DS_CONFIG)
        result = worker.train(stage_run)
        if "failure" in result:
            if worker.rank == 0:
                write_failure(worker.out, "non-finite loss", result["failure"])
            worker.say(result["failure"])
            return NAN_EXIT
        worker.barrier()
        if result["finished"] and worker.rank == 0:
            result["test"] = worker.predict(stage_run)
        if worker.rank == 0:
            out_format.write_train_state(worker.out, result)
        worker.barrier()
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    return job_main(
        argv, COMMAND, HypernetJobSpec, run,
        lambda parser: parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint"),
    )


if __name__ == "__main__":
    sys.exit(main())
