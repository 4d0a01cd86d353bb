"""The trackers: `NullTracker` (non-zero ranks, tracking disabled) and `MlflowTracker` (rank 0: a parent run per
command, a named, tagged run per stage, a job's rank 0 attached to its stage's run, logging through the
outbox), and `make_tracker`, which picks one for this process."""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional

from ..config import Config, flatten
from ..errors import HyperofaError, redact
from ..formats import journal as journal_format
from .delivery import Outbox, replay_journals
from .names import (
    COMMAND_TAG,
    MODEL_DIR_TAG,
    PIPELINE_TAG,
    RESUMED_TAG,
    REUSED_TAG,
    RUN_DIR_TAG,
    SECRET_URI_ENV,
    STAGE_TAG,
    first_line,
    global_rank,
    mlflow_client,
    now_ms,
    param_value,
    pipeline_id,
    tracking_uri_of,
)


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

    def flush(self, timeout: Optional[float] = None) -> bool:
        return True

    def deliver(self) -> bool:
        return True

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
    """Explicit-client MLflow tracker: no global fluent state, so nested stages and tests stay independent.

    `connect=False` (a launched job's rank 0, which only attaches to a run its stage shell opened) does not ask the
    store anything until a run is opened, so a store that is down when the job starts cannot stop it."""

    enabled = True

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        artifact_root: Optional[Path] = None,
        run_dir: Optional[Path] = None,
        log_models: str = "link",
        *,
        retry_seconds: float = 30.0,
        buffer_size: int = 10000,
        flush_seconds: float = 10.0,
        connect: bool = True,
    ):
        if redact(tracking_uri) != tracking_uri:  # MLflow prints run links with the URI's credentials in them
            os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.log_models = log_models
        self.artifact_root = artifact_root
        self.retry_seconds, self.buffer_size, self.flush_seconds = retry_seconds, buffer_size, flush_seconds
        self.client = mlflow_client(tracking_uri)
        self._experiment_id: Optional[str] = None
        self.identity: dict[str, str] = {}
        self.journal_dir: Optional[Path] = None
        if run_dir is not None:
            self.identity = {PIPELINE_TAG: pipeline_id(run_dir), RUN_DIR_TAG: str(Path(run_dir).resolve())}
            self.journal_dir = journal_format.journal_dir(run_dir)
        self.run_id = None
        self.parent_run_id = None
        self._reused: list[str] = []
        self._known_params: dict[str, dict[str, str]] = {}  # run id -> params it already has (continued runs)
        self._outbox: Optional[Outbox] = None
        self._depth = 0  # open scopes: the outermost one's end closes the outbox
        if connect:
            self.experiment_id  # noqa: B018 - reach the store now: an unreachable one stops the command before work

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            try:
                found = self.client.get_experiment_by_name(self.experiment)
                if found is None:
                    root = self.artifact_root
                    location = root.resolve().as_uri() if root is not None else None
                    self._experiment_id = self.client.create_experiment(self.experiment, artifact_location=location)
                else:
                    self._experiment_id = found.experiment_id
            except Exception as exc:  # any transport or store failure means: cannot track, stop before work
                raise HyperofaError(
                    f"MLflow tracking store {self.tracking_uri} is unreachable ({first_line(exc)}); "
                    "start it, fix tracking.tracking_uri, or set tracking.enabled=false"
                ) from None
        return self._experiment_id

    # --- the outbox -----------------------------------------------------------------------------------------

    def _put(self, write: dict[str, Any]) -> dict[str, Any]:
        if self._outbox is None:
            self._outbox = Outbox(self.client, self.journal_dir, self.tracking_uri, retry_seconds=self.retry_seconds,
                                  buffer_size=self.buffer_size, log_models=self.log_models)
        return self._outbox.put(write)

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Wait (at most `timeout`, default `tracking.flush_seconds`) until every buffered write is delivered."""
        if self._outbox is None:
            return True
        return self._outbox.flush(self.flush_seconds if timeout is None else timeout)

    def deliver(self) -> bool:
        """Before reading the store back (compare): this tracker's buffer delivered (at most
        `tracking.flush_seconds`) and the journals of ended processes (a finished job's rank 0) replayed. True when
        nothing known is left undelivered."""
        if not self.flush():
            return False
        self.replay()
        if self.journal_dir is None:
            return True
        own = self._outbox.journal.path if self._outbox is not None and self._outbox.journal is not None else None
        return all(path == own for path in journal_format.journals(self.journal_dir))

    def _close_outbox(self) -> None:
        """The end of this tracker's work: deliver what is buffered within `tracking.flush_seconds` (what is not
        stays in the journal, with a warning), then replay the journals of processes that ended (a job's rank 0)."""
        outbox, self._outbox = self._outbox, None
        delivered = outbox.close(self.flush_seconds) if outbox is not None else True
        if delivered:
            self.replay()

    def replay(self) -> int:
        """Deliver the undelivered writes of every journal in the run directory whose process has ended; stops at
        the first failure (the store is still down: they stay for the next time). Returns the writes delivered."""
        if self.journal_dir is None:
            return 0
        return replay_journals(self.client, self.journal_dir, self.tracking_uri, self.log_models)

    # --- runs -----------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _scope(self, run_id: str, terminate: bool) -> Iterator["MlflowTracker"]:
        previous, self.run_id = self.run_id, run_id
        self._depth += 1
        status = "FAILED"
        try:
            yield self
            status = "FINISHED"
        except BaseException as exc:
            # Ctrl-C, or a termination signal turned into one (runtime/process.py's Interrupted): the run was killed.
            status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
            if not terminate:
                # A rank stopped inside a run its driver owns: the driver may be gone (SIGKILLed, so the rank got
                # SIGTERM from its supervisor), and nobody else would end the run; a live driver ends it again.
                self._put({"op": "terminate", "run": run_id, "status": status, "end_time": now_ms()})
            raise
        finally:
            if terminate:
                self._put({"op": "terminate", "run": run_id, "status": status, "end_time": now_ms()})
            self.run_id = previous
            self._depth -= 1
            if self._depth == 0:
                self._close_outbox()
            elif self._outbox is None or not self._outbox.in_outage:
                # Whoever reads the store next (compare, a test) sees this run complete, the points its job's rank 0
                # could not deliver included (a stage's run ends after its job).
                self.flush()
                self.replay()

    def _create_run(self, name: str, tags: dict[str, str]) -> str:
        """A new run's id: the store must answer, so this retries with back-off for `tracking.flush_seconds`, then
        stops the command in one line (no stage work has started yet)."""
        deadline, delay = time.monotonic() + self.flush_seconds, 0.5
        while True:
            try:
                return self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id
            except HyperofaError:
                raise
            except Exception as exc:
                if time.monotonic() + delay > deadline:
                    raise HyperofaError(
                        f"MLflow tracking store {self.tracking_uri} is unreachable, so run {name!r} could not be "
                        f"opened ({first_line(exc)}); nothing of it has started: start the store and re-run, or set "
                        "tracking.enabled=false"
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, self.retry_seconds)

    @contextlib.contextmanager
    def session(self, command: str, config: Optional[Config] = None) -> Iterator["MlflowTracker"]:
        """The parent run of one command invocation, named after the command."""
        run_id = self._create_run(command, {COMMAND_TAG: command, **self.identity})
        with self._scope(run_id, terminate=True) as tracker:
            if config is not None:
                self.log_params(flatten(config.effective()))
            self.parent_run_id, self._reused = run_id, []
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
            run_id = self._create_run(name, all_tags)
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
        self._put({"op": "status", "run": run_id, "status": "RUNNING"})
        times = int(run.data.tags.get(RESUMED_TAG, "0")) + 1
        self._put({"op": "tags", "run": run_id, "tags": {RESUMED_TAG: str(times), **tags}})
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
        self._put({"op": "tags", "run": self.parent_run_id, "tags": {REUSED_TAG: ", ".join(self._reused)}})

    # --- logging --------------------------------------------------------------------------------------------

    def _require_run(self) -> str:
        if self.run_id is None:
            raise RuntimeError("log call outside a tracker session or stage")
        return self.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        run_id = self._require_run()
        known = self._known_params.get(run_id, {})  # a reopened run keeps the params it has (they are immutable)
        items = {k: param_value(v) for k, v in sorted(params.items()) if k not in known}
        if items:
            self._put({"op": "params", "run": run_id, "params": items})

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        """Never blocks on the store: the points go to the journal and the buffer; the timestamp is taken now, so a
        point delivered late (or replayed) is the same point."""
        run_id = self._require_run()
        now = now_ms()
        items = [
            [k, float(v), now, step or 0]
            for k, v in sorted(metrics.items())
            if v is not None and math.isfinite(float(v))
        ]
        if items:
            self._put({"op": "metrics", "run": run_id, "metrics": items})

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._put({"op": "tags", "run": self._require_run(), "tags": {k: str(v) for k, v in tags.items()}})

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        self._put({"op": "artifact", "run": self._require_run(), "path": str(Path(path).resolve()),
                   "artifact_path": artifact_path})

    def log_artifacts(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        self._put({"op": "artifacts", "run": self._require_run(), "path": str(Path(path).resolve()),
                   "artifact_path": artifact_path})

    def log_model(
        self, model_dir: str | Path, registered_name: str, tags: Optional[dict[str, Any]] = None
    ) -> Optional[str]:
        """The HF directory `model_dir` as this run's `model/` artifact and a new version of `registered_name`
        (source `runs:/<run id>/model`, tagged with `tags`); returns `<name>/<version>`, or None when
        `tracking.log_models=none` or the store did not confirm it within `tracking.flush_seconds` (it is then
        registered when the journal is replayed). `link` (default) hard-links the files into a local artifact store
        on the same filesystem (no second copy on disk) and uploads to any other store; `copy` always copies."""
        run_id = self._require_run()
        model_dir = Path(model_dir).resolve()
        self.set_tags({MODEL_DIR_TAG: model_dir})
        if self.log_models == "none":
            return None
        write = self._put({"op": "model", "run": run_id, "dir": str(model_dir), "name": registered_name,
                           "tags": {k: str(v) for k, v in {**self.identity, **(tags or {})}.items()}})
        if self._outbox is not None and not self._outbox.in_outage:
            self.flush()
        return write.get("result")


def make_tracker(config: Config, rank: Optional[int] = None, *, connect: bool = True) -> NullTracker:
    """The tracker for this process: MLflow on global rank 0 when enabled, otherwise the no-op tracker.

    `connect` (a command's tracker): the store must answer now, and the journals that earlier processes on this run
    directory left undelivered are replayed first. A launched job passes False: it only attaches to its stage's
    run, and must not depend on the store being up when it starts."""
    rank = global_rank() if rank is None else rank
    if not config.tracking.enabled or rank != 0:
        return NullTracker()
    run_dir = config.run_dir
    uri = tracking_uri_of(config)
    if redact(uri) != uri:
        os.environ[SECRET_URI_ENV] = uri  # for the ranks of the jobs this process launches (job.json holds it redacted)
    artifact_root = None
    if uri.startswith("sqlite:///"):  # artifacts beside the database (MLflow's default is ./mlruns in the cwd)
        db = Path(uri[len("sqlite:///") :])
        db.parent.mkdir(parents=True, exist_ok=True)
        artifact_root = db.parent / "mlartifacts"
    t = config.tracking
    tracker = MlflowTracker(uri, t.experiment, artifact_root, run_dir, t.log_models, retry_seconds=t.retry_seconds,
                            buffer_size=t.buffer_size, flush_seconds=t.flush_seconds, connect=connect)
    if connect:
        tracker.replay()
    return tracker
