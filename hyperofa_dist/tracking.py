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

Tracking cannot kill training (docs/MLFLOW.md, "Outages"): every write (metrics, params, tags, a run's end,
artifacts, models) is appended to this process's journal (formats/journal.py, `<run_dir>/tracking/`) and queued in
a bounded in-memory buffer (`tracking.buffer_size`; beyond it writes wait in the journal only) that one background
thread sends in order, retrying with exponential back-off up to `tracking.retry_seconds`. A write that failed once
may have reached the store, so its retry first reads back what the store has and sends only the rest: replay never
duplicates a metric point. An outage is one warning line and a count (`tracking.outage_errors`, logged when the
store answers again). Ending a scope waits at most `tracking.flush_seconds` for the buffer; what is left stays in the
journal, and the next tracker on the run directory (the next command, or the command that launched a job) replays
journals whose processes have ended. Only opening a run needs the store to answer (it makes the run id).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from .config import Config, flatten
from .errors import HyperofaError, is_redacted, redact
from .formats import journal as journal_format

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
OUTAGE_METRIC = "tracking.outage_errors"  # failed attempts to reach the store, logged once it answers again


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
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
        if redact(tracking_uri) != tracking_uri:  # MLflow prints run links with the URI's credentials in them
            os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.log_models = log_models
        self.artifact_root = artifact_root
        self.retry_seconds, self.buffer_size, self.flush_seconds = retry_seconds, buffer_size, flush_seconds
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
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
                    f"MLflow tracking store {self.tracking_uri} is unreachable ({_first_line(exc)}); "
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
                self._put({"op": "terminate", "run": run_id, "status": status, "end_time": _now_ms()})
            raise
        finally:
            if terminate:
                self._put({"op": "terminate", "run": run_id, "status": status, "end_time": _now_ms()})
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
                        f"opened ({_first_line(exc)}); nothing of it has started: start the store and re-run, or set "
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
        items = {k: _param_value(v) for k, v in sorted(params.items()) if k not in known}
        if items:
            self._put({"op": "params", "run": run_id, "params": items})

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        """Never blocks on the store: the points go to the journal and the buffer; the timestamp is taken now, so a
        point delivered late (or replayed) is the same point."""
        run_id = self._require_run()
        now = _now_ms()
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


def _now_ms() -> int:
    return int(time.time() * 1000)


# --- delivery: the outbox of a live tracker, the replay of a dead one's journal ----------------------------------


def _warn(text: str) -> None:
    print(f"hyperofa tracking: {redact(text)}", file=sys.stderr, flush=True)


