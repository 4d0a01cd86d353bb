"""The hypernetwork training job, run on every rank under the `deepspeed` launcher:

    deepspeed [--hostfile H --num_nodes N --launcher L] --module hyperofa_dist.hypernet.train --job job.json [--resume]

`hyperofa hypernet` writes job.json (the effective config, the filled DeepSpeed config, the output directory and
the MLflow parent run id) and launches this module. Each rank memory-maps the word table once, builds the model,
and drives a raw `deepspeed.initialize` engine: per epoch its disjoint share of the length-grouped batches
(loop.train_epoch), then validation (loss and mean cosine) all-reduced over ranks. Checkpoints are written by all
ranks every `checkpoint_every` epochs with client state (epoch, metric history, best loss); each rank also stores
its RNG states next to them, so a resumed run reproduces an uninterrupted one. Rank 0 keeps the best model by
validation loss (weights only, no word table), logs per-epoch metrics to MLflow, and at the end predicts the new
tokens' coordinates (predict.py). `--bench-steps` turns the job into a throughput probe for `hyperofa bench`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..artifacts import atomic_write_bytes, atomic_write_json
from ..config import Config, build_config
from ..errors import HyperofaError
from . import loop
from .data import AugmentSpec, TokenSet, WordTable, rank_batches
from .inputs import MappingInputs, load_mapping
from .models import build_model, model_spec, trainable_parameters

BEST_MODEL = "model.pt"
MODEL_SPEC = "model_config.json"
METRICS = "metrics.jsonl"
TRAIN_STATE = "train_state.json"
CHECKPOINTS = "checkpoints"
AUDIT = "audit"


def augment_spec(hp: Any) -> AugmentSpec:
    return AugmentSpec(prob=hp.augment_prob, threshold=hp.augment_threshold, min_fraction=hp.augment_min_fraction)


def loss_spec(hp: Any) -> loop.LossSpec:
    return loop.LossSpec(lam=hp.loss_lambda, temperature=hp.temperature)


def rank_seed(seed: int, rank: int) -> int:
    return (seed * 1_000_003 + rank + 1) % 2**63


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_torch(path: Path, obj: Any) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


class Job:
    """One rank's view of the training job."""

    def __init__(self, job: dict[str, Any], resume: bool):
        self.config: Config = build_config(job["config"])
        self.hp = self.config.hypernet
        self.seed = self.config.run.seed
        self.out = Path(job["out_dir"])
        self.ckpt_dir = self.out / CHECKPOINTS
        self.ds_config = job["ds_config"]
        self.resume = resume
        self.rank = int(os.environ.get("RANK", "0"))
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device(f"cuda:{self.local_rank}") if torch.cuda.is_available() else torch.device("cpu")
        if job.get("parent_run_id") and not os.environ.get("HYPEROFA_PARENT_RUN_ID"):
            # pdsh/ssh launchers forward only MLFLOW*/PYTHON* variables; the job file carries the parent run id.
            os.environ["HYPEROFA_PARENT_RUN_ID"] = job["parent_run_id"]

    # --- setup -------------------------------------------------------------------------------------------------

    def setup(self) -> None:
        import deepspeed

        if self.hp.threads_per_rank:
            torch.set_num_threads(self.hp.threads_per_rank)
        elif self.device.type == "cpu":
            local = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", self.world)))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local, 1)))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo")

        # The parent checked the vectors' fingerprint; ranks may not see the original vector file.
        self.mapping: MappingInputs = load_mapping(self.config, check_vectors=False)
        need = self.hp.batch_size * self.world * self.hp.grad_accum
        if len(self.mapping.splits["train"]) < need:
            raise HyperofaError(
                f"{self.mapping.path / 'split.npz'}: {len(self.mapping.splits['train'])} training tokens, fewer than "
                f"hypernet.batch_size x ranks x grad_accum = {need}"
            )
        self.table = WordTable(self.mapping.word_vectors, self.device)
        coords = self.mapping.coordinates()
        source = self.mapping.source_postings()
        self.train_set = TokenSet(self.mapping.splits["train"], source, coords, self.mapping.k)
        self.val_set = TokenSet(self.mapping.splits["val"], source, coords, self.mapping.k)

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
        torch.manual_seed(rank_seed(self.seed, self.rank))  # dropout streams differ per rank

    # --- collectives -------------------------------------------------------------------------------------------

    def all_sum(self, values: np.ndarray) -> np.ndarray:
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.cpu().numpy()

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def gather_negatives(self, target: torch.Tensor) -> tuple[torch.Tensor, int]:
        import torch.distributed as dist

        parts = [torch.empty_like(target) for _ in range(self.world)]
        dist.all_gather(parts, target.contiguous())
        return torch.cat(parts), self.rank * target.shape[0]

    # --- checkpoints -------------------------------------------------------------------------------------------

    def save_checkpoint(self, epoch: int, client: dict[str, Any]) -> None:
        tag = f"epoch{epoch:05d}"
        (self.ckpt_dir / tag).mkdir(parents=True, exist_ok=True)
        _save_torch(self.ckpt_dir / tag / f"rng_rank{self.rank}.pt", rng_state())
        self.barrier()  # every rank's RNG file exists before `latest` can point at the tag
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag, client_state=client, save_latest=True)
        self.barrier()
        if self.rank == 0:
            tags = sorted(p for p in self.ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("epoch"))
            for old in tags[: -self.hp.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self) -> dict[str, Any]:
        path, client = self.engine.load_checkpoint(str(self.ckpt_dir))
        if path is None or client is None:
            raise HyperofaError(f"{self.ckpt_dir}: no checkpoint to resume from (hypernet.resume=true)")
        if client.get("world_size") != self.world:
            raise HyperofaError(
                f"{self.ckpt_dir}: written by {client.get('world_size')} ranks, this job has {self.world}; resume with the same count"
            )
        tag = (self.ckpt_dir / "latest").read_text(encoding="utf-8").strip()
        rng_file = self.ckpt_dir / tag / f"rng_rank{self.rank}.pt"
        if not rng_file.is_file():
            raise HyperofaError(f"{rng_file}: RNG state of rank {self.rank} missing from the checkpoint")
        set_rng_state(torch.load(rng_file, weights_only=False))
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
            history.append(row)
            if hp.data_audit:
                from .predict import save_npy

                save_npy(self.out / AUDIT / f"epoch{epoch:05d}_rank{self.rank}.npy",
                         np.concatenate(audit) if audit else np.zeros(0, np.int64))

            improved = best_loss is None or row["val_loss"] < best_loss
            state = self.full_state_dict() if improved else None  # `improved` agrees on all ranks
            if improved:
                best_loss, best_epoch, since_best = row["val_loss"], epoch, 0
                if self.rank == 0:
                    _save_torch(self.out / BEST_MODEL, state)
            else:
                since_best += 1
            if self.rank == 0:
                atomic_write_bytes(self.out / METRICS, "".join(json.dumps(r, sort_keys=True) + "\n" for r in history).encode())
                tracker.log_metrics(
                    {**{k: v for k, v in row.items() if k != "epoch"}, "epoch_seconds": seconds,
                     "train_samples_per_s": sums[-1] / max(seconds, 1e-9)}, step=epoch,
                )
            stopped_early = hp.early_stopping_patience is not None and since_best >= hp.early_stopping_patience
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

    def predict(self, tracker: Any) -> dict[str, Any]:
        from .models import model_from_spec
        from .predict import predict_all

        model = model_from_spec(self.spec).to(self.device)
        model.load_state_dict(torch.load(self.out / BEST_MODEL, map_location=self.device, weights_only=True))
        metrics = predict_all(
            model, self.table, source=self.mapping.source_postings(), target=self.mapping.target_postings(),
            coordinates=self.mapping.coordinates(), copied=self.mapping.copied_target_ids(),
            test_ids=self.mapping.splits["test"], out_dir=self.out, batch_size=self.hp.predict_batch_size,
            cap=self.hp.max_context, device=self.device,
        )
        tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        return metrics

    # --- benchmark probe ---------------------------------------------------------------------------------------

    def bench(self, steps: int, warmup: int) -> dict[str, Any]:
        """Samples per second of steady-state training steps (all ranks), startup and warm-up excluded."""
        hp = self.hp
        batches: list[np.ndarray] = []
        epoch = 0
        while len(batches) < steps + warmup:
            batches += self.epoch_batches(epoch)
            epoch += 1
        kwargs = dict(seed=self.seed, epoch=0, rank=self.rank, cap=hp.max_context, augment=augment_spec(hp),
                      loss=loss_spec(hp), device=self.device, dtype=self.dtype)
        self.engine.train()
        loop.train_epoch(self.engine, self.update, self.table, self.train_set, batches[:warmup], **kwargs)
        self.barrier()
        start = time.perf_counter()
        sums = loop.train_epoch(self.engine, self.update, self.table, self.train_set, batches[warmup : warmup + steps], **kwargs)
        self.barrier()
        seconds = time.perf_counter() - start
        total = self.all_sum(np.array([sums[-1]]))[0]
        return {"samples_per_s": total / seconds, "seconds": seconds, "samples": int(total), "world_size": self.world}


