"""`hyperofa tune hypernet`: search the hypernetwork's settings with Ray Tune on the user's Ray, write the winner.

Every input is checked before Ray starts (the mapping, the source model and target tokenizer, the held-out text the
new-token loss is measured on, the search space's values). Trials are `tune.trials` settings drawn from
`tune.space` with the tune seed; each runs `trial.run_trial` in a Ray worker (`tune.cpus_per_trial`,
`tune.gpus_per_trial`), reporting its validation loss every epoch, so ASHA can stop the worse half early, and at its
end the new-token loss of the HyperOFA model it initialises. The winner is the trial with the lowest new-token loss;
`best.yaml` is the effective config with its hypernet keys. One MLflow run `tune/hypernet` holds per-trial metrics
(step = trial), the winner's settings as params and the three files as artifacts.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from ..config import Config
from ..errors import HyperofaError
from ..formats import tune as out_format
from ..formats.mapping import load_mapping
from ..formats.mapping import stage_of as mapping_stage
from ..formats.shards import ShardSet, find_shardset, first_blocks, heldout_shards, prepare_dir
from ..formats.tokenizer import TOKENIZER_JSON, target_tokenizer_dir, tokenizer_fingerprint
from ..formats.vectors import configured_vectors_path
from ..method.hypernet.settings import check_batches, training_split
from ..runtime.ray import ray_session
from ..runtime.stage import StageShell
from .space import hypernet_changes, sample_settings, tune_seed, winner
from .trial import NEW_TOKEN_LOSS, open_workspace, run_trial

RUN_NAME = "tune/hypernet"
FAILED = "failed"


def require_heldout(config: Config, target_fingerprint: dict[str, str]) -> ShardSet:
    """The new-token loss needs prepare's held-out shards made with the target tokenizer (what init reads)."""
    shards = prepare_dir(config.run_dir)
    if config.init.heldout_blocks == 0:
        raise HyperofaError("config key init.heldout_blocks is 0: tune hypernet judges trials by the new-token loss "
                            "on that many held-out blocks per language")
    shardset = find_shardset(shards)
    if shardset is None:
        raise HyperofaError(f"{shards}: no held-out shards (prepare has not run); run `hyperofa prepare` "
                            "first (tune hypernet judges trials by the new-token loss on them)")
    shardset.require_tokenizer(target_fingerprint[TOKENIZER_JSON], "the target tokenizer",
                               "re-run `hyperofa prepare` (tune hypernet judges trials by the new-token loss on them)")
    if not first_blocks(heldout_shards(shards), 1):
        raise HyperofaError(f"{shards}: the prepare stage has no held-out blocks to measure the new-token loss on")
    return shardset


def trial_configs(config: Config) -> list[tuple[dict[str, Any], Config]]:
    """(settings, the config a trial trains with) per trial; an impossible value fails here, naming the key."""
    t = config.tune
    out = []
    for settings in sample_settings(t.space, t.trials, tune_seed(config)):
        try:
            out.append((settings, config.with_changes(hypernet_changes(settings, t.epochs))))
        except HyperofaError as exc:
            raise HyperofaError(f"config key tune.space: {exc}") from None
    return out


def _trainable(params: dict[str, Any], trees: list[dict[str, Any]]) -> None:
    """A Ray Tune worker: one trial, reported through `tune.report`."""
    import torch
    from ray import tune

    from ..config import build_config

    config = build_config(trees[params["trial"]])
    torch.set_num_threads(config.tune.cpus_per_trial)
    device = torch.device("cuda" if config.tune.gpus_per_trial > 0 and torch.cuda.is_available() else "cpu")
    run_trial(cached_workspace(config, device), config.hypernet, tune.report)


_WORKSPACES: dict[tuple[str, str], Any] = {}


