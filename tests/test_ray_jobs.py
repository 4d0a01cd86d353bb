"""`launch/prepare_ray_submit.sh` (runtime/ray_jobs.py): what is submitted to a Ray cluster, planned on the driver."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hyperofa_dist.errors import HyperofaError
from hyperofa_dist.runtime.ray_jobs import UPLOAD_EXCLUDES, check_inputs, plan_submissions

REPO = Path(__file__).resolve().parents[1]


def _entrypoint(command: list[str]) -> list[str]:
    return command[command.index("--") + 1:]


def test_only_the_ray_stages_are_submitted_with_absolute_paths_and_no_data_upload(tmp_path):
    (tmp_path / "corpus").mkdir()
    config = tmp_path / "run.yaml"
    config.write_text("run:\n  dir: runs/x\ncorpus:\n  path: corpus\ntokenizer:\n  path: models/glot500-base\n")
    resolved, jobs = plan_submissions(config, ["vectors.path=vectors/v.wv", "corpus.path=corpus"],
                                      "http://127.0.0.1:8265", working_dir=tmp_path, cwd=tmp_path)
    assert [job.stage for job in jobs] == ["prepare", "mapping"]  # tokenizer and vectors use no Ray
    for job in jobs:
        command = job.command
        assert command[1:5] == ["job", "submit", "--address", "http://127.0.0.1:8265"]
        env = json.loads(command[command.index("--runtime-env-json") + 1])
        assert env["working_dir"] == str(tmp_path) and set(env["excludes"]) == set(UPLOAD_EXCLUDES)
        assert set(env) == {"working_dir", "excludes"}  # env_vars would clash with the stage's own ray.init
        assert {"runs/", "models/", "vectors/", ".venv/", ".git/"} <= set(env["excludes"])
        entry = _entrypoint(command)
        assert entry[:6] == ["python", "-m", "hyperofa_dist.cli", job.stage, "--config", "run.yaml"]
        # the user's relative corpus.path is replaced, not repeated; paths that do not exist here stay as written
        assert entry[6:] == ["vectors.path=vectors/v.wv", "ray.address=auto",
                             f"run.dir={json.dumps(str(tmp_path / 'runs' / 'x'))}",
                             f"corpus.path={json.dumps(str(tmp_path / 'corpus'))}"]
    assert resolved.run.dir == str(tmp_path / "runs" / "x") and resolved.ray.address == "auto"
    # a config outside the uploaded directory is named by its absolute path (shared storage)
    _, jobs = plan_submissions(config, ["ray.address=head:6379"], "http://h:8265", working_dir=REPO, cwd=tmp_path)
    entry = _entrypoint(jobs[0].command)
    assert entry[5] == str(config) and "ray.address=auto" not in entry and "ray.address=head:6379" in entry


def test_missing_inputs_of_the_ray_stages_are_one_line_before_submitting(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"run:\n  dir: {tmp_path / 'run'}\n")
    resolved, _ = plan_submissions(config, [], "http://127.0.0.1:8265", working_dir=tmp_path, cwd=tmp_path)
    with pytest.raises(HyperofaError, match=r"run/tokenizer: no target tokenizer .*run `hyperofa tokenizer` first"):
        check_inputs(resolved)


def test_the_script_prints_the_submissions_from_a_checkout(tmp_path):
    (tmp_path / "tok").mkdir()
    shutil.copy(REPO / "hyperofa_dist" / "configs" / "demo.yaml", tmp_path / "demo.yaml")
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    (tmp_path / "v.kv").write_bytes(b"x")
    out = subprocess.run(["bash", str(REPO / "launch" / "prepare_ray_submit.sh"), "demo.yaml", "http://127.0.0.1:8265",
                          "tokenizer.path=tok", "vectors.path=v.kv", "--print"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO), "PYTHON": sys.executable})
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert len(lines) == 2 and " -- python -m hyperofa_dist.cli prepare --config demo.yaml " in lines[0]
    assert " -- python -m hyperofa_dist.cli mapping " in lines[1]
    assert f"run.dir={tmp_path / 'runs' / 'demo'}" in out.stdout.replace('"', "").replace("'", "")
