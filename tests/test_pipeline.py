"""The pipeline end to end: a real `mlflow server`, a SIGKILLed DeepSpeed rank, an unreachable tracking server.

One small generated world (hyperofa_dist.synthetic.demo) is shared by the module; the pipeline runs use the same run
directory: the first (random and ofa, into a real server) is run twice to check that a re-run adds only its parent
run; the killed-rank test then finds tokenizer, prepare, vectors, mapping and init/ofa up to date and retrains ofa.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from hyperofa_dist.synthetic.demo import WorldSpec, build_world
from hyperofa_dist.config import DEMO_CONFIG

pytestmark = pytest.mark.slow

SMALL = [
    "tokenizer.new_tokens=600",
    "tokenizer.sentences_per_language=1500",
    "vectors.train.epochs=5",
    "pretrain.micro_batch_size=4",
    "pretrain.eval_blocks=4",
    "pretrain.log_every=2",
    "evaluate.mlm_blocks=8",
    "evaluate.max_sentences=40",
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pipeline_run")
    spec = WorldSpec(seed=0, n_concepts=200, source_sentences=1500, target_sentences=600, retrieval_pairs=40,
                     source_vocab=500, pretrain_steps=10)
    paths = build_world(run_dir, spec)
    return run_dir, paths


def pipeline_cmd(run_dir: Path, paths, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "hyperofa_dist.cli", "pipeline", "--config", str(DEMO_CONFIG),
        f"run.dir={run_dir}", f"source.model={paths.source_model}", f"corpus.path={paths.corpus}",
        f"evaluate.data_dir={paths.eval_data}", *SMALL, *extra,
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{base}/health", timeout=2)
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("mlflow server exited during start-up")
            time.sleep(0.5)
    else:
        raise RuntimeError("mlflow server did not answer /health within 120 s")
    yield base
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


METHODS = ("random", "ofa")
STEPS = 4


def experiment_runs(client, name: str) -> list:
    experiment = client.get_experiment_by_name(name)
    return client.search_runs([experiment.experiment_id], max_results=1000)


def test_pipeline_against_a_real_mlflow_server(world, mlflow_server, tmp_path):
    """Two methods through the whole pipeline into a real server, then the same pipeline again. Checked through the
    MLflow client: run names and tags, one pretraining run per method, the compare data, the logged models, and
    that the re-run adds exactly one run (its parent, naming the reused stages)."""
    import mlflow
    from mlflow.tracking import MlflowClient
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from hyperofa_dist.compare import core
    from hyperofa_dist.compare.stage import load_runs
    from hyperofa_dist.tracking import open_store, pipeline_id

    run_dir, paths = world
    cmd = pipeline_cmd(run_dir, paths, f"tracking.tracking_uri={mlflow_server}", "tracking.experiment=drill",
                       f"pipeline.methods=[{','.join(METHODS)}]", f"pretrain.steps={STEPS}", "pretrain.save_every=2",
                       "pretrain.eval_every=2")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| random |" in out.stdout and "| ofa |" in out.stdout and "MLflow store:   http://127.0.0.1" in out.stdout
    assert "[INFO]" not in out.stdout and "[INFO]" in out.stderr  # DeepSpeed's rank logs stay off stdout

    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)
    runs = experiment_runs(client, "drill")
    by_name = {}
    for run in runs:
        by_name.setdefault(run.info.run_name, []).append(run)
    expected = {"pipeline", "tokenizer", "prepare", "vectors", "mapping", "compare"}
    for m in METHODS:
        expected |= {f"init/{m}", f"evaluate/{m}@0", f"pretrain/{m}", f"evaluate/{m}@{STEPS}"}
    assert sorted(by_name) == sorted(expected) and all(len(v) == 1 for v in by_name.values()), sorted(by_name)
    (parent,) = by_name["pipeline"]
    assert parent.data.tags["hyperofa.command"] == "pipeline"
    assert {r.data.tags["hyperofa.pipeline"] for r in runs} == {pipeline_id(run_dir)}
    for name, (run,) in by_name.items():
        tags = run.data.tags
        if name != "pipeline":
            assert tags["mlflow.parentRunId"] == parent.info.run_id and tags["hyperofa.stage"] == name.split("/")[0]
        if "/" in name:  # the method named in the run name is its init.method tag
            assert tags["init.method"] == name.split("/")[1].split("@")[0], name
        if name.startswith("evaluate/"):
            assert tags["hyperofa.step"] == name.split("@")[1]
    prepare_run = by_name["prepare"][0]
    assert any(k.startswith("total/") for k in prepare_run.data.metrics)
    assert any(k.startswith("srt") for k in by_name[f"evaluate/ofa@{STEPS}"][0].data.metrics)

    # Exactly one pretraining run per method, holding the job's curves (rank 0 logged into it).
    pretraining = [r for r in runs if r.data.tags.get("hyperofa.stage") == "pretrain"]
    assert sorted(r.data.tags["init.method"] for r in pretraining) == sorted(METHODS)
    history = {r.data.tags["init.method"]: client.get_metric_history(r.info.run_id, "train/loss") for r in pretraining}
    assert all(len(h) == STEPS // 2 for h in history.values())  # log_every=2
    assert all(len(client.get_metric_history(r.info.run_id, "eval/loss")) == 3 for r in pretraining)  # 0, 2, 4

    # The compare core on the server's runs: one training-loss series per method with the logged points; the
    # table written by the pipeline has one row per (method, evaluated step).
    kept, _ = load_runs(open_store(mlflow_server), ["train/loss", "eval/loss", "*average*"], "drill")
    result = core.compare(kept, ["train/loss", "eval/loss", "*average*"])
    _, drawn = core.render(result.figures["training_loss.png"], core.styles(result.series))
    assert sorted(drawn) == sorted(METHODS)
    for method, (steps, values) in drawn.items():
        assert steps == [float(m.step) for m in sorted(history[method], key=lambda m: m.step)]
        assert values == [m.value for m in sorted(history[method], key=lambda m: m.step)]
    evaluated = {(r.data.tags["init.method"], int(r.data.tags["hyperofa.step"]))
                 for r in runs if r.data.tags.get("hyperofa.stage") == "evaluate"}
    evaluated |= {(m, s) for m in METHODS for s in (0, 2, 4)}  # the pretraining job's held-out evaluations
    table = (run_dir / "compare" / "drill" / "table.csv").read_text().splitlines()
    rows = [line.split(",") for line in table[1:]]
    assert table[0].startswith("method,pipeline,step,train/loss,eval/loss,")
    assert sorted((r[0], int(r[2])) for r in rows) == sorted(evaluated)
    listed = [a.path for a in client.list_artifacts(by_name["compare"][0].info.run_id, "compare")]
    assert "compare/training_loss.png" in listed and "compare/eval_loss.png" in listed

    # Each method's exported model: the pretraining run's `model/` artifact and a registered version, loaded with
    # the stock class from what MLflow hands back.
    for run in pretraining:
        method = run.data.tags["init.method"]
        name, version = run.data.tags["hyperofa.model_version"].split("/")
        assert name == f"drill-{method}"
        registered = client.get_model_version(name, version)
        assert registered.run_id == run.info.run_id and registered.tags["hyperofa.step"] == str(STEPS)
        local = mlflow.artifacts.download_artifacts(client.get_model_version_download_uri(name, version),
                                                    dst_path=str(tmp_path / method), tracking_uri=mlflow_server)
        model = AutoModelForMaskedLM.from_pretrained(local)
        assert len(AutoTokenizer.from_pretrained(local)) <= model.config.vocab_size
        assert (Path(local) / "README.md").read_bytes() == (run_dir / "pretrain" / method / "model" / "README.md"
                                                            ).read_bytes()  # the model card travels with the model
    check_pretrain_cards(run_dir)

    # The same pipeline again on the finished run directory: everything is up to date, one new run (the parent).
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    after = experiment_runs(client, "drill")
    new = [r for r in after if r.info.run_id not in {x.info.run_id for x in runs}]
    assert len(new) == 1 and new[0].info.run_name == "pipeline", [r.info.run_name for r in new]
    reused = new[0].data.tags["hyperofa.reused"].split(", ")
    assert sorted(reused) == sorted(expected - {"pipeline"})


def check_pretrain_cards(run_dir: Path) -> None:
    """Each pretrained model's card: its method and steps, the sizes its init stage recorded, the last held-out loss
    of the job's evaluation log."""
    from hyperofa_dist.formats.rundir import Stage
    from tests.test_exports import check_card

    for method in METHODS:
        stage_dir = run_dir / "pretrain" / method
        last = json.loads((stage_dir / "eval_log.jsonl").read_text().splitlines()[-1])
        counts = Stage(run_dir, f"init/{method}").require()["counts"]
        check_card(stage_dir / "model", method=method, stage="pretrain", steps=STEPS, kind="masked",
                   source_vocab=counts["V_s"], target_vocab=counts["V_t"], metric=f"held-out loss, step {last['step']}",
                   values=last["loss"])