def cached_workspace(config: Config, device: Any) -> Any:
    """A reused Ray actor runs many trials: the workspace (source model, tables, splits) is loaded once per process.
    Only `hypernet.context` of the trial's hypernet keys shapes it (the token sets' context rule)."""
    from ..formats.files import digest

    tree = config.effective()
    key = (digest({**tree, "hypernet": {"context": tree["hypernet"]["context"]}}), str(device))
    if key not in _WORKSPACES:
        _WORKSPACES.clear()  # one at a time: a workspace holds the source model
        _WORKSPACES[key] = open_workspace(config, device)
    return _WORKSPACES[key]


def search(config: Config, trials: list[Config], storage: Path) -> list[dict[str, Any]]:
    """Run the trials with Ray Tune and ASHA on the Ray session; each trial's last result (in trial order)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    t = config.tune
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=t.epochs, grace_period=min(t.grace_epochs, t.epochs),
                              reduction_factor=t.reduction_factor)
    trainable = tune.with_resources(
        tune.with_parameters(_trainable, trees=[c.effective() for c in trials]),
        {"cpu": t.cpus_per_trial, "gpu": t.gpus_per_trial},
    )
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(list(range(len(trials))))},
        tune_config=tune.TuneConfig(metric="val_loss", mode="min", scheduler=scheduler,
                                    max_concurrent_trials=t.concurrent, reuse_actors=True),
        run_config=tune.RunConfig(name="trials", storage_path=str(storage), verbose=0),
    )
    grid = tuner.fit()
    found: dict[int, dict[str, Any]] = {}
    for result in grid:
        trial = int(result.config["trial"])
        if result.error is not None:
            refused = _hyperofa_error(result.error)
            if refused is None:  # a bug, not a setting the data refuses: stop with it
                first = (str(result.error).strip().splitlines() or [type(result.error).__name__])[0]
                raise HyperofaError(f"tune hypernet: trial {trial} failed ({first[:200]})")
            found[trial] = {**(result.metrics or {}), FAILED: str(refused)}
            continue
        found[trial] = dict(result.metrics or {})
    missing = [i for i in range(len(trials)) if i not in found]
    if missing:
        raise HyperofaError(f"tune hypernet: Ray Tune ended without a result for trial {missing[0]} (interrupted, or "
                            "its worker was lost); nothing written")
    return [found[i] for i in range(len(trials))]


def _hyperofa_error(error: BaseException) -> Optional[HyperofaError]:
    """The HyperofaError behind a trial's error (Ray wraps it), if that is what ended the trial: a setting this
    data refuses (e.g. a loss that became non-finite) fails that trial only."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, HyperofaError):
            return error
        error = getattr(error, "cause", None) or error.__cause__
    return None


def table_rows(settings: list[dict[str, Any]], results: list[dict[str, Any]], epochs: int) -> list[dict[str, Any]]:
    rows = []
    for i, (chosen, result) in enumerate(zip(settings, results)):
        run = int(result.get("epoch", -1)) + 1
        loss = float(result.get(NEW_TOKEN_LOSS, math.nan))
        ended = "finished" if NEW_TOKEN_LOSS in result else "stopped by ASHA"
        if NEW_TOKEN_LOSS in result and run < epochs:
            ended = "early stopping"
        if FAILED in result:
            ended, loss = f"failed: {result[FAILED]}", math.nan
        rows.append({"trial": i, **{f"hypernet.{k}": v for k, v in chosen.items()}, "ended": ended, "epochs": run,
                     "best_epoch": int(result.get("best_epoch", -1)), "val_loss": float(result.get("val_loss", math.nan)),
                     "best_val_loss": float(result.get("best_val_loss", math.nan)), NEW_TOKEN_LOSS: loss})
    return rows


