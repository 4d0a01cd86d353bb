"""`hyperofa prepare` through the CLI: fatal bad input (one line, exit 2, no shard), counted skips, MLflow runs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hyperofa_dist import synthetic

COMMON = [
    "prepare.block_size=32",
    "prepare.blocks_per_sample=2",
    "prepare.chunk_bytes=8192",
    "prepare.heldout_fraction=0.1",
]


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "hyperofa_dist.cli", "prepare", *args], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def cli_tokenizer(tmp_path_factory, small_corpus) -> Path:
    texts = [line for path in sorted(small_corpus.iterdir()) for line in synthetic.read_lines(path)]
    return synthetic.train_source_tokenizer("bert", texts, 500, tmp_path_factory.mktemp("cli_tok") / "tok")


@pytest.fixture
def assert_fatal(one_line_error):
    def check(out: subprocess.CompletedProcess, run_dir: Path, *needles: str) -> None:
        one_line_error(out, "prepare", *needles)
        assert not list(run_dir.rglob("*.tar")) and not (run_dir / "prepare" / "manifest.json").exists()

    return check


def corpus_copy(small_corpus: Path, dest: Path, langs=("qac_Latn", "qad_Grek", "qae_Latn")) -> Path:
    dest.mkdir()
    for lang in langs:
        shutil.copy(small_corpus / f"{lang}.txt", dest)
    return dest


def test_missing_corpus_directory_is_fatal(tmp_path, cli_tokenizer, assert_fatal):
    missing = tmp_path / "no_such_corpus"
    out = run_cli(f"run.dir={tmp_path / 'run'}", f"corpus.path={missing}", f"tokenizer.path={cli_tokenizer}",
                  "tracking.enabled=false", *COMMON)
    assert_fatal(out, tmp_path, str(missing), "corpus directory not found")


def test_file_name_that_is_not_a_lang_script_code_is_fatal(tmp_path, small_corpus, cli_tokenizer, assert_fatal):
    corpus = corpus_copy(small_corpus, tmp_path / "corpus")
    (corpus / "english.txt").write_text("Hello there.\n")
    out = run_cli(f"run.dir={tmp_path / 'run'}", f"corpus.path={corpus}", f"tokenizer.path={cli_tokenizer}",
                  "tracking.enabled=false", *COMMON)
    assert_fatal(out, tmp_path, "english.txt", "not a lang_Script code")


def test_missing_tokenizer_is_fatal(tmp_path, small_corpus, assert_fatal):
    corpus = corpus_copy(small_corpus, tmp_path / "corpus")
    out = run_cli(f"run.dir={tmp_path / 'run'}", f"corpus.path={corpus}", "tracking.enabled=false", *COMMON)
    assert_fatal(out, tmp_path, str(tmp_path / "run" / "tokenizer"), "no target tokenizer")


def test_config_key_that_does_not_exist_is_fatal(tmp_path, small_corpus, cli_tokenizer, assert_fatal):
    out = run_cli(f"run.dir={tmp_path / 'run'}", f"corpus.path={small_corpus}", f"tokenizer.path={cli_tokenizer}",
                  "prepare.sampling.temperature=2", *COMMON)
    assert_fatal(out, tmp_path, "config key prepare.sampling.temperature does not exist")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_empty_file_is_a_counted_skip_invalid_utf8_is_replaced_and_mlflow_finds_the_stage(
    tmp_path, small_corpus, cli_tokenizer
):
    import mlflow

    corpus = corpus_copy(small_corpus, tmp_path / "corpus")
    (corpus / "qag_Latn.txt").write_bytes(b"")
    good = (small_corpus / "qac_Latn.txt").read_bytes().splitlines()[:60]
    bad = [line + b" \xff\xfe" if i % 6 == 0 else line for i, line in enumerate(good)]
    (corpus / "qah_Latn.txt").write_bytes(b"\n".join(bad[:30] + [b"", b"   "] + bad[30:]) + b"\n")
    run_dir = tmp_path / "run"
    out = run_cli(f"run.dir={run_dir}", f"corpus.path={corpus}", f"tokenizer.path={cli_tokenizer}", *COMMON)
    assert out.returncode == 0, out.stderr
    assert "skipped language qag_Latn (empty file)" in out.stderr
    manifest = json.loads((run_dir / "prepare" / "manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["skipped_languages"] == {"qag_Latn": "empty file"}
    assert counts["languages"]["qag_Latn"]["lines"] == 0 and not list((run_dir / "prepare").rglob("qag_Latn*"))
    hah = counts["languages"]["qah_Latn"]
    assert (hah["lines"], hah["empty"], hah["invalid_utf8"], hah["sentences"]) == (62, 2, 10, 60)
    assert hah["train_blocks"] > 0

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{run_dir / 'mlflow.db'}")
    try:
        runs = mlflow.search_runs(experiment_names=["hyperofa"], filter_string="tags.`hyperofa.stage` = 'prepare'")
        parents = mlflow.search_runs(experiment_names=["hyperofa"], filter_string="tags.`hyperofa.command` = 'prepare'")
    finally:
        mlflow.set_tracking_uri(previous)
    assert len(runs) == 1 and len(parents) == 1
    stage_run = runs.iloc[0]
    assert stage_run["status"] == "FINISHED"
    assert stage_run["tags.mlflow.parentRunId"] == parents.iloc[0]["run_id"]
    assert stage_run["params.prepare.block_size"] == "32" and stage_run["params.corpus.path"] == str(corpus)
    for lang, stats in counts["languages"].items():
        for key in ("train_tokens", "train_blocks", "heldout_sentences", "invalid_utf8", "train_tokens_lost"):
            assert stage_run[f"metrics.{lang}/{key}"] == stats[key], (lang, key)
    assert stage_run["metrics.total/train_blocks"] == counts["totals"]["train_blocks"]
    assert stage_run["tags.hyperofa.skipped_languages"] == "qag_Latn"


def test_hub_corpus_offline_is_fatal(tmp_path, cli_tokenizer, assert_fatal):
    out = run_cli(f"run.dir={tmp_path / 'run'}", "corpus.format=hub", "corpus.languages=[qaa_Latn]",
                  "corpus.revision=refs/convert/parquet", f"tokenizer.path={cli_tokenizer}", "tracking.enabled=false",
                  *COMMON)
    assert_fatal(out, tmp_path, "cis-lmu/Glot500@refs/convert/parquet", "cannot reach")

