"""MLflow tracking: one parent run per command invocation, one named, tagged run per stage, rank 0 only.

Every MLflow call of the system goes through this module (docs/MLFLOW.md has the layout a user sees):
- `make_tracker(config)` gives the tracker of this process: `MlflowTracker` on global rank 0 (env `RANK`, unset
  means 0) when tracking is enabled, else the `NullTracker`, whose methods do nothing.
- `tracker.session(command)` opens the parent run of a command (`pipeline`, `demo`, `prepare`, ...);
  `tracker.stage(name, tags=...)` a child run named for what it is (`pretrain/ofa`, `evaluate/ofa@60`). Every run
  carries `hyperofa.pipeline` (a short hash of the resolved run directory) and `hyperofa.run_dir`, so runs of two
  pipelines sharing an experiment stay apart.
- A stage that is up to date opens no run; `tracker.reused(name)` records it on the parent (`hyperofa.reused`).
- A DeepSpeed job's rank 0 logs into the run its stage shell opened: the shell writes that run's id into the job
  file and the job calls `tracker.attach(run_id)` (no nested run, no second parent).
- `tracker.log_model(dir, name)` makes an HF model directory the run's `model/` artifact and a version of the
  registered model `name` (`tracking.log_models`: hard links into a local store, so no second copy on disk).
- `open_store(uri)` reads runs back for `hyperofa compare` as plain records.
The embedded default store is `sqlite:///<run_dir>/mlflow.db` with artifacts in `<run_dir>/mlartifacts`; a real
`mlflow server` is used by setting `tracking.tracking_uri`.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from .config import Config, flatten
from .errors import HyperofaError

# Tags every tool of the system reads (compare, tests, docs/MLFLOW.md).
COMMAND_TAG = "hyperofa.command"  # parent runs: the command
STAGE_TAG = "hyperofa.stage"  # stage runs: tokenizer, prepare, vectors, mapping, hypernet, init, pretrain, ...
METHOD_TAG = "init.method"  # runs about one init method's model: init, pretrain, evaluate
STEP_TAG = "hyperofa.step"  # evaluate runs (and model versions): the pretraining step of the model
PIPELINE_TAG = "hyperofa.pipeline"  # every run: short sha256 of the resolved run directory
RUN_DIR_TAG = "hyperofa.run_dir"  # every run: the resolved run directory itself
REUSED_TAG = "hyperofa.reused"  # parent runs: the stages found up to date (no run of their own)
RESUMED_TAG = "hyperofa.resumed"  # stage runs continued by a resumed job: how many times
OBJECTIVE_TAG = "hyperofa.objective"  # pretrain runs: masked or causal, what train/loss and eval/loss measure
MODEL_DIR_TAG = "hyperofa.model_dir"  # runs that exported a model: where it is on disk
MODEL_VERSION_TAG = "hyperofa.model_version"  # ... and its registered version, `<name>/<version>`
MODEL_ARTIFACT = "model"  # the artifact path of a logged model directory


def global_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def default_tracking_uri(run_dir: Path) -> str:
    return f"sqlite:///{(Path(run_dir) / 'mlflow.db').resolve()}"


def pipeline_id(run_dir: str | Path) -> str:
    """The identity of a pipeline: the first 12 hex digits of the sha256 of its resolved run directory."""
    return hashlib.sha256(str(Path(run_dir).resolve()).encode("utf-8")).hexdigest()[:12]


def registered_model_name(experiment: str, method: str) -> str:
    """`<experiment>-<method>`: one registered model per init method, a version per exported model."""
    return f"{experiment}-{method}"


class NullTracker:
    """The tracker of non-zero ranks and of disabled tracking: accepts every call, records nothing."""

    enabled = False
    run_id: Optional[str] = None
    parent_run_id: Optional[str] = None
    tracking_uri: Optional[str] = None

    @contextlib.contextmanager
    def session(self, command: str, config: Optional[Config] = None) -> Iterator["NullTracker"]:
        yield self

    @contextlib.contextmanager
    def stage(
        self,
        name: str,
        config: Optional[Config] = None,
        *,
        tags: Optional[dict[str, Any]] = None,
        resume_run_id: Optional[str] = None,
    ) -> Iterator["NullTracker"]:
        yield self

    @contextlib.contextmanager
    def attach(self, run_id: Optional[str]) -> Iterator["NullTracker"]:
        yield self

    def reused(self, name: str) -> None:
        pass

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        pass

    def set_tags(self, tags: dict[str, Any]) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        pass

    def log_artifacts(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        pass

    def log_model(
        self, model_dir: str | Path, registered_name: str, tags: Optional[dict[str, Any]] = None
    ) -> Optional[str]:
        return None


class MlflowTracker(NullTracker):
    """Explicit-client MLflow tracker: no global fluent state, so nested stages and tests stay independent."""

    enabled = True

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        artifact_root: Optional[Path] = None,
        run_dir: Optional[Path] = None,
        log_models: str = "link",
    ):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.log_models = log_models
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        try:
            found = self.client.get_experiment_by_name(experiment)
            if found is None:
                location = artifact_root.resolve().as_uri() if artifact_root is not None else None
                self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
            else:
                self.experiment_id = found.experiment_id
        except Exception as exc:  # any transport or store failure means: cannot track, stop before work
            raise HyperofaError(
                f"MLflow tracking store {tracking_uri} is unreachable ({_first_line(exc)}); "
                "start it, fix tracking.tracking_uri, or set tracking.enabled=false"
            ) from None
        self.identity: dict[str, str] = {}
        if run_dir is not None:
            self.identity = {PIPELINE_TAG: pipeline_id(run_dir), RUN_DIR_TAG: str(Path(run_dir).resolve())}
        self.run_id = None
        self.parent_run_id = None
        self._reused: list[str] = []
        self._known_params: dict[str, dict[str, str]] = {}  # run id -> params it already has (continued runs)

    # --- runs -----------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _scope(self, run_id: str, terminate: bool) -> Iterator["MlflowTracker"]:
        previous, self.run_id = self.run_id, run_id
        status = "FAILED"
        try:
            yield self
            status = "FINISHED"
        except BaseException as exc:
            if not terminate:
                # A rank stopped inside a run its driver owns: the driver may be gone (SIGKILLed, so the rank got
                # SIGTERM from its supervisor), and nobody else would end the run; a live driver ends it again.
                from .runtime.process import Interrupted

                self.client.set_terminated(run_id, status="KILLED" if isinstance(exc, Interrupted) else "FAILED")
            raise
        finally:
            if terminate:
                self.client.set_terminated(run_id, status=status)
            self.run_id = previous

    @contextlib.contextmanager
    def session(self, command: str, config: Optional[Config] = None) -> Iterator["MlflowTracker"]:
        """The parent run of one command invocation, named after the command."""
        run = self.client.create_run(self.experiment_id, run_name=command, tags={COMMAND_TAG: command, **self.identity})
        with self._scope(run.info.run_id, terminate=True) as tracker:
            if config is not None:
                self.log_params(flatten(config.effective()))
            self.parent_run_id, self._reused = run.info.run_id, []
            try:
                yield tracker
            finally:
                self.parent_run_id = None

    @contextlib.contextmanager
    def stage(
        self,
        name: str,
        config: Optional[Config] = None,
        *,
        tags: Optional[dict[str, Any]] = None,
        resume_run_id: Optional[str] = None,
    ) -> Iterator["MlflowTracker"]:
        """A stage's run, named `name` (`pretrain/ofa`), tagged `hyperofa.stage` (the part before the first `/`
        unless `tags` says otherwise) and the pipeline identity. `resume_run_id`: the run of an interrupted job
        this stage continues; when the store still has it, that run is reopened instead of starting another."""
        all_tags = {STAGE_TAG: name.split("/")[0], **self.identity, **{k: str(v) for k, v in (tags or {}).items()}}
        run_id = self._reopen(resume_run_id, all_tags) if resume_run_id else None
        if run_id is None:
            if self.parent_run_id:
                all_tags["mlflow.parentRunId"] = self.parent_run_id
            run_id = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags).info.run_id
        with self._scope(run_id, terminate=True) as tracker:
            if config is not None:
                self.log_params(flatten(config.effective()))
            yield tracker

    def _reopen(self, run_id: str, tags: dict[str, str]) -> Optional[str]:
        """The interrupted run `run_id`, set running again, or None when this store/experiment does not have it."""
        try:
            run = self.client.get_run(run_id)
        except Exception:  # unknown id, or a run of another store: start a fresh run
            return None
        if run.info.experiment_id != self.experiment_id or run.info.lifecycle_stage != "active":
            return None
        self._known_params[run_id] = dict(run.data.params)
        self.client.update_run(run_id, status="RUNNING")
        times = int(run.data.tags.get(RESUMED_TAG, "0")) + 1
        self.client.set_tag(run_id, RESUMED_TAG, str(times))
        for key, value in tags.items():
            self.client.set_tag(run_id, key, value)
        return run_id

    @contextlib.contextmanager
    def attach(self, run_id: Optional[str]) -> Iterator["MlflowTracker"]:
        """Log into a run another process opened and will close (a DeepSpeed job's rank 0 logging into the run of
        its stage shell, whose id travels in the job file)."""
        if not run_id:
            print("hyperofa: the job file names no MLflow run; this job logs nothing", file=sys.stderr, flush=True)
            yield NullTracker()  # type: ignore[misc]
            return
        with self._scope(run_id, terminate=False) as tracker:
            yield tracker

    def reused(self, name: str) -> None:
        """An up-to-date stage: named in the parent run's `hyperofa.reused` tag, and no run of its own."""
        if not self.parent_run_id:
            return
        self._reused.append(name)
        self.client.set_tag(self.parent_run_id, REUSED_TAG, ", ".join(self._reused))

    # --- logging --------------------------------------------------------------------------------------------

    def _require_run(self) -> str:
        if self.run_id is None:
            raise RuntimeError("log call outside a tracker session or stage")
        return self.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        run_id = self._require_run()
        known = self._known_params.get(run_id, {})  # a reopened run keeps the params it has (they are immutable)
        items = [Param(k, _param_value(v)) for k, v in sorted(params.items()) if k not in known]
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        from mlflow.entities import Metric

        run_id = self._require_run()
        now = int(time.time() * 1000)
        items = [
            Metric(k, float(v), now, step or 0)
            for k, v in sorted(metrics.items())
            if v is not None and math.isfinite(float(v))
        ]
        for start in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[start : start + 1000])

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self._require_run(), tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        self.client.log_artifact(self._require_run(), str(path), artifact_path)

    def log_artifacts(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        self.client.log_artifacts(self._require_run(), str(path), artifact_path)

    def log_model(
        self, model_dir: str | Path, registered_name: str, tags: Optional[dict[str, Any]] = None
    ) -> Optional[str]:
        """The HF directory `model_dir` as this run's `model/` artifact and a new version of `registered_name`
        (source `runs:/<run id>/model`, tagged with `tags`); returns `<name>/<version>`, or None when
        `tracking.log_models=none`. `link` (default) hard-links the files into a local artifact store on the same
        filesystem (no second copy on disk) and uploads to any other store; `copy` always copies."""
        run_id = self._require_run()
        model_dir = Path(model_dir).resolve()
        self.set_tags({MODEL_DIR_TAG: model_dir})
        if self.log_models == "none":
            return None
        artifact_uri = self.client.get_run(run_id).info.artifact_uri
        local = _local_path(artifact_uri)
        linked = False
        if self.log_models == "link" and local is not None:
            linked = link_tree(model_dir, local / MODEL_ARTIFACT)
        if not linked:
            self.client.log_artifacts(run_id, str(model_dir), MODEL_ARTIFACT)
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(registered_name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = self.client.create_model_version(
            registered_name,
            f"runs:/{run_id}/{MODEL_ARTIFACT}",
            run_id=run_id,
            tags={k: str(v) for k, v in {**self.identity, **(tags or {})}.items()},
            description=f"{model_dir} (stock HF directory: AutoModelForMaskedLM.from_pretrained)",
        )
        ref = f"{registered_name}/{version.version}"
        self.set_tags({MODEL_VERSION_TAG: ref})
        return ref


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else exc.__class__.__name__)[:200]


def _local_path(uri: str) -> Optional[Path]:
    """The directory of a local artifact URI (`file:///...` or a plain path), else None (server, S3, ...)."""
    from urllib.parse import unquote, urlparse

    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "" and uri.startswith("/"):
        return Path(uri)
    return None


def link_tree(source: Path, target: Path) -> bool:
    """Hard-link every file of `source` under `target` (same layout); False, leaving nothing, when the two are on
    different filesystems or the filesystem has no hard links. Exports replace a model directory by renaming a new
    one into place, never by rewriting files, so a linked artifact keeps the bytes of its own run."""
    files = [p for p in sorted(source.rglob("*")) if p.is_file()]
    made: list[Path] = []
    try:
        for path in files:
            dest = target / path.relative_to(source)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.exists():
                dest.unlink()
            os.link(path, dest)
            made.append(dest)
    except OSError:
        for dest in made:
            dest.unlink(missing_ok=True)
        return False
    return True


def _param_value(value: Any) -> str:
    text = "null" if value is None else str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


def numeric_metrics(tree: dict[str, Any]) -> dict[str, float]:
    """The numeric leaves of nested statistics as MLflow metrics (`source.length_percentiles.50`); booleans 0/1."""
    import numbers

    return {
        key: float(value)
        for key, value in flatten(tree).items()
        if isinstance(value, numbers.Number) and not isinstance(value, complex)
    }


def tracking_uri_of(config: Config) -> str:
    return config.tracking.tracking_uri or default_tracking_uri(config.run_dir)


def make_tracker(config: Config, rank: Optional[int] = None) -> NullTracker:
    """The tracker for this process: MLflow on global rank 0 when enabled, otherwise the no-op tracker."""
    rank = global_rank() if rank is None else rank
    if not config.tracking.enabled or rank != 0:
        return NullTracker()
    run_dir = config.run_dir
    uri = tracking_uri_of(config)
    artifact_root = None
    if uri.startswith("sqlite:///"):  # artifacts beside the database (MLflow's default is ./mlruns in the cwd)
        db = Path(uri[len("sqlite:///") :])
        db.parent.mkdir(parents=True, exist_ok=True)
        artifact_root = db.parent / "mlartifacts"
    return MlflowTracker(uri, config.tracking.experiment, artifact_root, run_dir, config.tracking.log_models)


# --- reading runs back (hyperofa compare) ------------------------------------------------------------------------


@dataclass
class RunRecord:
    """One run as `hyperofa compare` sees it: plain data, no MLflow object."""

    run_id: str
    name: str
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]  # last value of each metric
    start_time: int = 0
    status: str = "FINISHED"
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # filled on request


