"""Delivery of a tracker's writes to the store: the outbox of a live tracker (journalled, buffered, sent in
order by one thread, retried through an outage) and the replay of an ended process's journal; both send
through `apply_writes`, which never duplicates what an earlier, unanswered attempt may have delivered."""

from __future__ import annotations

import os
import sys
import threading
from collections import deque
from pathlib import Path
from typing import Any, Optional

from ..errors import redact
from ..formats import journal as journal_format
from .names import MODEL_ARTIFACT, MODEL_VERSION_TAG, OUTAGE_METRIC, first_line, local_path, now_ms


def warn(text: str) -> None:
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
                warn(f"cannot write a tracking journal in {journal_dir} ({exc}); an outage may lose metrics")
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
                    warn(f"the tracking journal {self.journal.path} cannot be written ({exc}); going on without")
                    self.journal = None
            if self._spilled or len(self._queue) >= self.buffer_size:
                if self.journal is not None and "id" in write:
                    self._spilled += 1
                else:
                    self.dropped += 1
                    if self.dropped == 1:
                        warn(f"tracking buffer full ({self.buffer_size} writes) and no journal: dropping writes")
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
        warn(f"MLflow store {self.uri} still unreachable; {left} tracking writes not delivered, {where}; the next "
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
                    warn(f"the store refuses a {batch[0]['op']} write of run {batch[0]['run']} "
                          f"({first_line(exc)}); dropped")
                    self._done(batch, None)
                    continue
                for write in batch:
                    write["tried"] = True
                self.errors += 1
                self._failing += 1
                if self._failing == 1:
                    self.in_outage = True
                    warn(f"MLflow store {self.uri} unreachable ({first_line(exc)}); the work goes on, tracking "
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
                warn(f"MLflow store {self.uri} answers again after {self._failing} failed attempts; delivering the "
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
        now = now_ms()
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
            warn(f"{path} is gone; not logged as an artifact of run {run_id}")
            return None
        if kind == "artifact":
            client.log_artifact(run_id, str(path), head.get("artifact_path"))
        else:
            client.log_artifacts(run_id, str(path), head.get("artifact_path"))
        return None
    if kind == "model":
        return _log_model(client, head, uncertain, log_models)
    warn(f"unknown tracking write {kind!r} skipped")
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
        warn(f"{model_dir} is gone; not logged as the model of run {run_id}")
        return None
    source = f"runs:/{run_id}/{MODEL_ARTIFACT}"
    local = local_path(client.get_run(run_id).info.artifact_uri)
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
            warn(f"{journal.path} holds writes for the tracking store {journal.store}, not {uri}: not replayed here")
            continue
        seen: dict[tuple[str, str], set] = {}
        try:
            pending = journal.pending()
            if pending:
                warn(f"replaying {len(pending)} undelivered tracking writes from {journal.path}")
            for write in pending:
                try:
                    apply_writes(client, [write], uncertain=True, log_models=log_models, seen=seen)
                    delivered += 1
                except Exception as exc:
                    if not refused(exc):
                        raise
                    warn(f"the store refuses a {write['op']} write of run {write['run']} ({first_line(exc)}); "
                          "dropped")
                journal.ack([write["id"]])
        except Exception as exc:
            warn(f"MLflow store {uri} unreachable during the replay ({first_line(exc)}); {journal.path} is kept "
                  "for the next command")
            journal.close()
            return delivered
        journal.close()
    return delivered


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
