"""`hyperofa pretrain` driven and killed as a user would (issue 15, cases 1 and 5): 2 CPU ranks over gloo.

One stage directory, four drivers in turn:
  1. runs until a checkpoint; a second driver on the same stage is refused in one line naming the first's PID;
     the first is then SIGKILLed: its ranks stop by themselves, their /dev/shm segments go with them;
  2. resumes (taking over the dead driver's lock, and saying so) and gets SIGTERM: it forwards it, waits for the
     ranks, exits 143, and leaves no MLflow run of its own RUNNING;
  3. resumes and is SIGKILLed together with every process of its launch: the segments leak;
  4. resumes with a changed pretrain.steps: refused without pretrain.allow_config_change, allowed with it, removes
     the leaked segments before launching, finishes, and records the change at its step in the manifest and MLflow.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from hyperofa_dist.runtime.shm import SHM_DIR, SHM_PREFIX

pytestmark = pytest.mark.slow

ARGS = [
    "pretrain.steps=100000", "pretrain.save_every=2", "pretrain.eval_every=100000", "pretrain.micro_batch_size=2",
    "pretrain.grad_accum=1", "pretrain.num_workers=0", "pretrain.eval_blocks=2", "pretrain.log_every=1",
    "pretrain.ranks_per_node=2", "pretrain.lr=0.001",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, small_corpus, pretrain_kit):
    root = tmp_path_factory.mktemp("hygiene")
    tok, model = pretrain_kit.tokenizer_and_model(root, small_corpus)
    shards = pretrain_kit.quick_prepare(root / "prep" / "prepare", small_corpus, tok)
    run = root / "run"
    base = [sys.executable, "-m", "hyperofa_dist.cli", "pretrain", f"run.dir={run}", f"pretrain.model={model}",
            f"pretrain.shards={shards}", *ARGS]
    return {"run": run, "stage": run / "pretrain" / "hyperofa", "base": base}


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    handle = open(log, "w")
    return subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


def latest(stage: Path) -> str:
    path = stage / "checkpoints" / "latest"
    return path.read_text().strip() if path.is_file() else ""


def wait_for_checkpoint_after(stage: Path, previous: str, proc: subprocess.Popen, log: Path) -> str:
    deadline = time.time() + 600
    while time.time() < deadline:
        tag = latest(stage)
        if tag and tag > previous:
            return tag
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.2)
    raise AssertionError("no new checkpoint within 600 s")


def launch_processes(driver: int) -> list[psutil.Process]:
    return psutil.Process(driver).children(recursive=True)


def gone_within(procs: list[psutil.Process], seconds: float) -> list[psutil.Process]:
    """The processes still running after `seconds` (a zombie has ended: only its exit status awaits a reaper)."""
    deadline = time.time() + seconds
    while True:
        alive = []
        for proc in procs:
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.time() > deadline:
            return alive
        time.sleep(0.2)


def port_of(procs: list[psutil.Process]) -> str:
    for proc in procs:
        try:
            env = proc.environ()
        except psutil.Error:
            continue
        if env.get("MASTER_PORT"):
            return env["MASTER_PORT"]
    raise AssertionError("no rank with MASTER_PORT")


def segments(port: str) -> list[Path]:
    return sorted(SHM_DIR.glob(f"{SHM_PREFIX}_{os.getuid()}_*_{port}_*"))


def runs_by_status(run: Path) -> dict[str, list[tuple[str, str]]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("hyperofa")
    out: dict[str, list[tuple[str, str]]] = {}
    for r in client.search_runs([experiment.experiment_id], max_results=1000):
        out.setdefault(r.info.status, []).append((r.info.run_name, r.info.run_id))
    return out


def test_killed_and_interrupted_drivers_leave_no_ranks_no_shm_no_second_writer(setup, tmp_path):
    run, stage, base = setup["run"], setup["stage"], setup["base"]

    # 1. a driver, a second writer refused, the driver SIGKILLed
    log1 = tmp_path / "driver1.log"
    first = start(base, log1)
    wait_for_checkpoint_after(stage, "", first, log1)
    second = subprocess.run(base, capture_output=True, text=True, timeout=300)
    assert second.returncode == 2
    errors = [line for line in second.stderr.splitlines() if line.startswith("hyperofa pretrain: error:")]
    assert len(errors) == 1 and f"PID {first.pid} on" in errors[0] and ".hyperofa.lock" in errors[0], second.stderr
    procs = launch_processes(first.pid)
    ranks = [p for p in procs if "-m hyperofa_dist.pretrain.train" in " ".join(p.cmdline())]
    assert len(ranks) == 2
    port = port_of(ranks)
    assert len(segments(port)) == 2
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert gone_within(procs, 60) == [], "the launch outlived its driver"
    assert segments(port) == []  # each supervisor unlinked its rank's segment
    statuses = runs_by_status(run)
    ended = {name for status in ("FAILED", "KILLED") for name, _ in statuses.get(status, [])}
    assert "pretrain/hyperofa" in ended, statuses  # rank 0 ended the stage's run its dead driver had opened

    # 2. resume, SIGTERM: forwarded, 143, nothing of this driver left RUNNING
    running_before = set(statuses.get("RUNNING", []))
    log2 = tmp_path / "driver2.log"
    resumed = start([*base, "pretrain.resume=true"], log2)
    wait_for_checkpoint_after(stage, latest(stage), resumed, log2)
    procs = launch_processes(resumed.pid)
    resumed.send_signal(signal.SIGTERM)
    assert resumed.wait(timeout=120) == 128 + signal.SIGTERM
    text = log2.read_text()
    assert "took over the stale lock" in text and f"PID {first.pid}" in text
    assert "hyperofa pretrain: interrupted (SIGTERM)" in text
    assert gone_within(procs, 10) == []
    assert set(runs_by_status(run).get("RUNNING", [])) == running_before  # its own runs all ended (FAILED)
    assert not (run / "pretrain" / ".hyperofa.lock").exists()

    # 3. resume, then SIGKILL every process of the launch at once: DeepSpeed's segments leak
    log3 = tmp_path / "driver3.log"
    third = start([*base, "pretrain.resume=true"], log3)
    tag3 = wait_for_checkpoint_after(stage, latest(stage), third, log3)
    procs = launch_processes(third.pid)
    port = port_of([p for p in procs if "-m hyperofa_dist.pretrain.train" in " ".join(p.cmdline())])
    for proc in [psutil.Process(third.pid), *procs]:
        proc.send_signal(signal.SIGKILL)
    third.wait()
    assert gone_within(procs, 30) == []
    leaked = segments(port)
    # two leaked segments, unless a launch of another job on this machine (a parallel test) already swept them
    assert len(leaked) <= 2
    time.sleep(6)  # older than runtime.shm.ORPHAN_MIN_AGE_S

    # 4. a changed result key: refused, then allowed and recorded; the leaked segments are removed first
    tag3 = latest(stage)  # the killed launch may have saved once more before it died
    step = int(tag3.removeprefix("step"))
    changed = [*base, "pretrain.resume=true", f"pretrain.steps={step + 2}"]
    refused = subprocess.run(changed, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2, refused.stderr[-2000:]
    errors = [line for line in refused.stderr.splitlines() if line.startswith("hyperofa pretrain: error:")]
    assert len(errors) == 1 and f"pretrain.steps 100000 -> {step + 2}" in errors[0]
    assert "pretrain.allow_config_change=true" in errors[0] and f"change at step {step}" in errors[0]
    assert not (stage / "manifest.json").exists()

    done = subprocess.run([*changed, "pretrain.allow_config_change=true"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    # this launch's sweep removes them (on a machine running other jobs, their launches' sweeps may get there first)
    assert not any(p.exists() for p in leaked)
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["config_changes"] == [
        {"step": step, "tag": tag3, "changed": {"pretrain.steps": [100000, step + 2]}}]
    info = json.loads((stage / "checkpoints" / f"step{step + 2:08d}" / "hyperofa.json").read_text())
    assert info["provenance"]["changes"] == manifest["config_changes"]
    assert info["provenance"]["fingerprint"]["pretrain.steps"] == step + 2

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("hyperofa")
    finished = client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'")
    tags = [r.data.tags for r in finished if r.info.run_name == "pretrain/hyperofa" and "hyperofa.stage" in r.data.tags]
    assert tags and tags[-1][f"hyperofa.config_change.step{step}"] == f"pretrain.steps 100000 -> {step + 2}"
