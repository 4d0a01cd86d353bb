"""The MLflow-outage drill (issue 15): a real `mlflow server` SIGKILLed under a running `hyperofa pretrain`.

A: the server comes back on the same port and store while the job trains: the command exits 0, the
   `pretrain/<method>` run ends FINISHED with exactly one `train/loss` point per step, equal to the job's own
   train_log.jsonl, the warning is on stderr and `tracking.outage_errors` on the run; no journal is left.
B: the server stays down until the command has ended: exit 0, the journals are left in <run.dir>/tracking/; the next
   command (after the server is back) replays them and the run is then as complete as A's.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from hyperofa_dist.formats import journal as journal_format
from hyperofa_dist.runtime.faults import FAULT_ENV
from hyperofa_dist.tracking import OUTAGE_METRIC

pytestmark = pytest.mark.slow

STEPS = 14


class Server:
    """`mlflow server` on a fixed port and store, which a drill can SIGKILL and start again."""

    def __init__(self, root: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.root, self.proc = root, None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
             "--artifacts-destination", str(self.root / "artifacts"), "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2)
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError("mlflow server exited during start-up")
                time.sleep(0.3)
        raise RuntimeError("mlflow server did not answer /health within 120 s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None


@pytest.fixture
def server(tmp_path):
    srv = Server(tmp_path / "server")
    (tmp_path / "server").mkdir()
    srv.start()
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def drill_world(tmp_path_factory, small_corpus, pretrain_kit):
    root = tmp_path_factory.mktemp("tracking_drill")
    tok, model = pretrain_kit.tokenizer_and_model(root, small_corpus)
    prepare = pretrain_kit.quick_prepare(root / "prep", small_corpus, tok)
    return {"model": model, "prepare": prepare}


def _command(drill_world, run_dir: Path, uri: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "hyperofa_dist.cli", "pretrain", f"run.dir={run_dir}",
        f"pretrain.model={drill_world['model']}", f"pretrain.shards={drill_world['prepare']}",
        f"tracking.tracking_uri={uri}", "tracking.experiment=drill", "tracking.retry_seconds=2",
        f"pretrain.steps={STEPS}", "pretrain.save_every=7", "pretrain.eval_every=7", "pretrain.log_every=1",
        "pretrain.micro_batch_size=4", "pretrain.grad_accum=1", "pretrain.warmup_steps=0", "pretrain.num_workers=0",
        "pretrain.eval_blocks=4", "pretrain.ranks_per_node=1", *extra,
    ]


def _logged_steps(stage_dir: Path) -> int:
    path = stage_dir / "train_log.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _wait_for_step(proc, stage_dir: Path, step: int, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while _logged_steps(stage_dir) < step:
        assert proc.poll() is None, "the command ended before the drill step"
        assert time.time() < deadline, f"step {step} not reached"
        time.sleep(0.1)


def _job_losses(stage_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (stage_dir / "train_log.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows}


def _pretrain_run(uri: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri, registry_uri=uri)
    experiment = client.get_experiment_by_name("drill")
    (run,) = [r for r in client.search_runs([experiment.experiment_id]) if r.info.run_name == "pretrain/hyperofa"]
    return client, run


def _check_complete(uri: str, stage_dir: Path) -> None:
    client, run = _pretrain_run(uri)
    history = client.get_metric_history(run.info.run_id, "train/loss")
    job = _job_losses(stage_dir)
    assert sorted(job) == list(range(1, STEPS + 1))
    assert sorted(m.step for m in history) == list(range(1, STEPS + 1))  # one point per step: none lost, none twice
    assert {m.step: m.value for m in history} == pytest.approx(job, abs=0, rel=1e-12)
    eval_steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "eval/loss"))
    assert eval_steps == [0, 7, 14]
    assert run.info.status == "FINISHED"
    assert run.data.metrics[OUTAGE_METRIC] >= 1
    versions = client.search_model_versions("name='drill-hyperofa'")  # the model, registered once
    assert [(v.run_id, v.source) for v in versions] == [(run.info.run_id, f"runs:/{run.info.run_id}/model")]


def test_server_killed_mid_run_and_restarted(drill_world, server, tmp_path):
    run_dir = tmp_path / "run"
    stage_dir = run_dir / "pretrain" / "hyperofa"
    err = open(tmp_path / "stderr.txt", "w")
    proc = subprocess.Popen(_command(drill_world, run_dir, server.uri, "tracking.flush_seconds=120"),
                            env={**os.environ, FAULT_ENV: "slow@3000"}, stdout=subprocess.DEVNULL, stderr=err)
    try:
        _wait_for_step(proc, stage_dir, 3)
        server.kill()
        killed_at, down = _logged_steps(stage_dir), time.time()
        _wait_for_step(proc, stage_dir, killed_at + 2)  # steps trained while the store is gone
        server.start()
        restarted_at, down = _logged_steps(stage_dir), time.time() - down
        started = time.time()
        assert proc.wait(timeout=600) == 0
        print(f"drill A: killed after step {killed_at}, back after step {restarted_at} ({down:.1f} s down); "
              f"the command ended {time.time() - started:.1f} s later")
    finally:
        if proc.poll() is None:
            proc.kill()
        err.close()
    stderr = (tmp_path / "stderr.txt").read_text()
    assert restarted_at < STEPS, "the server came back only after training: not a mid-run outage"
    assert "unreachable" in stderr and "the work goes on" in stderr, stderr[-3000:]
    assert "answers again after" in stderr
    assert "Traceback" not in stderr
    _check_complete(server.uri, stage_dir)
    assert journal_format.journals(run_dir / "tracking") == []


def test_server_down_until_the_command_ends_then_replayed_by_the_next(drill_world, server, tmp_path):
    run_dir = tmp_path / "run"
    stage_dir = run_dir / "pretrain" / "hyperofa"
    command = _command(drill_world, run_dir, server.uri, "tracking.flush_seconds=2")
    err = open(tmp_path / "stderr.txt", "w")
    proc = subprocess.Popen(command, env={**os.environ, FAULT_ENV: "slow@300"}, stdout=subprocess.DEVNULL,
                            stderr=err)
    try:
        _wait_for_step(proc, stage_dir, 3)
        server.kill()
        assert proc.wait(timeout=600) == 0  # the job's exit does not depend on the tracker
    finally:
        if proc.poll() is None:
            proc.kill()
        err.close()
    stderr = (tmp_path / "stderr.txt").read_text()
    assert "tracking writes not delivered, kept in" in stderr, stderr[-3000:]
    assert "Traceback" not in stderr
    left = journal_format.journals(run_dir / "tracking")
    assert left  # the job's rank 0 and the command each left what they could not send
    assert (stage_dir / "manifest.json").is_file()  # the stage finished on disk

    server.start()
    client, run = _pretrain_run(server.uri)
    assert run.info.status == "RUNNING"  # its end is among the writes in the journal
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) < STEPS
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)  # the next command replays first
    assert again.returncode == 0, again.stderr[-3000:]
    assert "replaying" in again.stderr and "up to date" in again.stderr
    _check_complete(server.uri, stage_dir)
    assert journal_format.journals(run_dir / "tracking") == []
