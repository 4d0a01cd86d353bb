"""The pipeline end to end: a real `mlflow server`, a SIGKILLed DeepSpeed rank, an unreachable tracking server.

One small generated world (hyperofa_dist.synthetic.demo) is shared by the module; both pipeline runs use the same run
directory, so the second finds tokenizer, prepare, vectors and mapping up to date and only adds its own method.
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


def rest(base: str, path: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{base}{path}", data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read() or b"{}")


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


def test_pipeline_against_a_real_mlflow_server(world, mlflow_server):
    run_dir, paths = world
    cmd = pipeline_cmd(run_dir, paths, f"tracking.tracking_uri={mlflow_server}", "tracking.experiment=drill",
                       "pipeline.methods=[random]", "pretrain.steps=4", "pretrain.save_every=2", "pretrain.eval_every=2")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| random |" in out.stdout and "MLflow store:   http://127.0.0.1" in out.stdout
    assert "[INFO]" not in out.stdout and "[INFO]" in out.stderr  # DeepSpeed's rank logs stay off stdout

    experiment = rest(mlflow_server, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=drill")["experiment"]
    runs = rest(mlflow_server, "/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 500})["runs"]
    tags = {r["info"]["run_id"]: {t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs}
    parents = [rid for rid, t in tags.items() if t.get("hyperofa.command") == "pipeline"]
    assert len(parents) == 1
    parent = parents[0]
    children = {rid: t.get("hyperofa.stage", t.get("mlflow.runName")) for rid, t in tags.items()
                if t.get("mlflow.parentRunId") == parent}
    stages = set(children.values())
    for expected in ("tokenizer", "prepare", "vectors", "mapping", "compare"):
        assert expected in stages, (expected, stages)
    assert any(s and s.startswith("pretrain") for s in stages) and any(s and s.startswith("evaluate") for s in stages)
    by_id = {r["info"]["run_id"]: r for r in runs}
    metrics = {rid: {m["key"] for m in by_id[rid]["data"].get("metrics", [])} for rid in children}
    prepare_run = next(rid for rid, s in children.items() if s == "prepare")
    assert any(k.startswith("total/") for k in metrics[prepare_run])
    evaluated = [rid for rid, s in children.items() if s and s.startswith("evaluate")]
    assert any(any(k.startswith("srt") for k in metrics[rid]) for rid in evaluated)
    # the pretrain job's own run (rank 0 inside the DeepSpeed launch) logged a training loss somewhere below the parent
    all_metric_keys = {m["key"] for r in runs for m in r["data"].get("metrics", [])}
    assert "train/loss" in all_metric_keys
    compare_run = next(rid for rid, s in children.items() if s == "compare")
    listed = rest(mlflow_server, f"/api/2.0/mlflow/artifacts/list?run_id={compare_run}")
    files = [f["path"] for f in listed.get("files", [])]
    nested = [f["path"] for d in listed.get("files", []) if d.get("is_dir")
              for f in rest(mlflow_server, f"/api/2.0/mlflow/artifacts/list?run_id={compare_run}&path={d['path']}").get("files", [])]
    pngs = [p for p in files + nested if p.endswith(".png")]
    assert pngs, files + nested


def _rank_pids() -> list[int]:
    # the ranks themselves, not their supervisors (`-m hyperofa_dist.runtime.rank ... --target <module>`)
    out = subprocess.run(["pgrep", "-f", "-m hyperofa_dist.pretrain.train"], capture_output=True, text=True)
    return [int(x) for x in out.stdout.split()]


def test_killed_rank_then_pipeline_again_resumes_and_completes(world):
    run_dir, paths = world
    extra = ("tracking.enabled=false", "pipeline.methods=[ofa]", "pipeline.compare=false",
             "pretrain.steps=40", "pretrain.save_every=5", "pretrain.eval_every=40")
    stage_dir = run_dir / "pretrain" / "ofa"
    proc = subprocess.Popen(pipeline_cmd(run_dir, paths, *extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.time() + 900
    killed = False
    while time.time() < deadline and proc.poll() is None:
        if (stage_dir / "checkpoints" / "latest").is_file():
            for pid in _rank_pids()[-1:]:  # one rank, as a node failure would
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
    finally:
        shutil.copytree(moved, run_dir)


def test_unreachable_mlflow_server_fails_before_any_work(tmp_path):
    cmd = [sys.executable, "-m", "hyperofa_dist.cli", "pipeline", "--config", str(DEMO_CONFIG), f"run.dir={tmp_path / 'r'}",
           "tracking.tracking_uri=http://127.0.0.1:9", "corpus.path=/nonexistent"]
    env = dict(os.environ, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="3")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 2
    lines = [l for l in out.stderr.strip().splitlines() if l.startswith("hyperofa pipeline:")]
    assert lines == [lines[0]] and "MLflow tracking store http://127.0.0.1:9 is unreachable" in lines[0]
    assert not (tmp_path / "r" / "tokenizer").exists() and not (tmp_path / "r" / "prepare").exists()
