"""A tracking store that goes away cannot stop the work: the buffer, the journal and the replay (tracking/,
formats/journal.py) against a real sqlite MLflow store behind a client that fails on demand. The real `mlflow server`
killed under a pretraining job is tests/test_tracking_drill.py."""

from __future__ import annotations

import json
import threading
import time

import mlflow
import pytest

from hyperofa_dist.config import load_config
from hyperofa_dist.formats import journal as journal_format
from hyperofa_dist.tracking import OUTAGE_METRIC, make_tracker, replay_journals

WRITES = ("log_batch", "set_terminated", "update_run", "log_artifact", "log_artifacts", "create_model_version")


class FlakyClient:
    """A real MlflowClient whose writes raise while `down`; with `lose_answers`, a write reaches the store and
    then raises anyway (a server killed before its answer got out)."""

    def __init__(self, real):
        self.real, self.down, self.lose_answers, self.attempts = real, False, False, 0
        self.lock = threading.Lock()

    def __getattr__(self, name):
        attr = getattr(self.real, name)
        if name not in WRITES:
            return attr

        def call(*args, **kwargs):
            with self.lock:
                self.attempts += 1
                if self.down:
                    raise ConnectionError("Connection refused")
                result = attr(*args, **kwargs)
                if self.lose_answers:
                    self.lose_answers = False
                    raise ConnectionError("Connection reset by peer")
                return result

        return call


def _tracker(tmp_path, *extra):
    cfg = load_config(None, [f"run.dir={tmp_path}", "tracking.retry_seconds=0.1", "tracking.flush_seconds=5", *extra])
    tracker = make_tracker(cfg, rank=0)
    tracker.client = FlakyClient(tracker.client)
    return cfg, tracker


def _store(tmp_path):
    return mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")


def _steps(client, run_id, key):
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_an_outage_costs_no_step_time_and_loses_and_duplicates_nothing(tmp_path, capsys):
    cfg, tracker = _tracker(tmp_path)
    flaky = tracker.client
    with tracker.session("pretrain"):
        with tracker.stage("pretrain/ofa", cfg) as run:
            run_id = run.run_id
            run.log_metrics({"train/loss": 3.0}, step=1)
            assert tracker.flush(5)
            flaky.down = True
            slowest = 0.0
            for step in range(2, 30):
                start = time.perf_counter()
                run.log_metrics({"train/loss": 3.0 - step / 10, "train/lr": 0.01}, step=step)
                slowest = max(slowest, time.perf_counter() - start)
            time.sleep(0.5)  # a few failed attempts while the steps went on
            assert flaky.attempts >= 2
            flaky.down = False
    assert slowest < 0.05  # a step never waits for the store (a journal line and a queue append)
    client = _store(tmp_path)
    assert _steps(client, run_id, "train/loss") == list(range(1, 30))
    assert _steps(client, run_id, "train/lr") == list(range(2, 30))
    found = client.get_run(run_id)
    assert found.info.status == "FINISHED"
    assert found.data.metrics[OUTAGE_METRIC] >= 2
    assert found.data.params["pretrain.lr"]  # the stage's params, sent after the outage
    err = capsys.readouterr().err
    assert err.count("unreachable (Connection refused); the work goes on") == 1
    assert "answers again after" in err
    assert journal_format.journals(tmp_path / "tracking") == []  # all delivered: no journal left


def test_a_write_whose_answer_was_lost_is_not_sent_twice(tmp_path):
    cfg, tracker = _tracker(tmp_path)
    with tracker.session("pretrain"), tracker.stage("pretrain/ofa") as run:
        run_id = run.run_id
        tracker.client.lose_answers = True  # the first batch reaches the store, its answer does not come back
        for step in range(1, 6):
            run.log_metrics({"train/loss": 1.0 / step}, step=step)
    history = _store(tmp_path).get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5]


def test_writes_past_a_full_buffer_wait_in_the_journal_and_keep_their_order(tmp_path):
    cfg, tracker = _tracker(tmp_path, "tracking.buffer_size=3")
    with tracker.session("pretrain"), tracker.stage("pretrain/ofa") as run:
        run_id = run.run_id
        tracker.client.down = True
        for step in range(1, 41):
            run.log_metrics({"train/loss": float(step)}, step=step)
        outbox = tracker._outbox
        assert len(outbox._queue) <= 3 and outbox._spilled >= 37
        run.set_tags({"last": "tag"})
        tracker.client.down = False
    client = _store(tmp_path)
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(s, float(s)) for s in range(1, 41)]
    assert client.get_run(run_id).data.tags["last"] == "tag"


