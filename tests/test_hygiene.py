"""Process hygiene, verified outputs and resume provenance, without launching ranks (issue 15: cases 1, 4, 5, 8, 9).

The stage shell is exercised through a toy stage that writes two files; the lock against a writer in another
process; the shared-memory sweep against a segment that a live process maps; the rank supervisor around a
stand-in job module that crashes or outlives its driver; the resume check against checkpoint records written
from one config and read with another.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hyperofa_dist.config import load_config
from hyperofa_dist.errors import HyperofaError
from hyperofa_dist.formats import rundir
from hyperofa_dist.formats.jobdir import CLIENT_INFO, exit_record_path, rank_log, write_checkpoint_hashes
from hyperofa_dist.formats.rundir import Stage
from hyperofa_dist.runtime import job as job_runtime
from hyperofa_dist.runtime.launch import describe_rank_failure
from hyperofa_dist.runtime.process import identity
from hyperofa_dist.runtime.rank import driver_env, watched_driver
from hyperofa_dist.runtime.shm import SHM_PREFIX, remove_orphan_segments
from hyperofa_dist.runtime.stage import StageShell
from hyperofa_dist.tracking import NullTracker

REPO = Path(__file__).resolve().parents[1]


# --- a toy stage: two outputs, inputs that name a path inside and one outside the run directory -------------


def toy_stage(run_dir: Path, inputs: dict, calls: list) -> int:
    config = load_config(None, [f"run.dir={run_dir}", "tracking.enabled=false"])
    stage = Stage(config.run_dir, "toy")
    with StageShell.open(config, NullTracker(), "toy", stage, {"config": {}, **inputs}) as shell:
        if shell.up_to_date:
            return 0
        calls.append(1)
        shell.begin()
        (shell.path / "big.bin").write_bytes(bytes(range(256)) * 4096)  # 1 MiB
        (shell.path / "small.txt").write_text("postings\n" * 100)
        shell.finish(outputs=["big.bin", "small.txt"])
    return 0


def test_up_to_date_verifies_size_and_hash_and_rebuilds_a_damaged_stage_naming_the_file(tmp_path, capsys,
                                                                                        monkeypatch):
    run = tmp_path / "run"
    calls: list = []
    toy_stage(run, {"k": 1}, calls)
    hashed = []
    real = rundir.sha256_file
    monkeypatch.setattr(rundir, "sha256_file", lambda p: hashed.append(Path(p).name) or real(p))

    capsys.readouterr()
    toy_stage(run, {"k": 1}, calls)
    assert len(calls) == 1 and "up to date" in capsys.readouterr().err
    assert hashed == []  # hashes were cached as the files were written: an unchanged output costs a stat

    big = run / "toy" / "big.bin"
    big.write_bytes(big.read_bytes()[:1000])  # truncated
    toy_stage(run, {"k": 1}, calls)
    err = capsys.readouterr().err
    assert len(calls) == 2 and f"{big} has 1000 bytes, the manifest records 1048576; rebuilding the stage" in err

    small = run / "toy" / "small.txt"
    data = bytearray(small.read_bytes())
    data[10] ^= 0x01  # same size, one bit
    small.write_bytes(bytes(data))
    toy_stage(run, {"k": 1}, calls)
    err = capsys.readouterr().err
    assert len(calls) == 3 and f"{small} differs from the manifest (sha256); rebuilding the stage" in err
    assert small.read_text() == "postings\n" * 100

    hashed.clear()
    os.utime(big)  # touched, not changed: hashed once again, then up to date
    toy_stage(run, {"k": 1}, calls)
    assert len(calls) == 3 and hashed == ["big.bin"]


def test_inputs_inside_the_run_dir_are_recorded_relative_so_a_moved_run_dir_stays_up_to_date(tmp_path, capsys):
    old, new, outside = tmp_path / "old", tmp_path / "new", tmp_path / "vectors.kv"
    calls: list = []

    def inputs(run: Path) -> dict:
        return {"corpus": str(run / "world" / "corpus"), "model": {"path": str(run / "world" / "model")},
                "vectors": str(outside), "name": "xlm-roberta-base"}

    toy_stage(old, inputs(old), calls)
    manifest = json.loads((old / "toy" / "manifest.json").read_text())
    assert manifest["inputs"] == {"config": {}, "corpus": "<run.dir>/world/corpus", "model": {"path": "<run.dir>/world/model"},
                                  "vectors": str(outside), "name": "xlm-roberta-base"}
    shutil.move(old, new)
    capsys.readouterr()
    toy_stage(new, inputs(new), calls)
    assert calls == [1] and "up to date" in capsys.readouterr().err
    toy_stage(new, {**inputs(new), "vectors": str(tmp_path / "other.kv")}, calls)  # a real input change still counts
    assert calls == [1, 1]


# --- one writer per stage directory ----------------------------------------------------------------------------


HOLDER = """
import sys
from hyperofa_dist.formats.rundir import Stage
lock = Stage(sys.argv[1], "toy").lock("toy")
lock.acquire()
print("held", flush=True)
sys.stdin.read()
lock.release()
"""


def test_a_second_writer_is_refused_naming_the_pid_and_a_stale_lock_is_taken_over(tmp_path, capsys):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(HyperofaError) as error:
            toy_stage(run, {"k": 1}, [])
        message = str(error.value)
        assert f"PID {holder.pid} on" in message and "`hyperofa toy`" in message and "\n" not in message
        assert not (run / "toy").exists()  # refused before anything was written
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert not run.exists()  # released: the lock file and the directory made only for it are gone

    run.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / ".toy.lock").write_text(json.dumps({"pid": dead.pid, "host": "h", "command": "toy", "since": "then"}))
    calls: list = []
    capsys.readouterr()
    toy_stage(run, {"k": 1}, calls)
    assert calls == [1]
    assert f"took over the stale lock {run / '.toy.lock'} of `hyperofa toy`, PID {dead.pid}" in capsys.readouterr().err
    assert not (run / ".toy.lock").exists()


def test_a_refused_stage_in_a_new_run_dir_leaves_no_directory(tmp_path):
    run = tmp_path / "fresh" / "run"
    config = load_config(None, [f"run.dir={run}", "tracking.enabled=false"])
    with pytest.raises(HyperofaError, match="bad input"):
        with StageShell.open(config, NullTracker(), "toy", Stage(config.run_dir, "toy"), {"config": {}}):
            raise HyperofaError("bad input")
    assert not (tmp_path / "fresh").exists()


# --- /dev/shm: segments of dead launches ---------------------------------------------------------------------


MAPPER = """
import mmap, sys
f = open(sys.argv[1], "r+b")
m = mmap.mmap(f.fileno(), 0)
print("mapped", flush=True)
sys.stdin.read()
"""


def test_orphan_sweep_removes_only_segments_no_live_process_maps(tmp_path):
    uid = os.getuid()
    live, dead = (tmp_path / f"{SHM_PREFIX}_{uid}_127.0.0.1_{port}_0" for port in (29611, 29612))
    foreign = tmp_path / f"{SHM_PREFIX}_{uid + 1}_127.0.0.1_29613_0"
    for path in (live, dead, foreign):
        path.write_bytes(b"\0" * 4096)
    mapper = subprocess.Popen([sys.executable, "-c", MAPPER, str(live)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert mapper.stdout.readline().strip() == "mapped"
        assert remove_orphan_segments(tmp_path, min_age_s=0) == (1, 4096)
        assert live.exists() and not dead.exists() and foreign.exists()
        assert remove_orphan_segments(tmp_path, min_age_s=3600) == (0, 0)  # too young to judge
    finally:
        mapper.stdin.close()
        mapper.wait(timeout=30)
    assert remove_orphan_segments(tmp_path, min_age_s=0) == (1, 4096)  # its process is gone now
    assert not live.exists() and foreign.exists()


# --- the rank supervisor ---------------------------------------------------------------------------------------


FAKE_JOB = """
import os, signal, sys, time
print("rank output before the end", flush=True)
if os.environ["FAKE_MODE"] == "crash":
    os.kill(os.getpid(), signal.SIGKILL)