class Outbox:
    """A tracker's writes between the caller and the store: journalled, buffered (bounded), sent in order by one
    background thread. A thread rather than a send inside each call: a store that hangs (not refusing, just not
    answering) would hold the calling training step for a whole HTTP timeout, and every call during an outage
    would pay one; the thread pays them while the steps go on, and the buffer bounds the memory it may hold."""

    def __init__(self, client: Any, journal_dir: Optional[Path], uri: str, *, retry_seconds: float,
                 buffer_size: int, log_models: str):
        self.client, self.uri, self.log_models = client, uri, log_models
        self.retry_seconds, self.buffer_size = retry_seconds, buffer_size
        self.journal: Optional[journal_format.Journal] = None
        if journal_dir is not None:
            try:
                self.journal = journal_format.Journal.create(journal_dir, redact(uri))
            except OSError as exc:
                _warn(f"cannot write a tracking journal in {journal_dir} ({exc}); an outage may lose metrics")
        self._queue: deque[dict[str, Any]] = deque()
        self._cond = threading.Condition()
        self._spilled = 0  # writes only in the journal (the buffer was full), read back from it when it drains
        self._busy = False
        self._closing = False
        self._thread: Optional[threading.Thread] = None
        self.errors = 0  # failed attempts, every outage of this process
        self.dropped = 0  # writes lost: buffer full and no journal to keep them
        self._failing = 0  # failed attempts of the current outage
        self.in_outage = False

    def put(self, write: dict[str, Any]) -> dict[str, Any]:
        write = dict(write)
        with self._cond:  # journal order = send order, also when writes spill past the buffer
            if self.journal is not None:
                try:
                    write["id"] = self.journal.append(write)
                except (OSError, ValueError) as exc:
                    _warn(f"the tracking journal {self.journal.path} cannot be written ({exc}); going on without")
                    self.journal = None
            if self._spilled or len(self._queue) >= self.buffer_size:
                if self.journal is not None and "id" in write:
                    self._spilled += 1
                else:
                    self.dropped += 1
                    if self.dropped == 1:
                        _warn(f"tracking buffer full ({self.buffer_size} writes) and no journal: dropping writes")
            else:
                self._queue.append(write)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="hyperofa-tracking", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        return write

    def _idle(self) -> bool:
        return not self._queue and not self._spilled and not self._busy

    def flush(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(self._idle, timeout=max(timeout, 0.0))

    def close(self, timeout: float) -> bool:
        """Deliver what is buffered within `timeout`; True when everything was. Otherwise the rest stays in the
        journal (one warning, and the outage count goes there too) and the thread stops after its current attempt,
        letting the journal go for a later replay."""
        delivered = self.flush(timeout)
        with self._cond:
            if not delivered and self.errors:  # the count travels with the writes it is about, to their runs
                undelivered = self.journal.pending() if self.journal is not None else list(self._queue)
                self._count_outage([w["run"] for w in undelivered])
            left = len(self._queue) + self._spilled
            self._closing = True
            self._cond.notify_all()
        if delivered:
            if self._thread is not None:
                self._thread.join(timeout=5)
            if self.journal is not None:
                self.journal.close()
            return True
        where = f"kept in {self.journal.path}" if self.journal is not None else "lost (no journal)"
        _warn(f"MLflow store {self.uri} still unreachable; {left} tracking writes not delivered, {where}; the next "
              "hyperofa command on this run directory replays them")
        return False

    def _take(self) -> list[dict[str, Any]]:
        """The head of the buffer to send as one request: consecutive metric writes of one run (up to 1000
        points), or one other write."""
        head = self._queue[0]
        if head["op"] != "metrics":
            return [head]
        batch, points = [], 0
        for write in self._queue:
            if write["op"] != "metrics" or write["run"] != head["run"] or points + len(write["metrics"]) > 1000:
                break
            batch.append(write)
            points += len(write["metrics"])
        return batch or [head]

    def _refill(self) -> None:
        pending = self.journal.pending() if self.journal is not None else []
        self._queue.extend(pending[: self.buffer_size])
        self._spilled = max(len(pending) - self.buffer_size, 0)

    def _run(self) -> None:
        delay = 0.0
        while True:
            with self._cond:
                while not self._queue and not self._spilled and not self._closing:
                    self._cond.wait()
                if not self._queue and self._spilled:
                    self._refill()
                if not self._queue:
                    self._release()
                    return
                batch = self._take()
                self._busy = True
            uncertain = any(w.get("tried") for w in batch)
            try:
                result = apply_writes(self.client, batch, uncertain=uncertain, log_models=self.log_models)
            except Exception as exc:
                if refused(exc):
                    _warn(f"the store refuses a {batch[0]['op']} write of run {batch[0]['run']} "
                          f"({_first_line(exc)}); dropped")
                    self._done(batch, None)
                    continue
                for write in batch:
                    write["tried"] = True
                self.errors += 1
                self._failing += 1
                if self._failing == 1:
                    self.in_outage = True
                    _warn(f"MLflow store {self.uri} unreachable ({_first_line(exc)}); the work goes on, tracking "
                          f"writes are kept in {self.journal.path if self.journal else 'memory'} and retried")
                delay = min(max(delay * 2, 1.0), self.retry_seconds)
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
                    if not self._closing:
                        self._cond.wait(timeout=delay)  # close() wakes it, to stop
                    if self._closing:
                        self._release()
                        return
                continue
            self._done(batch, result)
            delay = 0.0

    def _done(self, batch: list[dict[str, Any]], result: Any) -> None:
        """`batch` is settled (delivered, or refused for good): acknowledged and off the queue."""
        batch[-1]["result"] = result
        if self.journal is not None:
            try:
                self.journal.ack([w["id"] for w in batch if "id" in w])
            except (OSError, ValueError):
                pass  # an unwritable journal only means a later replay checks these points again
        with self._cond:
            held = len(self._queue) + self._spilled
            for _ in batch:
                self._queue.popleft()
            if self._failing:  # any answer, even a refusal, means the store is back
                _warn(f"MLflow store {self.uri} answers again after {self._failing} failed attempts; delivering the "
                      f"{held} writes held back")
                self._failing, self.in_outage = 0, False
                # The count goes to every run the outage held writes of, after everything buffered.
                self._count_outage([w["run"] for w in (*batch, *self._queue)])
            self._busy = False  # set again by the loop before its next send
            self._cond.notify_all()

    def _release(self) -> None:
        if self.journal is not None:
            self.journal.close()  # deleted when everything in it was delivered

    def _count_outage(self, runs: list[str]) -> None:
        now = _now_ms()
        for run_id in dict.fromkeys(runs):
            self._put_locked({"op": "metrics", "run": run_id, "metrics": [[OUTAGE_METRIC, float(self.errors), now, 0]]})

    def _put_locked(self, write: dict[str, Any]) -> None:
        if self.journal is not None:
            try:
                write["id"] = self.journal.append(write)
            except (OSError, ValueError):
                pass
        if self._spilled and "id" in write:
            self._spilled += 1
        else:
            self._queue.append(write)


def apply_writes(client: Any, writes: list[dict[str, Any]], *, uncertain: bool, log_models: str,
                 seen: Optional[dict[tuple[str, str], set]] = None) -> Any:
    """Send `writes` (one request's worth, all of one kind and run) to the store. `uncertain`: they may have
    reached it already (an earlier attempt failed without an answer, or a replay), so each kind is sent in a way
    that cannot duplicate: metric points the store has are left out (`seen` caches what the store holds per
    (run, key)), a model version of this run and source is not made twice; tags, params, ends and artifacts are
    idempotent as they are. Returns what the last write produced (a model's `<name>/<version>`)."""
    from mlflow.entities import Metric, Param, RunTag

    head = writes[0]
    kind, run_id = head["op"], head["run"]
    if kind == "metrics":
        points = [tuple(p) for w in writes for p in w["metrics"]]
        if uncertain:
            points = _not_in_store(client, run_id, points, seen if seen is not None else {})
        items = [Metric(k, float(v), int(ts), int(step)) for k, v, ts, step in points]
        for start in range(0, len(items), 1000):
            client.log_batch(run_id, metrics=items[start : start + 1000])
        if seen is not None:
            for k, v, ts, step in points:
                seen.setdefault((run_id, k), set()).add((int(step), int(ts), float(v)))
        return None
    if kind == "params":
        params = dict(head["params"])
        if uncertain:
            have = client.get_run(run_id).data.params
            params = {k: v for k, v in params.items() if k not in have}
        items = [Param(k, v) for k, v in params.items()]
        for start in range(0, len(items), 100):
            client.log_batch(run_id, params=items[start : start + 100])
        return None
    if kind == "tags":
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in head["tags"].items()])
        return None
    if kind == "terminate":
        client.set_terminated(run_id, status=head["status"], end_time=head.get("end_time"))
        return None
    if kind == "status":
        client.update_run(run_id, status=head["status"])
        return None
    if kind in ("artifact", "artifacts"):
        path = Path(head["path"])
        if not path.exists():
            _warn(f"{path} is gone; not logged as an artifact of run {run_id}")
            return None
        if kind == "artifact":
            client.log_artifact(run_id, str(path), head.get("artifact_path"))
        else:
            client.log_artifacts(run_id, str(path), head.get("artifact_path"))
        return None
    if kind == "model":
        return _log_model(client, head, uncertain, log_models)
    _warn(f"unknown tracking write {kind!r} skipped")
    return None


