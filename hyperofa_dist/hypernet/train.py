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
import shutil
import sys
import time
from typing import Any, Optional

import numpy as np
import torch

from ..errors import HyperofaError
from ..formats import hypernet as out_format
from ..formats.jobdir import DS_CONFIG, latest_tag, read_rng, write_failure, write_rng
from ..formats.mapping import load_mapping
from ..method.hypernet import loop
from ..method.hypernet.data import TokenSet, WordTable, rank_batches
from ..method.hypernet.models import build_model, model_spec, trainable_parameters
from ..method.hypernet.settings import augment_spec, check_batches, context_rule, loss_spec, training_split
from ..runtime.job import NAN_EXIT, JobContext, job_main, weights_only_loads
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

    def __init__(self, job: dict[str, Any], resume: bool):
        super().__init__(job, COMMAND)
        self.hp = self.config.hypernet
        self.ds_config = job["ds_config"]
        self.resume = resume

    # --- setup -------------------------------------------------------------------------------------------------

    def setup(self) -> None:
        import deepspeed

        self.init_distributed(self.hp.threads_per_rank)
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
        self.spec = model_spec(self.hp, word_dim=self.mapping.word_dim, k=self.mapping.k)
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
        tag = f"epoch{epoch:05d}"
        (self.ckpt_dir / tag).mkdir(parents=True, exist_ok=True)
        write_rng(self.ckpt_dir, tag, self.rank, rng_state())
        self.write_checkpoint_info(tag, {"epoch": epoch, "world_size": self.world, "seed": self.seed})
        self.barrier()  # every rank's RNG file exists before `latest` can point at the tag
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag, client_state=client, save_latest=False)
        self.commit_checkpoint(tag)  # `latest` moves only once every rank has written its part
        if self.rank == 0:
            tags = sorted(p for p in self.ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("epoch"))
            for old in tags[: -self.hp.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self) -> dict[str, Any]:
        with weights_only_loads(self.ckpt_dir):
            path, client = self.engine.load_checkpoint(str(self.ckpt_dir))
        if path is None or client is None:
            raise HyperofaError(f"{self.ckpt_dir}: no checkpoint to resume from (hypernet.resume=true)")
        if client.get("world_size") != self.world:
            raise HyperofaError(
                f"{self.ckpt_dir}: written by {client.get('world_size')} ranks, this job has {self.world}; resume with the same count"
            )
        set_rng_state(read_rng(self.ckpt_dir, latest_tag(self.ckpt_dir), self.rank, RNG_ARRAYS))
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
        hp = self.hp
        client: dict[str, Any] = {"epoch": -1, "history": [], "best_loss": None, "best_epoch": None, "since_best": 0}
        if self.resume:
            client.update(self.load_checkpoint())
        history: list[dict[str, Any]] = list(client["history"])
        best_loss, best_epoch, since_best = client["best_loss"], client["best_epoch"], client["since_best"]
        negatives = self.gather_negatives if hp.gather_negatives and self.world > 1 else None
        finished, stopped_early, epoch = True, False, client["epoch"]
        from tqdm import tqdm

        epochs = range(client["epoch"] + 1, hp.epochs)
        for epoch in tqdm(epochs, desc="hypernet epochs", disable=self.rank != 0, file=sys.stderr):
            lr = loop.lr_at(epoch, hp.lr, hp.lr_decay, hp.lr_decay_every)
            for group in self.engine.optimizer.param_groups:
                group["lr"] = lr
            audit: list[np.ndarray] = []
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
            diverged = [key for key in ("train_loss", "val_loss") if not math.isfinite(row[key])]
            if diverged:  # sums are all-reduced: every rank stops here, before anything of this epoch is saved
                return {"finished": False, "failure": self.non_finite(diverged[0], row[diverged[0]], epoch, lr)}
            history.append(row)
            if hp.data_audit:
                from ..formats.files import save_npy

                save_npy(out_format.audit_path(self.out, epoch, self.rank),
                         np.concatenate(audit) if audit else np.zeros(0, np.int64))

            candidate = loop.selects(epoch, hp.select_every, hp.epochs)
            improved = candidate and (best_loss is None or row["val_loss"] < best_loss)
            state = self.full_state_dict() if improved else None  # `improved` agrees on all ranks
            if improved:
                best_loss, best_epoch, since_best = row["val_loss"], epoch, 0
                if self.rank == 0:
                    out_format.save_torch(self.out / out_format.BEST_MODEL, state)
            else:
                since_best += 1
            if self.rank == 0:
                out_format.write_metrics(self.out, history)
                tracker.log_metrics(
                    {**{k: v for k, v in row.items() if k != "epoch"}, "epoch_seconds": seconds,
                     "train_samples_per_s": sums[-1] / max(seconds, 1e-9)}, step=epoch,
                )
            stopped_early = (hp.early_stopping_patience is not None and best_epoch is not None
                             and since_best >= hp.early_stopping_patience)
            last = epoch == hp.epochs - 1 or stopped_early
            stop_here = hp.stop_after_epoch is not None and epoch >= hp.stop_after_epoch and not last
            if last or stop_here or (epoch + 1) % hp.checkpoint_every == 0:
                self.save_checkpoint(epoch, {"epoch": epoch, "history": history, "best_loss": best_loss,
                                             "best_epoch": best_epoch, "since_best": since_best,
                                             "world_size": self.world, "seed": self.seed})
            if stopped_early:
                break
            if stop_here:
                finished = False
                break
        return {"finished": finished, "last_epoch": epoch, "best_epoch": best_epoch, "best_val_loss": best_loss,
                "stopped_early": stopped_early, "epochs_run": len(history)}

    def non_finite(self, key: str, value: float, epoch: int, lr: float) -> str:
        last = latest_tag(self.ckpt_dir)
        kept = f"the last checkpoint is {self.ckpt_dir / last}" if last else "no checkpoint had been written yet"
        return (f"hypernet {key.replace('_', ' ')} became {value} in epoch {epoch} (lr {lr:g}); stopped without "
                f"saving, {kept}: lower hypernet.lr or check the mapping's word vectors")

    def predict(self, tracker: Any) -> dict[str, Any]:
        from ..method.hypernet.models import model_from_spec
        from ..method.hypernet.predict import predict_all

        model = model_from_spec(self.spec).to(self.device)
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

def run(job: dict[str, Any], args: Any) -> int:
    worker = HypernetJob(job, args.resume)
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
        argv, COMMAND, run, lambda parser: parser.add_argument("--resume", action="store_true",
                                                               help="continue from the latest checkpoint"),
    )


if __name__ == "__main__":
    sys.exit(main())
