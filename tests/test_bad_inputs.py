"""Careless inputs of issue 24 (docs/BAD_INPUTS.md lists every case and where it is tested): each is one line on
stderr and exit status 2 before any work, with nothing written that looks finished, or a documented behaviour.

Every case here runs in this process on generated data (seconds); the DeepSpeed and pipeline cases are in
test_hypernet_job.py and test_pipeline.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from hyperofa_dist import cli
from hyperofa_dist.config import load_config
from hyperofa_dist.errors import HyperofaError
from hyperofa_dist.formats.corpus import sample_text
from hyperofa_dist.formats.files import output_file
from hyperofa_dist.formats.rundir import MANIFEST, Stage
from hyperofa_dist.formats.shards import prepare_bytes
from hyperofa_dist.formats.tokenizer import load_tokenizer
from hyperofa_dist.runtime.stage import StageShell
from hyperofa_dist.tracking import NullTracker


def run_main(capsys, argv: list[str]) -> subprocess.CompletedProcess:
    capsys.readouterr()
    code = cli.main(argv)
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, captured.out, captured.err)


def nothing_written(root: Path) -> None:
    assert not root.exists() or not list(root.rglob(MANIFEST)), list(root.rglob(MANIFEST))


@pytest.mark.parametrize(
    "override, needle",
    [
        ("hypernet.lr=.inf", "config key hypernet.lr: Input should be a finite number (got inf)"),
        ("hypernet.lr=.nan", "config key hypernet.lr: Input should be a finite number (got nan)"),
        ("hypernet.temperature=.inf", "config key hypernet.temperature: Input should be a finite number"),
        ("pretrain.betas=[0.9, .inf]", "config key pretrain.betas.1: Input should be a finite number"),
        ("pretrain.language_weights={qaa_Latn: .nan}", "config key pretrain.language_weights.qaa_Latn: Input should"),
        ("mapping.split=[0.8, 0.1, .inf]", "config key mapping.split.2: Input should be a finite number"),
        ("hypernet.lr=!env LR", "value: not valid YAML (could not determine a constructor for the tag '!env')"),
        ("run.seed=!!python/name:os.system", "not valid YAML (could not determine a constructor for the tag"),
        ("run.seed=!!python/object/apply:os.system [echo]", "not valid YAML (could not determine a constructor"),
    ],
)
def test_non_finite_numbers_and_yaml_tags_are_refused_before_work(capsys, one_line_error, tmp_path, override, needle):
    out = run_main(capsys, ["hypernet", f"run.dir={tmp_path / 'run'}", override])
    one_line_error(out, "hypernet", needle)
    assert not (tmp_path / "run").exists()


def test_a_tag_in_a_config_file_is_one_line(capsys, one_line_error, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("hypernet:\n  lr: !env HYPERNET_LR\n")
    out = run_main(capsys, ["hypernet", "--config", str(path), f"run.dir={tmp_path / 'run'}"])
    one_line_error(out, "hypernet", f"{path}: not valid YAML (could not determine a constructor for the tag '!env')")
    assert not (tmp_path / "run").exists()


def test_a_symlink_loop_as_run_dir_is_one_line(capsys, one_line_error, tmp_path):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    out = run_main(capsys, ["mapping", f"run.dir={tmp_path / 'loop' / 'run'}"])
    one_line_error(out, "mapping", "config key run.dir: cannot be resolved (Symlink loop from")


@pytest.mark.parametrize("where", ["mapping", "init"])
def test_a_file_where_a_stage_directory_belongs_is_refused_before_the_stage_runs(tmp_path, where):
    (tmp_path / where).write_text("not a directory\n")
    stage = Stage(tmp_path, "mapping" if where == "mapping" else "init/ofa")
    config = load_config(None, [f"run.dir={tmp_path}", "tracking.enabled=false"])
    with pytest.raises(HyperofaError, match=f"{tmp_path / where}: exists and is not a directory; stage x writes"):
        with StageShell.open(config, NullTracker(), "x", stage, {"config": {}, "a": 1}):
            pytest.fail("the stage body must not run")
    assert (tmp_path / where).read_text() == "not a directory\n"
    assert not list(tmp_path.glob(".*.lock"))


def test_an_output_file_that_cannot_be_written_is_refused_first(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(HyperofaError, match=f"{tmp_path}: is a directory; evaluate.output names the file to write"):
        output_file(tmp_path, "evaluate.output")
    with pytest.raises(HyperofaError, match=f"{tmp_path / 'file'}: not a directory.*evaluate.output"):
        output_file(tmp_path / "file" / "results.json", "evaluate.output")
    output_file(tmp_path / "new" / "results.json", "evaluate.output")  # a new directory is fine
    output_file(tmp_path / "file", "evaluate.output")  # and so is replacing a file


def test_a_whitespace_only_corpus_file_counts_as_empty_in_the_size_estimate(tmp_path, source_tokenizers):
    """prepare's estimate (the IndexError of issue 24): the file adds nothing, as an empty one; prepare then skips
    the language with a note, as it does an empty file."""
    (tmp_path / "qaa_Latn.txt").write_text("  \n\t\n \r\n")
    (tmp_path / "qab_Cyrl.txt").write_text("")
    (tmp_path / "qac_Latn.txt").write_text("one sentence here\nand another one\n" * 50)
    tokenizer = load_tokenizer(source_tokenizers["xlmr"])
    config = load_config(None, [])
    samples = {p.stem: [sample_text(p)] for p in sorted(tmp_path.glob("*.txt"))}
    alone = prepare_bytes({"qac_Latn": samples["qac_Latn"]}, tokenizer, config)
    assert alone > 0
    assert prepare_bytes(samples, tokenizer, config) == alone


def test_tokenizer_stage_refuses_a_source_tokenizer_that_is_not_the_models(
    capsys, one_line_error, tmp_path, small_corpus, source_tokenizers
):
    """3,500 tokens against 1,000 embedding rows in issue 24: refused by the tokenizer stage, before a target
    tokenizer is built, with the words mapping would have used later."""
    model = tmp_path / "model"
    shutil.copytree(source_tokenizers["xlmr"], model)
    size = len(load_tokenizer(model))
    config = {"architectures": ["XLMRobertaForMaskedLM"], "model_type": "xlm-roberta", "vocab_size": size // 2}
    (model / "config.json").write_text(json.dumps(config))
    run_dir = tmp_path / "run"
    argv = ["tokenizer", f"run.dir={run_dir}", f"source.model={model}", f"corpus.path={small_corpus}",
            "tracking.enabled=false", "tokenizer.new_tokens=50", "tokenizer.sentences_per_language=200"]
    out = run_main(capsys, argv)
    one_line_error(out, "tokenizer", f"source tokenizer has {size} tokens but the model {model} has {size // 2} "
                   "embedding rows; they must be the same (source.model)")
    assert not (run_dir / "tokenizer").exists()
    nothing_written(run_dir)


def test_inputs_named_by_location_are_identified_by_content(tmp_path, monkeypatch):
    """Needless rebuilds of issue 24: the path string of an input is no part of a stage's fingerprint, the content
    found there is, so the same model copied elsewhere, or spelled relative or absolute, is the same input."""
    from hyperofa_dist.formats.models import model_identity, source_identity

    first, second = tmp_path / "a" / "model", tmp_path / "b" / "renamed"
    first.mkdir(parents=True)
    (first / "config.json").write_text('{"vocab_size": 10}')
    (first / "model.safetensors").write_bytes(b"weights")
    shutil.copytree(first, second)
    monkeypatch.chdir(tmp_path)
    spellings = [str(first), "a/model", "./a/../a/model", str(second)]
    configs = [load_config(None, [f"source.model={s}", f"corpus.path={s}", f"evaluate.data_dir={s}"]) for s in spellings]
    assert len({json.dumps(c.fingerprint("source", "corpus", "evaluate"), sort_keys=True) for c in configs}) == 1
    assert len({json.dumps(source_identity(c), sort_keys=True) for c in configs}) == 1
    assert set(model_identity(str(first))) == {"model_files"}  # hashes only, no path
    assert model_identity("xlm-roberta-base") == {"model": "xlm-roberta-base"}  # a hub model by its name
    (second / "model.safetensors").write_bytes(b"other weights")
    assert model_identity(str(second)) != model_identity(str(first))
    assert load_config(None, ["corpus.format=hub"]).fingerprint("corpus") != configs[0].fingerprint("corpus")


def test_a_module_entry_point_turns_a_bad_input_into_one_line_and_exit_2(capsys):
    """`python -m hyperofa_dist.bench.sweep` (and pretrain/export.py) print a HyperofaError as one line, exit 2."""
    from hyperofa_dist.bench import sweep
    from hyperofa_dist.errors import exit_status

    assert sweep.main(["--dry-run", "pretrain.no_such_key=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pretrain-sweep: error: ") and "pretrain.no_such_key" in err[0], err

    def bad() -> None:
        raise HyperofaError("x.bin: truncated")

    assert exit_status("export", bad) == 2 and capsys.readouterr().err == "export: error: x.bin: truncated\n"
    assert exit_status("export", lambda: None) == 0
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        exit_status("export", lambda: 1 / 0)