def _not_in_store(client: Any, run_id: str, points: list[tuple], seen: dict[tuple[str, str], set]) -> list[tuple]:
    for key in sorted({p[0] for p in points}):
        if (run_id, key) not in seen:
            seen[(run_id, key)] = {
                (int(m.step), int(m.timestamp), float(m.value)) for m in client.get_metric_history(run_id, key)
            }
    return [p for p in points if (int(p[3]), int(p[2]), float(p[1])) not in seen[(run_id, p[0])]]


def _log_model(client: Any, write: dict[str, Any], uncertain: bool, log_models: str) -> Optional[str]:
    from mlflow.exceptions import MlflowException

    run_id, name = write["run"], write["name"]
    model_dir = Path(write["dir"])
    if not model_dir.is_dir():
        _warn(f"{model_dir} is gone; not logged as the model of run {run_id}")
        return None
    source = f"runs:/{run_id}/{MODEL_ARTIFACT}"
    local = _local_path(client.get_run(run_id).info.artifact_uri)
    linked = False
    if log_models == "link" and local is not None:
        linked = link_tree(model_dir, local / MODEL_ARTIFACT)
    if not linked:
        client.log_artifacts(run_id, str(model_dir), MODEL_ARTIFACT)
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = None
    if uncertain:  # an earlier attempt may have made the version before the store went away
        made = [v for v in client.search_model_versions(f"name='{name}'") if v.run_id == run_id and v.source == source]
        version = made[0].version if made else None
    if version is None:
        version = client.create_model_version(
            name, source, run_id=run_id, tags=write.get("tags") or {},
            description=f"{model_dir} (stock HF directory: AutoModelForMaskedLM.from_pretrained)",
        ).version
    ref = f"{name}/{version}"
    client.set_tag(run_id, MODEL_VERSION_TAG, ref)
    return ref


