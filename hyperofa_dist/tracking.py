"""MLflow tracking: one parent run per command invocation, one child run per stage, rank 0 only.

Only global rank 0 (env `RANK`, unset means 0) talks to MLflow; every other rank, and every process when
tracking is disabled, gets the `NullTracker`, whose methods do nothing. A distributed job launched by a
command receives the parent run id in `HYPEROFA_PARENT_RUN_ID` and attaches its stage run there instead of
opening a second parent. The embedded default store is `sqlite:///<run_dir>/mlflow.db`; a real
`mlflow server` is used by setting `tracking.tracking_uri`.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path
from typing import Any, Iterator, Optional

from .config import Config, flatten
from .errors import HyperofaError

PARENT_ENV = "HYPEROFA_PARENT_RUN_ID"


def global_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def default_tracking_uri(run_dir: Path) -> str:
    return f"sqlite:///{(Path(run_dir) / 'mlflow.db').resolve()}"


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
    def stage(self, name: str, config: Optional[Config] = None) -> Iterator["NullTracker"]:
        yield self

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


class MlflowTracker(NullTracker):
    """Explicit-client MLflow tracker: no global fluent state, so nested stages and tests stay independent."""

    enabled = True

    def __init__(self, tracking_uri: str, experiment: str, artifact_root: Optional[Path] = None):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        try:
            found = self.client.get_experiment_by_name(experiment)
            if found is None:
                location = artifact_root.resolve().as_uri() if artifact_root is not None else None
                self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
            else:
                self.experiment_id = found.experiment_id
        except Exception as exc:  # any transport or store failure means: cannot track, stop before work
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
            raise HyperofaError(
                f"MLflow tracking store {tracking_uri} is unreachable ({first[:200]}); "
                "start it, fix tracking.tracking_uri, or set tracking.enabled=false"
            ) from None
        self.run_id = None
        self.parent_run_id = os.environ.get(PARENT_ENV) or None

    def _start(self, name: str, parent: Optional[str], tags: dict[str, Any]) -> str:
        if parent:
            tags = {**tags, "mlflow.parentRunId": parent}
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        return run.info.run_id

    @contextlib.contextmanager
    def _run(self, name: str, parent: Optional[str], tags: dict[str, Any], config: Optional[Config]):
        run_id = self._start(name, parent, tags)
        previous, self.run_id = self.run_id, run_id
        if config is not None:
            self.log_params(flatten(config.effective()))
        status = "FAILED"
        try:
            yield self
            status = "FINISHED"
        finally:
            self.client.set_terminated(run_id, status=status)
            self.run_id = previous

    @contextlib.contextmanager
    def session(self, command: str, config: Optional[Config] = None) -> Iterator["MlflowTracker"]:
        """The parent run of one command invocation (or the one a launcher handed us through the env)."""
        if self.parent_run_id:
            yield self
            return
        with self._run(command, None, {"hyperofa.command": command}, config) as tracker:
            self.parent_run_id = self.run_id
            os.environ[PARENT_ENV] = self.parent_run_id
            try:
                yield tracker
            finally:
                os.environ.pop(PARENT_ENV, None)
                self.parent_run_id = None

    @contextlib.contextmanager
    def stage(self, name: str, config: Optional[Config] = None) -> Iterator["MlflowTracker"]:
        with self._run(name, self.parent_run_id, {"hyperofa.stage": name}, config) as tracker:
            yield tracker

    def _require_run(self) -> str:
        if self.run_id is None:
            raise RuntimeError("log call outside a tracker session or stage")
        return self.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        run_id = self._require_run()
        items = [Param(k, _param_value(v)) for k, v in sorted(params.items())]
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


def numeric_metrics(tree: dict[str, Any]) -> dict[str, float]:
    """The numeric leaves of nested statistics as MLflow metrics (`source.length_percentiles.50`); booleans 0/1."""
    import numbers

    return {
        key: float(value)
        for key, value in flatten(tree).items()
        if isinstance(value, numbers.Number) and not isinstance(value, complex)
    }


def _param_value(value: Any) -> str:
    text = "null" if value is None else str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


def make_tracker(config: Config, rank: Optional[int] = None) -> NullTracker:
    """The tracker for this process: MLflow on global rank 0 when enabled, otherwise the no-op tracker."""
    rank = global_rank() if rank is None else rank
    if not config.tracking.enabled or rank != 0:
        return NullTracker()
    run_dir = config.run_dir
    uri = config.tracking.tracking_uri or default_tracking_uri(run_dir)
    artifact_root = None
    if uri.startswith("sqlite:") and not config.tracking.tracking_uri:
        run_dir.mkdir(parents=True, exist_ok=True)
        artifact_root = run_dir / "mlartifacts"
    return MlflowTracker(uri, config.tracking.experiment, artifact_root)
