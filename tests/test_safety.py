"""Pointing the system at shared or hostile files: names that would leave the run directory, secrets in the
tracking URI, symbolic links planted under the names the system writes, crafted checkpoints."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from hyperofa_dist import cli
from hyperofa_dist.errors import HyperofaError
from hyperofa_dist.formats.rundir import Stage


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# --- names that become paths -----------------------------------------------------------------------------------


@pytest.mark.parametrize("override", ["evaluate.name=../x", "evaluate.name=..", "evaluate.name=a/b",
                                      "pretrain.method=../../y", "pretrain.method=."])
def test_a_name_that_would_leave_the_run_dir_is_refused_at_config_time(tmp_path, capsys, override):
    command = override.split(".")[0]
    argv = [command, f"run.dir={tmp_path / 'run'}", "tracking.enabled=false", override]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    key = override.split("=")[0]
    assert len(err) == 1 and f"config key {key}: must be one directory name inside the run directory" in err[0]
    assert _files(tmp_path) == []


def test_stage_names_and_deletions_stay_inside_the_stage(tmp_path):
    for bad in ("..", "evaluate/../..", "a/./b", "x\ny"):
        with pytest.raises(HyperofaError, match="stage directory name"):
            Stage(tmp_path, bad)
    outside = tmp_path / "outside"
    (outside / "model").mkdir(parents=True)
    (outside / "model" / "keep.bin").write_text("keep")
    run = tmp_path / "run"
    (run / "pretrain").mkdir(parents=True)
    os.symlink(outside, run / "pretrain" / "ofa")  # the stage's directory planted as a link out of the run dir
    with pytest.raises(HyperofaError, match="refusing to delete"):
        Stage(run / "pretrain", "ofa").clear(["model"])
    assert (outside / "model" / "keep.bin").exists()
    own = Stage(run / "pretrain", "hyperofa")
    own.path.mkdir()
    os.symlink(outside / "model", own.path / "model")  # an entry planted as a link: the link goes, not its target
    (own.path / "audit").mkdir()
    (own.path / "audit" / "rank0.jsonl").write_text("{}")
    own.clear(["model", "audit", "failure.json"])
    assert _files(own.path) == [] and (outside / "model" / "keep.bin").exists()


# --- pdsh: the job's arguments through a remote shell ---------------------------------------------------------


@pytest.mark.parametrize("job_dir", ["r;touch${{IFS}}{marker};x", "a b/$(touch {marker})", "c `touch {marker}` \"d\" \\e",
                                     "plain"])
def test_pdsh_launch_arguments_reach_the_remote_shell_unchanged(tmp_path, job_dir, monkeypatch):
    """The arguments as DeepSpeed's pdsh runner really processes them, then read by a shell as pdsh's remote
    command is: each comes back as it was, and none of the planted commands runs."""
    import subprocess
    from types import SimpleNamespace

    from deepspeed.launcher.multinode_runner import PDSHRunner

    from hyperofa_dist.config import load_config
    from hyperofa_dist.runtime.launch import LaunchTarget, launch_command, remote_shell_arguments

    marker = tmp_path / "ran"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node1 slots=1\nnode2 slots=1\n")
    job = tmp_path / job_dir.format(marker=marker) / "job.json"
    launch = load_config(None, [f"pretrain.hostfile={hostfile}", "pretrain.launcher=pdsh"]).pretrain
    monkeypatch.chdir(tmp_path)
    cmd = launch_command(launch, job, LaunchTarget("hyperofa_dist.pretrain.train", "pretrain"))
    sent = remote_shell_arguments(cmd)
    user_args = sent[sent.index("--module") + 2:]  # what the runner hands pdsh after the module
    processed = PDSHRunner.parse_user_args(SimpleNamespace(args=SimpleNamespace(user_args=user_args)))
    out = subprocess.run(["sh", "-c", "printf '%s\\n' " + " ".join(processed)], capture_output=True, text=True)
    assert out.stdout.splitlines() == cmd[cmd.index("--module") + 2:]
    assert str(job) in out.stdout.splitlines() and not marker.exists()


def test_pdsh_launch_from_a_directory_a_shell_would_misread_is_refused(tmp_path, monkeypatch):
    from hyperofa_dist.runtime.launch import remote_shell_arguments

    unsafe = tmp_path / "x;touch y"
    unsafe.mkdir()
    monkeypatch.chdir(unsafe)
    cmd = ["python", "-m", "deepspeed.launcher.runner", "--launcher", "pdsh", "--module", "m", "--job", "j"]
    with pytest.raises(HyperofaError, match="passes the working directory unquoted"):
        remote_shell_arguments(cmd)
    assert remote_shell_arguments([c for c in cmd if c not in ("--launcher", "pdsh")])[-1] == "j"  # local: as is


# --- lock and temporary files never follow a planted symbolic link -------------------------------------------


def test_a_symlink_planted_under_a_temporary_or_lock_name_is_never_written_through(tmp_path):
    import numpy as np

    from hyperofa_dist.formats.files import atomic_write_bytes, npy_writer, tmp_name
    from hyperofa_dist.formats.journal import Journal

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "run" / "stage"
    out.mkdir(parents=True)
    target = out / "manifest.json"
    os.symlink(victim, tmp_name(target))  # the temporary name this process will use
    atomic_write_bytes(target, b"{}")
    assert target.read_bytes() == b"{}" and not target.is_symlink() and victim.read_text() == "precious"

    array = out / "big.npy"
    os.symlink(victim, tmp_name(array))
    with npy_writer(array, np.float32, (3,)) as table:
        table[:] = 1
    assert np.load(array).tolist() == [1, 1, 1] and victim.read_text() == "precious"

    stage = Stage(tmp_path / "run", "stage")
    os.symlink(victim, tmp_path / "run" / ".stage.lock")
    with pytest.raises(HyperofaError, match="the stage lock is a symbolic link"):
        stage.lock("test").acquire()
    assert victim.read_text() == "precious"

    journal = Journal.create(tmp_path / "run" / "tracking", "store")  # predictable name: O_EXCL refuses a planted one
    journal.close()
    assert victim.read_text() == "precious"


# --- credentials in the tracking URI ------------------------------------------------------------------------


def test_credentials_are_redacted_from_config_copies_and_errors(tmp_path):
    from hyperofa_dist.config import load_config
    from hyperofa_dist.errors import redact

    secret = "s3cr3t-Pw"
    uri = f"http://alice:{secret}@127.0.0.1:1"
    config = load_config(None, [f"tracking.tracking_uri={uri}", f"run.dir={tmp_path}"])
    assert config.tracking.tracking_uri == uri  # the real one, for this process to connect with
    assert config.effective()["tracking"]["tracking_uri"] == "http://***@127.0.0.1:1"
    assert config.with_changes({"evaluate.step": 3}).tracking.tracking_uri == uri
    with pytest.raises(HyperofaError) as caught:
        load_config(None, [f"tracking.tracking_uri=bogus://alice:{secret}@host"])
    assert secret not in str(caught.value) and "bogus://***@host" in str(caught.value)
    assert redact({"a": [f"x https://t0ken@h/p?token={secret}&n=1"]}) == {"a": ["x https://***@h/p?token=***&n=1"]}
    # Every one-line error redacts what it echoes (an unreachable store's message names the URI).
    assert str(HyperofaError(f"MLflow tracking store {uri} is unreachable")) == (
        "MLflow tracking store http://***@127.0.0.1:1 is unreachable")


def test_a_job_rank_gets_the_real_uri_from_the_environment_never_from_the_job_file(tmp_path, monkeypatch):
    from hyperofa_dist.config import build_config, load_config
    from hyperofa_dist.tracking import SECRET_URI_ENV, make_tracker, tracking_uri_of

    uri = "http://alice:pw@127.0.0.1:1"
    monkeypatch.delenv(SECRET_URI_ENV, raising=False)
    driver = load_config(None, [f"tracking.tracking_uri={uri}", f"run.dir={tmp_path}"])
    job_config = build_config(driver.effective())  # what a rank reads from job.json
    with pytest.raises(HyperofaError, match=f"credentials are redacted here and {SECRET_URI_ENV}"):
        tracking_uri_of(job_config)
    make_tracker(driver, rank=0, connect=False)  # the driver's tracker leaves the real URI for the ranks it launches
    assert os.environ[SECRET_URI_ENV] == uri and tracking_uri_of(job_config) == uri
    monkeypatch.setenv(SECRET_URI_ENV, "http://alice:pw@10.0.0.1:1")  # another store's
    with pytest.raises(HyperofaError, match="credentials are redacted"):
        tracking_uri_of(job_config)


class _AuthProxy:
    """A reverse proxy in front of a real `mlflow server` (which has no authentication of its own here): it
    answers 401 to any request without the expected basic-auth credentials, and counts the ones it forwards."""

    def __init__(self, upstream: str, user: str, password: str):
        import base64
        import http.server
        import threading
        import urllib.request

        expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        proxy = self
        self.forwarded = self.refused = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _relay(self):
                if self.headers.get("Authorization") != expected:
                    proxy.refused += 1
                    self.send_response(401)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                request = urllib.request.Request(upstream + self.path, data=body or None, method=self.command,
                                                 headers={"Content-Type": self.headers.get("Content-Type", "")})
                try:
                    with urllib.request.urlopen(request, timeout=60) as answer:
                        status, data, kind = answer.status, answer.read(), answer.headers.get("Content-Type")
                except urllib.error.HTTPError as error:
                    status, data, kind = error.code, error.read(), error.headers.get("Content-Type")
                proxy.forwarded += 1
                self.send_response(status)
                self.send_header("Content-Type", kind or "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _relay

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.mark.slow
def test_credentials_in_the_tracking_uri_reach_the_store_and_appear_nowhere_else(tmp_path, small_corpus, capfd,
                                                                                   monkeypatch):
    """A real MLflow server behind a proxy that demands the URI's credentials: the stage logs through it, and the
    password is in no file of the run directory, no MLflow param or tag, and not in the command's output."""
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    from mlflow.tracking import MlflowClient

    with __import__("socket").socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination", str(tmp_path / "art")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        upstream = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{upstream}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "mlflow server did not start"
                time.sleep(0.5)
        secret = "pw-7f3a9c"
        proxy = _AuthProxy(upstream, "alice", secret)
        run_dir = tmp_path / "run"
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"):  # set by the tracker
            monkeypatch.setenv(name, "")
            monkeypatch.delenv(name)
        argv = ["vectors", "train", f"run.dir={run_dir}",
                f"vectors.train.corpus={small_corpus}", "vectors.train.prefix_aligned=true", "vectors.train.dim=8",
                "vectors.train.epochs=1", "tracking.experiment=secret",
                f"tracking.tracking_uri=http://alice:{secret}@127.0.0.1:{proxy.port}"]
        capfd.readouterr()
        assert cli.main(argv) == 0
        output = capfd.readouterr()
        assert proxy.forwarded > 0 and proxy.refused == 0  # every write carried the credentials
        assert secret not in output.out + output.err and "vectors" in output.err
        leaked = [p for p in run_dir.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
        assert leaked == [] and (run_dir / "vectors" / "manifest.json").is_file()
        client = MlflowClient(upstream)
        runs = client.search_runs([client.get_experiment_by_name("secret").experiment_id])
        assert len(runs) == 2  # the command's parent run and the stage's run
        for run in runs:
            values = [*run.data.params.values(), *run.data.tags.values()]
            assert not any(secret in str(v) for v in values)
            assert run.data.params["tracking.tracking_uri"] == f"http://***@127.0.0.1:{proxy.port}"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


# --- crafted checkpoints: refused before anything of them is unpickled ------------------------------------------


class _Marker:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _payload(path: Path, marker: Path) -> None:
    import torch

    torch.save({"module": {}, "trap": _Marker(marker)}, path)


@pytest.fixture
def saved_checkpoint(tmp_path, small_corpus, pretrain_kit):
    """A pretrain stage directory whose checkpoint was written as the job writes one (client info, DeepSpeed's
    model-states file, the sha256 list, then `latest`), and the model and shards to resume it with."""
    import torch

    from hyperofa_dist.formats.jobdir import write_checkpoint_hashes, write_client_info, write_latest

    tok, model = pretrain_kit.tokenizer_and_model(tmp_path, small_corpus)
    prepare = pretrain_kit.quick_prepare(tmp_path / "prepare", small_corpus, tok, languages=2, lines=60)
    ckpt = tmp_path / "run" / "pretrain" / "hyperofa" / "checkpoints"
    write_client_info(ckpt, "step00000002", {"step": 2, "world_size": 2})
    torch.save({"module": {"w": torch.zeros(2)}}, ckpt / "step00000002" / "mp_rank_00_model_states.pt")
    write_checkpoint_hashes(ckpt, "step00000002")
    write_latest(ckpt, "step00000002")
    argv = ["pretrain", f"run.dir={tmp_path / 'run'}", f"pretrain.model={model}", f"pretrain.shards={prepare}",
            "pretrain.resume=true", "pretrain.allow_config_change=true", "tracking.enabled=false"]
    return ckpt / "step00000002", argv


@pytest.mark.parametrize("how", ["replaced", "added"])
def test_a_crafted_checkpoint_file_is_refused_before_a_resume_loads_anything(saved_checkpoint, tmp_path, capsys,
                                                                              how):
    import torch

    tag, argv = saved_checkpoint
    marker = tmp_path / "payload-ran"
    name = "mp_rank_00_model_states.pt" if how == "replaced" else "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    _payload(tag / name, marker)
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "[WARNING] [real_accelerator" not in line]
    expected = "differs from the sha256 recorded" if how == "replaced" else "not one of the files written"
    assert len(err) == 1 and err[0].startswith(f"hyperofa pretrain: error: {tag / name}: resume refused: {expected}")
    assert not marker.exists() and not (tag.parents[1] / "job.json").exists()  # nothing launched
    with contextlib.suppress(Exception):
        torch.load(tag / name, weights_only=False)  # the payload is live: an unrestricted load runs it
    assert marker.exists()