def _rank_pids(stage_dir: Path) -> list[int]:
    """The ranks of this test's own job (its job file's path is unique), not their supervisors
    (`-m hyperofa_dist.runtime.rank ... --target <module>`): never a process of anyone else."""
    pattern = f"-m hyperofa_dist[.]pretrain[.]train .*--job {stage_dir}/job[.]json"
    out = subprocess.run(["pgrep", "-f", "--", pattern], capture_output=True, text=True)
    return [int(x) for x in out.stdout.split()]


def test_killed_rank_then_pipeline_again_resumes_and_completes(world):
    run_dir, paths = world
    extra = ("tracking.enabled=false", "pipeline.methods=[ofa]", "pipeline.compare=false",
             "pretrain.steps=40", "pretrain.save_every=5", "pretrain.eval_every=40")
    stage_dir = run_dir / "pretrain" / "ofa"
    shutil.rmtree(stage_dir, ignore_errors=True)  # the server test trained ofa for 4 steps; start this one afresh
    proc = subprocess.Popen(pipeline_cmd(run_dir, paths, *extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.time() + 900
    killed = False
    while time.time() < deadline and proc.poll() is None:
        if (stage_dir / "checkpoints" / "latest").is_file():
            for pid in _rank_pids(stage_dir)[-1:]:  # one rank, as a node failure would
                os.kill(pid, signal.SIGKILL)
                killed = True
            if killed:
                break
        time.sleep(0.05)
    output = proc.communicate(timeout=600)[0]
    assert killed, output[-3000:]
    assert proc.returncode != 0, "the pipeline must fail when a rank dies"
    assert not (stage_dir / "manifest.json").exists()
    saved = (stage_dir / "checkpoints" / "latest").read_text().strip()

    again = subprocess.run(pipeline_cmd(run_dir, paths, *extra), capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (stage_dir / "manifest.json").is_file()
    job = json.loads((stage_dir / "job.json").read_text())
    assert job["resume"] is True and job["resume_tag"] in (None, saved)  # None: DeepSpeed's `latest`, i.e. saved
    steps = [json.loads(line)["step"] for line in (stage_dir / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 41)), "the resumed run continues the step count without gaps or repeats"
    assert (stage_dir / "model" / "config.json").is_file()
    # earlier stages were found up to date, not rebuilt
    assert "up to date" in again.stderr


def test_a_moved_run_dir_finds_every_stage_up_to_date(world, tmp_path):
    """Runs after the killed-rank test: that pipeline left every stage of method ofa complete."""
    run_dir, paths = world
    moved = tmp_path / "moved"
    shutil.copytree(run_dir, moved)  # copy2 keeps mtimes: the verified hashes stay cached
    shutil.rmtree(run_dir)
    try:
        extra = ("tracking.enabled=false", "pipeline.methods=[ofa]", "pipeline.compare=false",
                 "pretrain.steps=40", "pretrain.save_every=5", "pretrain.eval_every=40")
        world_paths = type(paths)(moved / "world")
        started = time.time()
        out = subprocess.run(pipeline_cmd(moved, world_paths, *extra), capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stderr[-3000:]
        said = [line for line in out.stderr.splitlines() if line.startswith("hyperofa ") and ": " in line]
        stages = ("tokenizer", "prepare", "vectors", "mapping", "init", "evaluate", "pretrain")
        for stage in stages:
            assert any(line.startswith(f"hyperofa {stage}: up to date") for line in said), (stage, said)
        assert not any("rebuilding" in line or "launching" in line for line in said), said
        assert time.time() - started < 300
        recorded = [json.loads(p.read_text()) for p in moved.rglob("manifest.json") if "world" not in p.parts]
        assert len(recorded) >= len(stages)  # every stage's inputs in the one shape (runtime/stage.py)
        assert all(isinstance(m["inputs"]["config"], dict) for m in recorded), [m["stage"] for m in recorded]
    finally:
        shutil.copytree(moved, run_dir)


def test_a_relative_run_dir_copied_under_a_new_name_is_up_to_date_for_every_stage(world, tmp_path):
    """Issue 24: inputs are recorded by content, not by path string. The module's run was made with absolute paths;
    its copy is named relative to another working directory, and so is every input (the source model, corpus and
    data are at other paths too). Then, with `pipeline.evaluate=false`, an init rebuilt for another setting must not
    show the old evaluations or name the model pretrained from the old init."""
    run_dir, paths = world
    shutil.copytree(run_dir, tmp_path / "copy")
    extra = ("tracking.enabled=false", "pipeline.methods=[ofa]", "pipeline.compare=false",
             "pretrain.steps=40", "pretrain.save_every=5", "pretrain.eval_every=40")
    cmd = pipeline_cmd(Path("copy"), type(paths)(Path("copy") / "world"), *extra)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    said = [line for line in out.stderr.splitlines() if line.startswith("hyperofa ") and ": " in line]
    for stage in ("tokenizer", "prepare", "vectors", "mapping", "init", "evaluate", "pretrain"):
        assert any(line.startswith(f"hyperofa {stage}: up to date") for line in said), (stage, said)
    assert not any("rebuilding" in line or "launching" in line for line in said), said
    row = next(line for line in out.stdout.splitlines() if line.startswith("| ofa |"))
    assert "n/a" not in row, out.stdout  # every evaluation of the copy is current
    assert f"model ofa       {tmp_path / 'copy' / 'pretrain' / 'ofa' / 'model'}" in out.stdout

    again = subprocess.run([*cmd, "pipeline.evaluate=false", "pipeline.pretrain=false", "init.temperature=0.2"],
                           capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert not any(line.startswith("hyperofa init: up to date") for line in again.stderr.splitlines())
    row = next(line for line in again.stdout.splitlines() if line.startswith("| ofa |"))
    assert row == "| ofa | n/a | n/a | n/a | n/a |", again.stdout
    assert f"model ofa       {tmp_path / 'copy' / 'init' / 'ofa' / 'model'}" in again.stdout


def test_unreachable_mlflow_server_fails_before_any_work(tmp_path):
    cmd = [sys.executable, "-m", "hyperofa_dist.cli", "pipeline", "--config", str(DEMO_CONFIG), f"run.dir={tmp_path / 'r'}",
           "tracking.tracking_uri=http://127.0.0.1:9", "corpus.path=/nonexistent"]
    env = dict(os.environ, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="3")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 2
    lines = [l for l in out.stderr.strip().splitlines() if l.startswith("hyperofa pipeline:")]
    assert lines == [lines[0]] and "MLflow tracking store http://127.0.0.1:9 is unreachable" in lines[0]
    assert not (tmp_path / "r" / "tokenizer").exists() and not (tmp_path / "r" / "prepare").exists()
