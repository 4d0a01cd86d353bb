"""The config as users write it (issue 15, cases 3, 6 and 7): `5e-5`-style numbers are floats on the command line
and in YAML, a YAML key written twice is refused naming the key and the file, and a tracking URI whose scheme
MLflow does not accept is refused when the config is read; each refusal is one line, exit 2, nothing written."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hyperofa_dist import cli
from hyperofa_dist.config import load_config
from hyperofa_dist.errors import HyperofaError


def run_main(capsys, argv: list[str]) -> subprocess.CompletedProcess:
    """`hyperofa <argv>` in this process, as a CompletedProcess for the `one_line_error` check."""
    capsys.readouterr()
    code = cli.main(argv)
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, captured.out, captured.err)


# --- case 7: numbers as the docs spell them; case 3: duplicate YAML keys ------------------------------------


def test_exponent_floats_parse_on_the_command_line_and_in_yaml_and_ints_stay_ints(tmp_path):
    config = load_config(None, ["pretrain.lr=5e-5", "pretrain.eps=1e-08", "hypernet.lr=1E-4", "prepare.block_size=64"])
    assert (config.pretrain.lr, config.pretrain.eps, config.hypernet.lr) == (5e-5, 1e-8, 1e-4)
    assert type(config.prepare.block_size) is int and config.prepare.block_size == 64
    path = tmp_path / "c.yaml"
    path.write_text("pretrain:\n  lr: 5e-5\n  eps: 1e-08\n  steps: 10\n  betas: [0.9, 9.99e-1]\nrun:\n  seed: 7\n")
    config = load_config(path)
    assert (config.pretrain.lr, config.pretrain.eps, config.pretrain.betas) == (5e-5, 1e-8, [0.9, 0.999])
    assert type(config.pretrain.steps) is int and type(config.run.seed) is int
    # an exponent is a float, so an integer key still refuses it (strict types), naming the key
    with pytest.raises(HyperofaError, match="config key pretrain.steps: Input should be a valid integer"):
        load_config(None, ["pretrain.steps=1e3"])
    # words and versions stay strings
    assert load_config(None, ["tracking.experiment=e5x"]).tracking.experiment == "e5x"


@pytest.mark.parametrize(
    "text, key, lines",
    [
        ("prepare:\n  block_size: 64\n  sampling:\n    alpha: 0.2\n  block_size: 128\n", "prepare.block_size", "2 and 5"),
        ("run: {seed: 1}\nrun:\n  seed: 2\n", "run", "1 and 2"),
        ("prepare:\n  sampling:\n    alpha: 0.2\n    alpha: 0.3\n", "prepare.sampling.alpha", "3 and 4"),
    ],
)
def test_duplicate_yaml_keys_are_refused_naming_the_key_and_the_file(tmp_path, capsys, one_line_error, text, key, lines):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    out = run_main(capsys, ["prepare", "--config", str(path), f"run.dir={tmp_path / 'run'}"])
    one_line_error(out, "prepare", str(path), f"key {key} appears twice (lines {lines})")
    assert not (tmp_path / "run").exists()


# --- case 6: the tracking URI's scheme ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "uri, message",
    [
        ("foo://bar", "scheme 'foo' is not an MLflow tracking store"),
        ("http://", "needs a host"),
        ("sqlite://relative.db", "sqlite:///<path"),
    ],
)
def test_bad_tracking_uri_is_refused_when_the_config_is_read(tmp_path, capsys, one_line_error, uri, message):
    out = run_main(capsys, ["tokenizer", f"run.dir={tmp_path / 'run'}", f"tracking.tracking_uri={uri}"])
    one_line_error(out, "tokenizer", "config key tracking.tracking_uri", message)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "uri",
    ["file:///tmp/mlruns", "/tmp/mlruns", "mlruns", "sqlite:////tmp/x/mlflow.db", "sqlite:///mlflow.db",
     "http://mlflow-host:5000", "https://mlflow.example.org", "postgresql+psycopg2://u:p@db/mlflow",
     "mysql://u@db/mlflow", "databricks", "databricks://profile"],
)
def test_tracking_uris_mlflow_accepts_are_accepted(uri):
    assert load_config(None, [f"tracking.tracking_uri={uri}"]).tracking.tracking_uri == uri


def test_tracking_uri_foo_fails_in_one_line_as_a_command(tmp_path, one_line_error):
    """Before: 41 lines ending in MLflow's UnsupportedModelRegistryStoreURIException, exit 1."""
    out = subprocess.run([sys.executable, "-m", "hyperofa_dist.cli", "tokenizer", f"run.dir={tmp_path / 'run'}",
                          "tracking.tracking_uri=foo://bar"], capture_output=True, text=True, timeout=120)
    one_line_error(out, "tokenizer", "tracking.tracking_uri", "'foo'")