def test_every_torch_load_of_a_resume_is_weights_only_even_where_deepspeed_asks_otherwise(tmp_path):
    import torch
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from hyperofa_dist.runtime.job import weights_only_loads

    genuine = tmp_path / "optim_states.pt"
    torch.save({"loss_scaler": DynamicLossScaler(init_scale=2**16, scale_window=1000, min_scale=1, delayed_shift=2,
                                                         consecutive_hysteresis=False), "zero_stage": ZeroStageEnum(2),
                "state": {"exp_avg": torch.ones(3)}, "ds_version": "0.19.8"}, genuine)
    crafted = tmp_path / "model_states.pt"
    marker = tmp_path / "payload-ran"
    _payload(crafted, marker)
    with weights_only_loads(tmp_path):
        state = torch.load(genuine, weights_only=False)  # as DeepSpeed's TorchCheckpointEngine calls it
    assert state["zero_stage"] == 2 and torch.equal(state["state"]["exp_avg"], torch.ones(3))
    with pytest.raises(HyperofaError) as caught:
        with weights_only_loads(tmp_path):
            torch.load(crafted, weights_only=False)
    assert "resume refused: a checkpoint file holds objects other than tensors" in str(caught.value)
    assert "\n" not in str(caught.value) and not marker.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


# --- local launches rendezvous on loopback -------------------------------------------------------------------