def test_a_command_ending_during_an_outage_exits_cleanly_and_the_next_one_replays(tmp_path, capsys):
    cfg, tracker = _tracker(tmp_path, "tracking.flush_seconds=0.5")
    with tracker.session("pretrain"), tracker.stage("pretrain/ofa") as run:
        run_id, parent = run.run_id, tracker.parent_run_id
        run.log_metrics({"train/loss": 2.0}, step=1)
        tracker.flush(5)
        tracker.client.down = True
        for step in range(2, 11):
            run.log_metrics({"train/loss": 2.0 / step}, step=step)
    # The session ended without the store: no exception, a warning, the journal left behind.
    assert "tracking writes not delivered, kept in" in capsys.readouterr().err
    time.sleep(0.3)  # the sender thread stops after its current attempt and lets the journal go
    (left,) = journal_format.journals(tmp_path / "tracking")
    pending = journal_format.pending_writes(journal_format.read_records(left))
    assert [w["op"] for w in pending] == ["metrics"] * 9 + ["terminate"] * 2 + ["metrics"] * 2
    assert {w["run"] for w in pending[-2:]} == {run_id, parent}
    assert all(w["metrics"][0][0] == OUTAGE_METRIC and w["metrics"][0][1] >= 1 for w in pending[-2:])
    client = _store(tmp_path)
    assert _steps(client, run_id, "train/loss") == [1]
    assert client.get_run(run_id).info.status == "RUNNING"
    # A torn last line (the process died writing it) is skipped.
    with open(left, "a") as handle:
        handle.write('{"id": 99, "op": "metr')
    again = make_tracker(cfg, rank=0)  # the next command on this run directory replays first
    assert _steps(client, run_id, "train/loss") == list(range(1, 11))
    assert client.get_run(run_id).info.status == "FINISHED" and client.get_run(parent).info.status == "FINISHED"
    assert client.get_run(run_id).data.metrics[OUTAGE_METRIC] >= 1
    assert journal_format.journals(tmp_path / "tracking") == []
    assert replay_journals(again.client, tmp_path / "tracking", "x", "link") == 0


def test_replay_of_a_partly_delivered_journal_adds_only_the_missing_points(tmp_path):
    cfg, tracker = _tracker(tmp_path)
    with tracker.session("x"), tracker.stage("s") as run:
        run_id = run.run_id
    journal = journal_format.Journal.create(tmp_path / "tracking")
    points = [[f"m{k}", float(s), 1000 + s, s] for s in range(5) for k in range(2)]
    for point in points:
        journal.append({"op": "metrics", "run": run_id, "metrics": [point]})
    store = _store(tmp_path)
    from mlflow.entities import Metric

    store.log_batch(run_id, metrics=[Metric(*p) for p in points[:6]])  # delivered, but never acknowledged
    assert journal_format.Journal.claim(journal.path) is None  # its owner holds it: not replayable
    journal.release()  # the owner ends
    assert replay_journals(store, tmp_path / "tracking", "x", "link") == 10
    for key in ("m0", "m1"):
        assert _steps(store, run_id, key) == [0, 1, 2, 3, 4]


def test_killed_scope_ends_as_killed(tmp_path):
    cfg, tracker = _tracker(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        with tracker.session("pretrain"), tracker.stage("pretrain/ofa") as run:
            run_id = run.run_id
            raise KeyboardInterrupt
    assert _store(tmp_path).get_run(run_id).info.status == "KILLED"


def test_journal_lines_are_the_documented_format(tmp_path):
    journal = journal_format.Journal.create(tmp_path)
    first = journal.append({"op": "tags", "run": "r", "tags": {"a": "b"}})
    journal.append({"op": "metrics", "run": "r", "metrics": [["k", 1.0, 5, 2]]})
    journal.ack([first])
    lines = [json.loads(line) for line in journal.path.read_text().splitlines()]
    assert lines == [{"id": 1, "op": "tags", "run": "r", "tags": {"a": "b"}},
                     {"id": 2, "op": "metrics", "run": "r", "metrics": [["k", 1.0, 5, 2]]}, {"ack": [1]}]
    assert [w["id"] for w in journal.pending()] == [2]
    assert journal.close() is False and journal.path.exists()


def test_a_write_the_store_refuses_is_dropped_and_does_not_hold_back_the_rest(tmp_path, capsys):
    cfg, tracker = _tracker(tmp_path)
    with tracker.session("pipeline"):
        parent = tracker.run_id
        with tracker.stage("s") as run:
            doomed = run.run_id
            tracker.flush(5)
            _store(tmp_path).delete_run(doomed)  # someone deletes the run while it is being logged to
            run.log_metrics({"x": 1.0}, step=1)
        tracker.set_tags({"after": "yes"})
    assert _store(tmp_path).get_run(parent).data.tags["after"] == "yes"
    assert "the store refuses a metrics write of run " + doomed in capsys.readouterr().err
    assert journal_format.journals(tmp_path / "tracking") == []


def test_a_journal_for_another_store_is_left_alone(tmp_path, capsys):
    journal = journal_format.Journal.create(tmp_path / "tracking", "http://elsewhere:5000")
    journal.append({"op": "tags", "run": "r", "tags": {"a": "b"}})
    journal.release()
    cfg = load_config(None, [f"run.dir={tmp_path}"])
    make_tracker(cfg, rank=0)
    assert journal_format.journals(tmp_path / "tracking") == [journal.path]
    assert "holds writes for the tracking store http://elsewhere:5000" in capsys.readouterr().err
