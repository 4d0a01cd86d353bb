"""Stages never import each other: what two stages share lives in `models/`, `method/`, `formats/`, `runtime/` or a
top-level module. A stage package is a package with a `stage.py` (runtime/'s is the shell every stage uses, not a
stage). Every import counts: absolute, relative, and those inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP_PACKAGES = ("hyperofa_dist", "data_prep")
NOT_STAGES = {"hyperofa_dist.runtime"}


def stage_packages(root: Path) -> set[str]:
    found = set()
    for top in TOP_PACKAGES:
        for stage in (root / top).rglob("stage.py"):
            name = ".".join(stage.parent.relative_to(root).parts)
            if name not in NOT_STAGES:
                found.add(name)
    return found


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path, root: Path) -> list[str]:
    """Every module (or package attribute that may be a module) the file imports, as absolute dotted names."""
    module = module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.append(base)
            names += [f"{base}.{alias.name}" for alias in node.names]  # `from .. import init` names a package
    return names


def stage_of(name: str, stages: set[str]) -> str | None:
    return next((s for s in stages if name == s or name.startswith(s + ".")), None)


def cross_stage_imports(root: Path) -> list[str]:
    stages = stage_packages(root)
    problems = []
    for top in TOP_PACKAGES:
        for path in sorted((root / top).rglob("*.py")):
            own = stage_of(module_name(path, root), stages)
            if own is None:
                continue
            for other in sorted({stage_of(n, stages) for n in imported_names(path, root)} - {None, own}):
                problems.append(f"{path.relative_to(root)} imports stage {other}")
    return problems


def test_no_stage_imports_another_stage():
    problems = cross_stage_imports(ROOT)
    assert not problems, "\n".join(problems)


def test_the_stage_list_is_what_the_tree_holds():
    stages = stage_packages(ROOT)
    assert {"hyperofa_dist.init", "hyperofa_dist.pretrain", "hyperofa_dist.evaluate", "hyperofa_dist.tune",
            "hyperofa_dist.hypernet", "data_prep.prepare", "data_prep.mapping"} <= stages
    assert not stages & {"hyperofa_dist.models", "hyperofa_dist.method", "hyperofa_dist.runtime"}


def test_every_kind_of_import_between_stages_is_found(tmp_path):
    """The walker on a made-up tree: relative, function-local, package-attribute and absolute imports are all
    caught and named; imports of the stage's own modules and of non-stage packages are not."""
    files = {
        "hyperofa_dist/__init__.py": "",
        "hyperofa_dist/models/__init__.py": "",
        "hyperofa_dist/models/mlm.py": "",
        "hyperofa_dist/alpha/__init__.py": "",
        "hyperofa_dist/alpha/stage.py": "from . import core\nfrom ..models import mlm\n",
        "hyperofa_dist/alpha/core.py": "def f():\n    from ..beta.core import g\n",
        "hyperofa_dist/alpha/more.py": "from .. import gamma\nimport hyperofa_dist.beta\n",
        "hyperofa_dist/beta/__init__.py": "",
        "hyperofa_dist/beta/stage.py": "",
        "hyperofa_dist/beta/core.py": "",
        "hyperofa_dist/gamma/__init__.py": "",
        "hyperofa_dist/gamma/stage.py": "",
        "hyperofa_dist/runtime/__init__.py": "",
        "hyperofa_dist/runtime/stage.py": "",
        "data_prep/__init__.py": "",
        "data_prep/delta/__init__.py": "",
        "data_prep/delta/stage.py": "from hyperofa_dist.runtime import stage\nfrom hyperofa_dist.alpha.core import f\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cross_stage_imports(tmp_path) == [
        "hyperofa_dist/alpha/core.py imports stage hyperofa_dist.beta",
        "hyperofa_dist/alpha/more.py imports stage hyperofa_dist.beta",
        "hyperofa_dist/alpha/more.py imports stage hyperofa_dist.gamma",
        "data_prep/delta/stage.py imports stage hyperofa_dist.alpha",
    ]
