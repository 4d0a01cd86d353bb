import subprocess
import sys


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "hyperofa_dist.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_help_lists_commands():
    out = run_cli("--help")
    assert out.returncode == 0
    for command in ("tokenizer", "prepare", "bench"):
        assert command in out.stdout


def test_unknown_config_key_is_one_line_and_exit_2(tmp_path):
    out = run_cli("prepare", f"run.dir={tmp_path}", "prepare.no_such_key=1")
    assert out.returncode == 2
    assert out.stderr.strip() == "hyperofa prepare: error: config key prepare.no_such_key does not exist"
    assert not any(tmp_path.iterdir())