def run(config: Config, tracker: Any) -> int:
    run_dir = config.run_dir
    stage = out_format.stage_of(run_dir)
    mapping = load_mapping(run_dir)
    vectors = configured_vectors_path(config)
    if vectors is not None:
        mapping.require_vectors(vectors)
    mapping.require_k(config.mapping.num_primitives)
    splits, _ = training_split(mapping)
    trials = trial_configs(config)
    for _, trial in trials:
        check_batches(mapping, splits["train"], trial.hypernet.batch_size, 1, 1)
    target = tokenizer_fingerprint(target_tokenizer_dir(config))
    shardset = require_heldout(config, target)
    inputs = {
        "config": config.fingerprint("tune", "hypernet", "init", "source", "run", "evaluate.mlm_probability"),
        "mapping": mapping_stage(run_dir).require().get("outputs"),
        "target_tokenizer": target,
        "heldout": shardset.inputs_digest,
    }
    with StageShell.open(config, tracker, "tune", stage, inputs, run_name=RUN_NAME) as shell:
        if shell.up_to_date:
            return 0
        t = config.tune
        settings = [s for s, _ in trials]
        shell.say(f"{len(trials)} trials of at most {t.epochs} epochs (ASHA grace {t.grace_epochs}, "
                  f"reduction {t.reduction_factor}), {t.concurrent} at a time")
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="hyperofa-tune-") as storage, ray_session(config):
            results = search(config, [c for _, c in trials], Path(storage))
        seconds = time.perf_counter() - start
        rows = table_rows(settings, results, t.epochs)
        best = winner(rows, NEW_TOKEN_LOSS)
        if best is None:
            failed = [f"; trial {r['trial']} {r['ended']}" for r in rows if r["ended"].startswith("failed")]
            raise HyperofaError("tune hypernet: no trial reached a finite new-token loss (lower hypernet.lr in "
                                f"tune.space, or raise tune.grace_epochs){failed[0] if failed else ''}")
        chosen = trials[best][1]
        summary = {
            "winner": {"trial": best, "settings": settings[best], NEW_TOKEN_LOSS: rows[best][NEW_TOKEN_LOSS],
                       "best_val_loss": rows[best]["best_val_loss"]},
            "trials": len(rows), "finished": sum(NEW_TOKEN_LOSS in r and FAILED not in r for r in results),
            "space": t.space, "epochs": t.epochs, "grace_epochs": t.grace_epochs,
            "reduction_factor": t.reduction_factor, "seed": tune_seed(config),
            "epochs_trained": sum(r["epochs"] for r in rows),
        }

        shell.begin()
        outputs = [
            out_format.write_trials(stage.path, rows),
            out_format.write_best_config(stage.path, chosen.effective()),
            out_format.write_summary(stage.path, summary),
        ]
        shell.finish(outputs=outputs, counts={"trials": len(rows), "finished": summary["finished"],
                                              "epochs_trained": summary["epochs_trained"]},
                     extra={"winner": summary["winner"]})
        run_ = shell.run
        # Timings go to MLflow only: the files stay the same bytes on a re-run.
        for row, result in zip(rows, results):
            values = {k: row[k] for k in ("best_val_loss", NEW_TOKEN_LOSS, "epochs")}
            values["trial_seconds"] = float(result.get("time_total_s", math.nan))
            run_.log_metrics({k: v for k, v in values.items() if math.isfinite(v)}, step=row["trial"])
        run_.log_params({f"best.hypernet.{k}": v for k, v in settings[best].items()})
        run_.log_metrics({f"best/{NEW_TOKEN_LOSS}": rows[best][NEW_TOKEN_LOSS], "seconds/total": seconds})
        for path in outputs:
            run_.log_artifact(path)
    shell.say(f"{len(rows)} trials, {summary['epochs_trained']} epochs trained in {seconds:.1f} s (Ray start "
              "included)")
    shell.say(f"trial {best} wins (new-token loss {rows[best][NEW_TOKEN_LOSS]:.4f}: "
              + ", ".join(f"hypernet.{k}={v}" for k, v in settings[best].items())
              + f") -> {out_format.best_config_path(stage.path)}")
    return 0
