"""`hyperofa pipeline --dry-run`: every packaged config passes on generated stand-ins of its inputs; bad inputs are
all named at once, one line each, exit 2, and nothing is written."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hyperofa_dist.config import PACKAGED_CONFIGS, load_config
from hyperofa_dist.dryrun import dry_run
from hyperofa_dist.pretrain.stage import batch_plan
from hyperofa_dist.runtime.launch import planned_world_size
from hyperofa_dist.synthetic.standins import build_standins
from hyperofa_dist.synthetic.world import read_lines, train_source_tokenizer

# The source family each packaged config names (a new packaged config must be added here, and so gets checked).
FAMILIES = {"demo": "xlmr", "demo-causal": "llama", "xlmr-glot500": "xlmr", "roberta-glot500": "roberta",
            "llama3.2-1b-glot500": "llama", "llama3-8b-glot500": "llama"}


def test_every_packaged_config_is_covered():
    assert {p.stem for p in PACKAGED_CONFIGS.glob("*.yaml")} == set(FAMILIES)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_packaged_config_passes_the_dry_run_on_standins(name, tmp_path, capsys):
    path = PACKAGED_CONFIGS / f"{name}.yaml"
    overrides = build_standins(tmp_path, load_config(path), FAMILIES[name])
    assert all(key.split("=")[0] in ("source.model", "corpus.path", "corpus.format", "run.dir", "tokenizer.path",
                                     "vectors.path", "evaluate.data_dir") for key in overrides)
    config = load_config(path, overrides)
    assert dry_run(config) == 0
    out = capsys.readouterr().out
    world = planned_world_size(config.pretrain, "pretrain")
    accum, global_batch = batch_plan(config, world)
    assert (f"{global_batch} sequences per optimizer step ({config.pretrain.micro_batch_size} per micro-batch x "
            f"{accum} micro-batches x {world} ranks)") in out
    for method in config.pipeline.methods:  # every step, with where it writes
        assert f"pretrain/{method}" in out and f"-> init/{method}/" in out and f"evaluate/{method}@0" in out
    if config.corpus.languages:
        assert f"{len(config.corpus.languages)} languages" in out
    assert not config.run_dir.exists()  # nothing written


def test_dry_run_names_every_problem_at_once_and_writes_nothing(tmp_path):
    path = PACKAGED_CONFIGS / "xlmr-glot500.yaml"
    overrides = build_standins(tmp_path, load_config(path), "xlmr")
    # a tokenizer made for another model (a Greek-only WordPiece), evaluation data that is not there, and a language
    # code the corpus does not have (Korean as kor_Kore; the corpus has kor_Hang)
    other = train_source_tokenizer("bert", read_lines(tmp_path / "corpus" / "ell_Grek.txt"), 300, tmp_path / "other")
    languages = [code.replace("kor_Hang", "kor_Kore") for code in load_config(path).corpus.languages]
    bad = [*overrides, f"tokenizer.path={other}", f"evaluate.data_dir={tmp_path / 'no-eval'}",
           f"corpus.languages=[{', '.join(languages)}]"]
    out = subprocess.run([sys.executable, "-m", "hyperofa_dist.cli", "pipeline", "--dry-run", "--config", str(path),
                          *bad], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    errors = [line for line in out.stderr.splitlines() if line.startswith("hyperofa pipeline --dry-run: ")]
    assert out.returncode == 2 and out.stdout == "", out.stderr[-2000:]
    assert len(errors) == 4 and errors[-1].endswith("3 problem(s); nothing was run or written"), errors
    assert "requested language(s) not found: kor_Kore" in errors[0]
    assert f"{other}: the target tokenizer has 0.0% of the source tokenizer's pieces" in errors[1]
    assert f"{tmp_path / 'no-eval'}: evaluate.data_dir not found (tasks srt, srb, pos, ner)" in errors[2]
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob("mlflow*"))
