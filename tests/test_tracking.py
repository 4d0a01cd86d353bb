from pathlib import Path

import mlflow
import pytest

from hyperofa_dist.config import load_config
from hyperofa_dist.errors import HyperofaError
from hyperofa_dist.tracking import (
    METHOD_TAG,
    MODEL_DIR_TAG,
    MODEL_VERSION_TAG,
    PIPELINE_TAG,
    RESUMED_TAG,
    REUSED_TAG,
    RUN_DIR_TAG,
    STAGE_TAG,
    STEP_TAG,
    MlflowTracker,
    NullTracker,
    make_tracker,
    pipeline_id,
    registered_model_name,
)


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


def test_launched_job_logs_into_its_stage_run(tmp_path):
    cfg = load_config(None, [f"run.dir={tmp_path}"])
    outer = make_tracker(cfg, rank=0)
    with outer.session("pipeline"):
        with outer.stage("pretrain/ofa", tags={METHOD_TAG: "ofa"}) as stage:
            child = stage.run_id
            job = make_tracker(cfg, rank=0)  # what a launched rank 0 builds; the run id comes from job.json
            with job.attach(child) as run:
                run.log_metrics({"train/loss": 2.5}, step=3)
            assert outer.run_id == child  # attaching changed nothing for the shell, which closes the run
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([outer.experiment_id])
    assert len(runs) == 2
    found = client.get_run(child)
    assert found.info.run_name == "pretrain/ofa" and found.info.status == "FINISHED"
    assert found.data.tags[STAGE_TAG] == "pretrain" and found.data.tags[METHOD_TAG] == "ofa"
    assert found.data.metrics["train/loss"] == 2.5


def test_every_run_carries_the_pipeline_identity_and_reused_stages_go_to_the_parent(tmp_path):
    cfg = load_config(None, [f"run.dir={tmp_path / 'x' / '..' / 'run'}"])
    tracker = make_tracker(cfg, rank=0)
    with tracker.session("pipeline"):
        parent = tracker.run_id
        with tracker.stage("init/ofa"):
            pass
        tracker.reused("tokenizer")
        tracker.reused("prepare")
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    runs = client.search_runs([tracker.experiment_id])
    assert {r.data.tags[PIPELINE_TAG] for r in runs} == {pipeline_id(tmp_path / "run")}
    assert {r.data.tags[RUN_DIR_TAG] for r in runs} == {str((tmp_path / "run").resolve())}
    assert len(pipeline_id(tmp_path / "run")) == 12
    assert client.get_run(parent).data.tags[REUSED_TAG] == "tokenizer, prepare"
    assert client.get_run(parent).info.run_name == "pipeline"


def test_a_resumed_stage_continues_the_interrupted_run(tmp_path):
    cfg = load_config(None, [f"run.dir={tmp_path}"])
    tracker = make_tracker(cfg, rank=0)
    with pytest.raises(RuntimeError):
        with tracker.session("pipeline"), tracker.stage("hypernet", cfg) as run:
            first = run.run_id
            run.log_metrics({"val_loss": 1.0}, step=0)
            raise RuntimeError("killed")
    resumed = cfg.with_changes({"hypernet.resume": True})
    with tracker.session("pipeline"), tracker.stage("hypernet", resumed, resume_run_id=first) as run:
        assert run.run_id == first
        run.log_metrics({"val_loss": 0.5}, step=1)
    with tracker.session("pipeline"), tracker.stage("hypernet", resume_run_id="0" * 32) as run:
        assert run.run_id != first  # not in the store: a fresh run
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    found = client.get_run(first)
    assert found.info.status == "FINISHED" and found.data.tags[RESUMED_TAG] == "1"
    assert found.data.params["hypernet.resume"] == "False"  # params are immutable: the first value stays
    assert [m.step for m in client.get_metric_history(first, "val_loss")] == [0, 1]


@pytest.mark.parametrize("mode", ["link", "copy", "none"])
def test_log_model_artifacts_and_registered_version(tmp_path, mode):
    from transformers import AutoModelForMaskedLM, BertConfig, BertForMaskedLM

    model_dir = tmp_path / "run" / "pretrain" / "ofa" / "model"
    BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=16)).save_pretrained(model_dir)
    cfg = load_config(None, [f"run.dir={tmp_path / 'run'}", f"tracking.log_models={mode}", "tracking.experiment=e"])
    tracker = make_tracker(cfg, rank=0)
    with tracker.session("pretrain"), tracker.stage("pretrain/ofa") as run:
        ref = run.log_model(model_dir, registered_model_name("e", "ofa"), {STEP_TAG: 60})
        run_id = run.run_id
    uri = f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}"
    client = mlflow.tracking.MlflowClient(uri, registry_uri=uri)
    tags = client.get_run(run_id).data.tags
    assert tags[MODEL_DIR_TAG] == str(model_dir.resolve())
    if mode == "none":
        assert ref is None and client.list_artifacts(run_id) == []
        return
    assert ref == "e-ofa/1" and tags[MODEL_VERSION_TAG] == ref
    version = client.get_model_version("e-ofa", "1")
    assert version.run_id == run_id and version.source == f"runs:/{run_id}/model" and version.tags[STEP_TAG] == "60"
    artifacts = client.get_run(run_id).info.artifact_uri
    assert artifacts.startswith(f"file://{tmp_path / 'run' / 'mlartifacts'}")
    stored = Path(artifacts[len("file://"):]) / "model"
    weights = next(p.name for p in model_dir.iterdir() if p.suffix == ".safetensors")
    same_file = (stored / weights).stat().st_ino == (model_dir / weights).stat().st_ino
    assert same_file == (mode == "link")  # link: no second copy of the weights on disk
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="model", tracking_uri=uri,
                                                dst_path=str(tmp_path / "dl"))
    assert AutoModelForMaskedLM.from_pretrained(local).config.vocab_size == 50


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