def run(job_file: Path, resume: bool, bench_steps: Optional[int], bench_warmup: int) -> int:
    job = json.loads(Path(job_file).read_text(encoding="utf-8"))
    worker = Job(job, resume)
    worker.setup()
    if bench_steps:
        result = worker.bench(bench_steps, bench_warmup)
        if worker.rank == 0:
            atomic_write_json(worker.out / "bench.json", result)
        return 0
    from ..tracking import make_tracker

    tracker = make_tracker(worker.config, rank=worker.rank)
    with tracker.session("hypernet", worker.config), tracker.stage("hypernet", worker.config) as stage_run:
        stage_run.log_params({"trainable_params": worker.trainable, "world_size": worker.world,
                              "zero_stage": worker.zero_stage, "dtype": str(worker.dtype), "resumed": resume})
        if worker.rank == 0:
            stage_run.log_artifact(worker.out / "ds_config.json")
        result = worker.train(stage_run)
        worker.barrier()
        if result["finished"] and worker.rank == 0:
            result["test"] = worker.predict(stage_run)
        if worker.rank == 0:
            atomic_write_json(worker.out / TRAIN_STATE, result)
        worker.barrier()
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="hyperofa_dist.hypernet.train", description=__doc__.split("\n")[0])
    parser.add_argument("--job", required=True, help="job.json written by `hyperofa hypernet`")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    parser.add_argument("--bench-steps", type=int, default=None, help="throughput probe: time this many steps")
    parser.add_argument("--bench-warmup", type=int, default=3, help="untimed steps before the probe")
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    args = parser.parse_args(argv)
    try:
        return run(Path(args.job), args.resume, args.bench_steps, args.bench_warmup)
    except HyperofaError as exc:
        print(f"hyperofa hypernet: error: {exc}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
