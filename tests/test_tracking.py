import mlflow
import pytest

from hyperofa_dist.config import load_config
from hyperofa_dist.errors import HyperofaError
from hyperofa_dist.tracking import PARENT_ENV, MlflowTracker, NullTracker, make_tracker


def test_parent_and_child_runs_in_sqlite_store(tmp_path):
    cfg = load_config(None, [f"run.dir={tmp_path}", "tracking.experiment=t1"])
    tracker = make_tracker(cfg, rank=0)
    assert isinstance(tracker, MlflowTracker)
    with tracker.session("prepare", cfg):
        parent = tracker.run_id
        with tracker.stage("prepare", cfg) as stage:
            stage.log_metrics({"lang/qaa_Latn/sentences": 12, "tokens": 340.0})
            child = stage.run_id
    assert tracker.run_id is None
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.tracking.MlflowClient(uri)
    exp = client.get_experiment_by_name("t1")
    found = {r.info.run_id: r for r in client.search_runs([exp.experiment_id])}
    assert set(found) == {parent, child}
    assert found[child].data.tags["mlflow.parentRunId"] == parent
    assert found[child].data.params["prepare.block_size"] == "512"
    assert found[child].data.metrics["lang/qaa_Latn/sentences"] == 12.0
    assert found[child].info.status == "FINISHED"
    assert exp.artifact_location.endswith("mlartifacts")


def test_failed_stage_is_marked_failed(tmp_path):
    cfg = load_config(None, [f"run.dir={tmp_path}"])
    tracker = make_tracker(cfg, rank=0)
    with pytest.raises(RuntimeError):
        with tracker.session("x"):
            with tracker.stage("s"):
                raise RuntimeError("boom")
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    statuses = {r.info.run_name: r.info.status for r in client.search_runs([tracker.experiment_id])}
    assert statuses == {"x": "FAILED", "s": "FAILED"}


def test_launched_job_attaches_to_parent(tmp_path, monkeypatch):
    cfg = load_config(None, [f"run.dir={tmp_path}"])
    outer = make_tracker(cfg, rank=0)
    with outer.session("pipeline"):
        parent = outer.run_id
        monkeypatch.setenv(PARENT_ENV, parent)
        inner = make_tracker(cfg, rank=0)  # what a launched rank-0 process builds
        with inner.session("hypernet"):
            with inner.stage("hypernet") as s:
                child = s.run_id
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([outer.experiment_id])
    assert len(runs) == 2
    assert client.get_run(child).data.tags["mlflow.parentRunId"] == parent


def test_only_rank_zero_and_enabled_track(tmp_path, monkeypatch):
    cfg = load_config(None, [f"run.dir={tmp_path}"])
    assert isinstance(make_tracker(cfg, rank=1), NullTracker)
    assert not make_tracker(cfg, rank=1).enabled
    monkeypatch.setenv("RANK", "3")
    assert not make_tracker(cfg).enabled
    off = load_config(None, [f"run.dir={tmp_path}", "tracking.enabled=false"])
    tracker = make_tracker(off, rank=0)
    with tracker.session("x"), tracker.stage("y") as s:
        s.log_metrics({"a": 1})
    assert not (tmp_path / "mlflow.db").exists()


def test_unreachable_server_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    cfg = load_config(None, [f"run.dir={tmp_path}", "tracking.tracking_uri=http://127.0.0.1:9"])
    with pytest.raises(HyperofaError, match=r"MLflow tracking store http://127.0.0.1:9 is unreachable"):
        make_tracker(cfg, rank=0)