def test_a_local_launch_hosts_its_rendezvous_store_on_loopback_only(monkeypatch):
    import socket

    import torch.distributed as dist

    from hyperofa_dist.runtime.launch import free_port, loopback_rendezvous

    port = free_port()
    with loopback_rendezvous(port) as env:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("MASTER_PORT", str(port))
        store, rank, world = next(dist.rendezvous("env://", rank=1, world_size=2))  # as a rank's init does
        store.set("k", "v")
        assert (rank, world, store.get("k")) == (1, 2, b"v")
        import subprocess

        found = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
        outside = [a for a in found if "." in a and not a.startswith("127.")]
        for address in outside:  # the machine's other addresses: nothing listens there
            with socket.socket() as probe:
                probe.settimeout(2)
                assert probe.connect_ex((address, port)) != 0, address
    with socket.socket() as probe:  # and the store is gone with the launch
        assert probe.connect_ex(("127.0.0.1", port)) != 0


def test_compare_output_named_after_an_experiment_stays_under_compare(tmp_path):
    from hyperofa_dist.compare.stage import output_dir_of
    from hyperofa_dist.config import load_config

    for experiment in ("..", ".", "../../x", "a/../.."):
        out = output_dir_of(load_config(None, [f"run.dir={tmp_path}", f"compare.experiment={experiment}"]))
        assert out.parent == tmp_path.resolve() / "compare" and out.name not in ("", ".", ".."), (experiment, out)
