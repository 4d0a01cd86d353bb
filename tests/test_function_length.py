"""Stage shells and DeepSpeed job files stay short: no function over 80 lines (issue 23). What is long is the
pure code they call, which has its own tests."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 80


def shells_and_job_files() -> list[str]:
    """Every stage.py, and every module a DeepSpeed launch runs (it hands `job_main` its rank's work)."""
    found = set()
    for package in ("hyperofa_dist", "data_prep"):
        for path in (ROOT / package).rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            if path.name == "stage.py" or ("job_main(" in text and "def job_main(" not in text):
                found.add(path.relative_to(ROOT).as_posix())
    return sorted(found)


def long_functions(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [f"{node.name} ({node.end_lineno - node.lineno + 1} lines, line {node.lineno})"
            for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > LIMIT]


def test_the_files_checked_include_both_deepspeed_jobs_and_their_stages():
    files = shells_and_job_files()
    assert {"hyperofa_dist/hypernet/train.py", "hyperofa_dist/pretrain/train.py", "hyperofa_dist/hypernet/stage.py",
            "hyperofa_dist/pretrain/stage.py", "hyperofa_dist/bench/hypernet.py"} <= set(files)
    assert {"data_prep/prepare/stage.py", "data_prep/mapping/stage.py", "hyperofa_dist/init/stage.py",
            "hyperofa_dist/evaluate/stage.py"} <= set(files)


@pytest.mark.parametrize("name", shells_and_job_files())
def test_no_function_over_80_lines(name):
    assert long_functions(ROOT / name) == []