time.sleep(300)
"""


def supervise(tmp_path: Path, mode: str, driver: str) -> subprocess.CompletedProcess:
    (tmp_path / "pkg").mkdir(exist_ok=True)
    (tmp_path / "pkg" / "fake_job.py").write_text(FAKE_JOB)
    job = tmp_path / "stage" / "job.json"
    job.parent.mkdir(parents=True, exist_ok=True)
    job.write_text("{}")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'pkg'}{os.pathsep}{REPO}", "FAKE_MODE": mode, "RANK": "1",
           "HYPEROFA_DRIVER": driver_env(driver)}
    cmd = [sys.executable, "-m", "hyperofa_dist.runtime.rank", "--local_rank=1", "--target", "fake_job", "--job",
           str(job)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def test_supervisor_records_a_rank_killed_by_a_signal_with_its_log(tmp_path):
    done = supervise(tmp_path, "crash", identity())
    assert done.returncode == 128 + signal.SIGKILL
    assert "rank output before the end" in done.stdout  # still streamed to the launcher
    stage = tmp_path / "stage"
    record = json.loads(exit_record_path(stage, 1).read_text())
    assert record["signal"] == signal.SIGKILL and record["signal_name"] == "SIGKILL" and record["asked"] is None
    assert "rank output before the end" in rank_log(stage, 1).read_text()
    line = describe_rank_failure([record], world=2)
    assert line.startswith(f"rank 1 (pid {record['pid']}) was killed by SIGKILL (from outside the job")
    assert line.endswith(f"its output: {rank_log(stage, 1)}")


def test_supervisor_stops_its_rank_when_the_driver_is_gone(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    ident = identity(gone.pid)
    gone.wait()
    started = time.monotonic()
    done = supervise(tmp_path, "sleep", ident)
    assert time.monotonic() - started < 60  # not the job's 300 s
    assert done.returncode == 128 + signal.SIGTERM
    assert "the driver (pid" in done.stderr and "is gone; stopping this rank" in done.stderr
    record = json.loads(exit_record_path(tmp_path / "stage", 1).read_text())
    assert record["asked"] == "driver gone" and record["signal"] == signal.SIGTERM


def test_a_driver_on_another_host_is_not_watched():
    # a Slurm or MPI launch may carry the variable to other nodes, where the driver's pid means nothing
    assert watched_driver(driver_env("123:456")) == "123:456"
    assert watched_driver("other-host/123:456") is None and watched_driver(None) is None


def test_rank_failure_line_names_the_first_rank_that_died_on_its_own():
    records = [
        {"rank": 0, "pid": 10, "status": 1, "signal": None, "asked": None, "time": 5.0, "log": "l0"},  # peer gone
        {"rank": 1, "pid": 11, "status": None, "signal": 11, "signal_name": "SIGSEGV", "asked": None, "time": 4.0,
         "log": "l1"},
        {"rank": 2, "pid": 12, "status": None, "signal": 15, "signal_name": "SIGTERM", "asked": "SIGTERM",
         "time": 3.0, "log": "l2"},
        {"rank": 3, "pid": 13, "status": 0, "signal": None, "asked": None, "time": 1.0, "log": "l3"},
    ]
    assert describe_rank_failure(records, 4) == (
        "rank 1 (pid 11) was killed by SIGSEGV (a crash in native code); 2 other ranks ended too; its output: l1")
    stopped = [records[2], records[3]]
    assert describe_rank_failure(stopped, 4) is not None and "rank 0, 1 left no exit record" in describe_rank_failure(
        stopped, 4)
    assert describe_rank_failure([records[3]], 1) is None


# --- resume provenance -----------------------------------------------------------------------------------------


def fake_checkpoint(ckpt: Path, tag: str, provenance, step: int = 4) -> None:
    (ckpt / tag).mkdir(parents=True)
    info = {"step": step, "world_size": 2, **({"provenance": provenance} if provenance is not None else {})}
    (ckpt / tag / CLIENT_INFO).write_text(json.dumps(info))
    write_checkpoint_hashes(ckpt, tag)


def fingerprint(*overrides: str) -> dict:
    config = load_config(None, ["run.dir=/tmp/r", *overrides])
    return job_runtime.resume_fingerprint(config, ("pretrain", "run"), {"model": {"w": "abc"}, "precision": "fp32"})


def test_resume_with_changed_result_keys_is_refused_in_one_line_or_allowed_and_recorded(tmp_path):
    ckpt = tmp_path / "checkpoints"
    fake_checkpoint(ckpt, "step00000004", job_runtime.fresh_provenance(fingerprint("pretrain.lr=0.005")))
    check = job_runtime.check_resume
    with pytest.raises(HyperofaError) as error:
        check(ckpt, "step00000004", fingerprint("pretrain.lr=0.001", "pretrain.mlm_probability=0.2"), allow=False,
              allow_key="pretrain.allow_config_change")
    message = str(error.value)
    assert "pretrain.lr 0.005 -> 0.001" in message and "pretrain.mlm_probability 0.15 -> 0.2" in message
    assert "pretrain.allow_config_change=true" in message and "change at step 4" in message and "\n" not in message

    # execution-only keys never count
    same = check(ckpt, "step00000004", fingerprint("pretrain.lr=0.005", "pretrain.log_every=1", "pretrain.resume=true",
                                                   "pretrain.master_port=29999", "run.dir=/elsewhere",
                                                   "pretrain.ranks_per_node=1"),
                 allow=False, allow_key="k")
    assert same["changes"] == []

    allowed = check(ckpt, "step00000004", fingerprint("pretrain.lr=0.001"), allow=True, allow_key="k")
    assert allowed["changes"] == [{"step": 4, "tag": "step00000004", "changed": {"pretrain.lr": [0.005, 0.001]}}]
    assert allowed["fingerprint"]["pretrain.lr"] == 0.001
    assert job_runtime.change_tags(allowed) == {"hyperofa.config_change.step4": "pretrain.lr 0.005 -> 0.001"}

    # the history travels: a later checkpoint written under the new values still names the earlier change
    fake_checkpoint(ckpt, "step00000008", allowed, step=8)
    later = check(ckpt, "step00000008", fingerprint("pretrain.lr=0.001"), allow=False, allow_key="k")
    assert later["changes"] == allowed["changes"]

    fake_checkpoint(ckpt, "step00000009", None, step=9)
    with pytest.raises(HyperofaError, match="step00000009: records no fingerprint .* set k=true"):
        check(ckpt, "step00000009", fingerprint(), allow=False, allow_key="k")


def test_fingerprint_is_relative_to_the_run_dir_and_covers_inputs():
    a = job_runtime.resume_fingerprint(load_config(None, ["run.dir=/tmp/a", "pretrain.model=/tmp/a/init/m/model"]),
                                       ("pretrain", "run"), {"shards": "digest1"})
    b = job_runtime.resume_fingerprint(load_config(None, ["run.dir=/tmp/b", "pretrain.model=/tmp/b/init/m/model"]),
                                       ("pretrain", "run"), {"shards": "digest1"})
    c = job_runtime.resume_fingerprint(load_config(None, ["run.dir=/tmp/c", "pretrain.model=init/m/model"]),
                                       ("pretrain", "run"), {"shards": "digest1"})
    # the model is an input by location (config.InputPath): the stage records its content, not the path string
    assert a == b == c and "pretrain.model" not in a and a["input.shards"] == "digest1"
    assert "pretrain.resume" not in a and "pretrain.allow_config_change" not in a and "run.dir" not in a


REPEATED = """
import os, signal, time
from hyperofa_dist.runtime.process import Interrupted, raise_on_termination
raise_on_termination()
try:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)
except Interrupted as exc:
    try:
        os.kill(os.getpid(), signal.SIGTERM)  # the same signal again, from a second sender, during the clean-up
        time.sleep(0.2)
        print("clean-up finished", flush=True)
    finally:
        raise SystemExit(exc.exit_code)
"""


def test_termination_raises_once_and_a_repeat_does_not_cut_the_clean_up_short(tmp_path):
    done = subprocess.run([sys.executable, "-c", REPEATED], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert done.stdout == "clean-up finished\n" and "Traceback" not in done.stderr
