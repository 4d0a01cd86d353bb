"""The one command registry: every entry resolves to a function, the CLI and the pipeline take their stages from
it, and the core package does not import the Ray preparation package."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from hyperofa_dist import registry
from hyperofa_dist.cli import build_parser
from hyperofa_dist.config import load_config
from hyperofa_dist.pipeline import plan

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("entry", registry.COMMANDS + registry.BENCHES, ids=lambda e: e.target)
def test_every_entry_resolves_to_a_two_argument_function(entry):
    function = entry.load()
    assert callable(function) and len(inspect.signature(function).parameters) == 2


def test_cli_offers_exactly_the_registered_commands():
    parser = build_parser()
    choices = next(a for a in parser._actions if a.dest == "command").choices
    assert set(choices) == {e.name for e in registry.COMMANDS} | {"bench", "docs"}  # not registry entries
    benches = next(a for a in choices["bench"]._actions if a.dest == "bench").choices
    assert set(benches) == {e.name for e in registry.BENCHES}


def test_pipeline_steps_are_registry_commands():
    steps = plan(load_config(None, ["run.dir=/tmp/unused"]))
    assert [s.label for s in steps][:4] == ["tokenizer", "prepare", "vectors", "mapping"]
    assert all(s.command is registry.command(s.command.name) for s in steps)


def test_the_core_package_never_imports_data_prep():
    for path in (ROOT / "hyperofa_dist").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            )
            assert not any(n == "data_prep" or n.startswith("data_prep.") for n in names), path