# What the store answers to a write it will never accept (a run deleted since, a param logged with another value):
# retrying cannot help, and a write stuck at the head of the queue would hold back every write behind it.
REFUSED = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "INVALID_STATE", "BAD_REQUEST")


def refused(exc: BaseException) -> bool:
    return getattr(exc, "error_code", None) in REFUSED


def replay_journals(client: Any, directory: Path, uri: str, log_models: str) -> int:
    """Deliver every undelivered write of the journals in `directory` whose processes have ended and whose store is
    `uri`, in order; the first failure to reach the store stops the replay (what is left stays), a write the store
    refuses is dropped with a warning. Returns the writes delivered."""
    delivered = 0
    for journal in journal_format.claimable(directory):
        if journal.store is not None and journal.store != redact(uri):
            _warn(f"{journal.path} holds writes for the tracking store {journal.store}, not {uri}: not replayed here")
            continue
        seen: dict[tuple[str, str], set] = {}
        try:
            pending = journal.pending()
            if pending:
                _warn(f"replaying {len(pending)} undelivered tracking writes from {journal.path}")
            for write in pending:
                try:
                    apply_writes(client, [write], uncertain=True, log_models=log_models, seen=seen)
                    delivered += 1
                except Exception as exc:
                    if not refused(exc):
                        raise
                    _warn(f"the store refuses a {write['op']} write of run {write['run']} ({_first_line(exc)}); "
                          "dropped")
                journal.ack([write["id"]])
        except Exception as exc:
            _warn(f"MLflow store {uri} unreachable during the replay ({_first_line(exc)}); {journal.path} is kept "
                  "for the next command")
            journal.close()
            return delivered
        journal.close()
    return delivered


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


# A job's ranks read the tracking URI from here when the job file holds it redacted (credentials are never written
# into the run directory); pdsh and ssh launchers forward MLFLOW_* variables to remote ranks.
SECRET_URI_ENV = "MLFLOW_TRACKING_URI"


def tracking_uri_of(config: Config) -> str:
    """The tracking URI to connect to. A configured URI with credentials is the real one (this process read it
    from the user); one whose credentials were redacted (a job file) is completed from SECRET_URI_ENV."""
    uri = config.tracking.tracking_uri or default_tracking_uri(config.run_dir)
    if not is_redacted(uri):
        return uri
    real = os.environ.get(SECRET_URI_ENV)
    if real is None or redact(real) != uri:
        raise HyperofaError(
            f"tracking.tracking_uri {uri}: its credentials are redacted here and {SECRET_URI_ENV} does not hold the "
            "real URI; the command that launched this job sets it, so launch through hyperofa or set it yourself"
        )
    return real


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