class RunStore:
    """Read-only access to a tracking store: the runs of an experiment or given ids, and metric histories."""

    def __init__(self, tracking_uri: str):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    def experiment_runs(self, experiment: str) -> list[RunRecord]:
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            raise HyperofaError(f"MLflow experiment {experiment!r} not found (compare.experiment)")
        runs, token = [], None
        while True:
            page = self.client.search_runs([found.experiment_id], max_results=1000, page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                break
        return [_record(r) for r in runs]

    def runs(self, run_ids: Sequence[str]) -> list[RunRecord]:
        out = []
        for run_id in run_ids:
            try:
                out.append(_record(self.client.get_run(run_id)))
            except Exception:  # MLflow raises MlflowException or a store error for an unknown id
                raise HyperofaError(f"compare.run_ids: run {run_id} not found in the tracking store") from None
        return out

    def history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """(step, value) sorted by step; several values at one step keep the latest logged (a resumed job logs
        the steps after its last checkpoint again)."""
        by_step: dict[int, tuple[int, float]] = {}
        for m in self.client.get_metric_history(run_id, key):
            if m.step not in by_step or m.timestamp >= by_step[m.step][0]:
                by_step[m.step] = (m.timestamp, m.value)
        return [(step, value) for step, (_, value) in sorted(by_step.items())]

    def fill_history(self, runs: Sequence[RunRecord], keep: Any) -> None:
        """Fetch the history of every metric `keep(key)` accepts into `run.history`."""
        for run in runs:
            run.history = {k: self.history(run.run_id, k) for k in sorted(run.metrics) if keep(k)}


def _record(run: Any) -> RunRecord:
    return RunRecord(
        run_id=run.info.run_id,
        name=run.info.run_name or run.info.run_id[:8],
        tags=dict(run.data.tags),
        params=dict(run.data.params),
        metrics={k: float(v) for k, v in run.data.metrics.items()},
        start_time=int(run.info.start_time or 0),
        status=str(run.info.status),
    )


def open_store(uri: str) -> RunStore:
    return RunStore(uri)
