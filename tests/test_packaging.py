"""The wheel carries what an installed package reads at run time: the DeepSpeed templates (kept at the top of the
repository, copied in by setup.py) and the packaged configs; from an unpacked wheel they resolve inside it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_wheel_ships_the_templates_and_configs_and_they_resolve_when_installed(tmp_path):
    if not (REPO / ".git").exists():
        pytest.skip("needs a git checkout to list the project's files")
    tracked = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True,
                             capture_output=True, text=True).stdout.splitlines()
    src = tmp_path / "src"  # the working tree's files only: no build/ or egg-info of an earlier install
    for name in tracked:
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("hyperofa_dist-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    templates = {f"hyperofa_dist/ds_configs/{p.name}" for p in (REPO / "ds_configs").glob("*.json")}
    configs = {f"hyperofa_dist/configs/{p.name}" for p in (REPO / "hyperofa_dist" / "configs").glob("*.yaml")}
    assert len(templates) >= 6 and templates <= names
    assert len(configs) >= 6 and configs <= names

    site = tmp_path / "site"  # an install is the wheel unpacked into site-packages
    zipfile.ZipFile(wheel).extractall(site)
    probe = ("import hyperofa_dist.runtime.dsconfig as d, hyperofa_dist.config as c; "
             "from hyperofa_dist.config import load_config; "
             "print(d.templates_dir()); print(d.load_template('zero3-offload')[1]); "
             "print(load_config(c.PACKAGED_CONFIGS / 'xlmr-glot500.yaml').pretrain.global_batch_size)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(site)}).stdout.split()
    assert out == [str(site / "hyperofa_dist" / "ds_configs"), str(site / "hyperofa_dist" / "ds_configs" /
                   "zero3-offload.json"), "512"]
