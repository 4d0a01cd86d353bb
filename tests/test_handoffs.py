"""Typed hand-offs between stages (issue 23 item 3/4): prepare's manifest read once as a ShardSet, one shape of
every stage's inputs, the results table's and compare's format modules, the init methods table. Fast: no model,
no Ray, no MLflow."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import json
import typing
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from hyperofa_dist.config import InitConfig, load_config
from hyperofa_dist.errors import HyperofaError
from hyperofa_dist.formats import comparison, summary
from hyperofa_dist.formats.hypernet import stage_of as hypernet_stage
from hyperofa_dist.formats.hypernet import write_predictions
from hyperofa_dist.formats.rundir import MANIFEST, Stage
from hyperofa_dist.formats.shards import ShardSet, find_shardset, load_shardset
from hyperofa_dist.method import assemble as asm
from hyperofa_dist.init.methods import METHODS, MethodContext
from hyperofa_dist.registry import COMMANDS
from hyperofa_dist.runtime.stage import StageShell
from hyperofa_dist.tracking import NullTracker

SHA = "ab" * 32


# --- prepare's manifest -> ShardSet -----------------------------------------------------------------------------


def write_prepare(root: Path, **changes) -> Path:
    """A prepare directory as the prepare stage leaves it: shard files and a manifest; `changes` replace (None:
    remove) top-level keys of the manifest after it is written."""
    out = root / "prepare"
    shards = [("train", "qaa_Latn", 3), ("train", "qaa_Latn", 2), ("train", "qab_Latn", 4), ("heldout", "qaa_Latn", 1)]
    listed = []
    for i, (split, lang, blocks) in enumerate(shards):
        path = f"{split}/{lang}/{lang}-00000-{i:06d}.tar"
        (out / path).parent.mkdir(parents=True, exist_ok=True)
        (out / path).write_bytes(b"x")
        listed.append({"path": path, "split": split, "lang": lang, "chunk": 0, "blocks": blocks})
    Stage(root, "prepare").write_manifest(
        config={}, inputs={"config": {}, "tokenizer": {"tokenizer.json": SHA}}, outputs=[],
        extra={"shards": listed, "block_size": 16, "special_tokens": {"cls": 0, "sep": 2, "pad": 1}},
    )
    manifest = json.loads((out / MANIFEST).read_text())
    for key, value in changes.items():
        if value is None:
            manifest.pop(key)
        else:
            manifest[key] = value
    (out / MANIFEST).write_text(json.dumps(manifest))
    return out


def test_a_prepare_manifest_reads_as_a_frozen_shardset(tmp_path):
    out = write_prepare(tmp_path)
    shards = load_shardset(out)
    assert sorted(shards.train) == ["qaa_Latn", "qab_Latn"] and list(shards.heldout) == ["qaa_Latn"]
    assert [Path(p).name for p in shards.train["qaa_Latn"]] == ["qaa_Latn-00000-000000.tar", "qaa_Latn-00000-000001.tar"]
    assert all(Path(p).is_absolute() for paths in shards.train.values() for p in paths)
    assert shards.blocks == {"qaa_Latn": 5, "qab_Latn": 4}  # training blocks only
    assert shards.block_size == 16 and shards.tokenizer_sha256 == SHA
    assert shards.special_tokens == {"cls": 0, "sep": 2, "pad": 1}
    manifest = json.loads((out / MANIFEST).read_text())
    assert shards.inputs_digest == manifest["inputs_digest"] and shards.manifest_path == out.resolve() / MANIFEST
    with pytest.raises(dataclasses.FrozenInstanceError):
        shards.block_size = 8  # type: ignore[misc]
    assert find_shardset(out) == shards
    assert find_shardset(tmp_path) is None  # a directory without a prepare manifest (a bare directory of shards)


BAD_KEYS = [
    ("shards", {"shards": None}),
    ("shards", {"shards": {"train": []}}),
    ("shards[0]", {"shards": [{"split": "train", "lang": "qaa_Latn"}]}),
    ("shards[0]", {"shards": [{"path": "a.tar", "split": "train", "lang": "qaa_Latn", "blocks": "3"}]}),
    ("inputs.tokenizer", {"inputs": None}),
    ("inputs.tokenizer", {"inputs": {"tokenizer": "abc"}}),
    ("inputs.tokenizer.tokenizer.json", {"inputs": {"tokenizer": {"tokenizer.json": 5}}}),
    ("special_tokens", {"special_tokens": {"cls": "<s>", "sep": 2, "pad": None}}),
    ("special_tokens", {"special_tokens": [0, 2, 1]}),
    ("block_size", {"block_size": None}),
    ("block_size", {"block_size": 0}),
    ("inputs_digest", {"inputs_digest": None}),
]


@pytest.mark.parametrize("key,changes", BAD_KEYS)
def test_a_missing_or_mistyped_manifest_key_is_one_line_naming_the_manifest_and_the_key(tmp_path, key, changes):
    out = write_prepare(tmp_path, **changes)
    with pytest.raises(HyperofaError) as caught:
        load_shardset(out)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{out.resolve() / MANIFEST}: key '{key}'"), message


def test_a_listed_shard_that_is_missing_is_one_line_naming_it(tmp_path):
    out = write_prepare(tmp_path)
    gone = out / "train" / "qab_Latn" / "qab_Latn-00000-000002.tar"
    gone.unlink()
    with pytest.raises(HyperofaError, match=f"^{gone.resolve()}: shard listed in the prepare manifest is missing"):
        load_shardset(out)
    assert find_shardset(out).train["qab_Latn"]  # a reader that does not open the shards is not stopped by it


def test_shards_of_another_tokenizer_are_one_reaction_naming_the_manifest_and_the_key(tmp_path):
    shards = load_shardset(write_prepare(tmp_path))
    shards.require_tokenizer(SHA, "the model's", "re-run prepare")
    with pytest.raises(HyperofaError) as caught:
        shards.require_tokenizer("cd" * 32, "the target tokenizer", "re-run `hyperofa prepare`")
    message = str(caught.value)
    assert message.startswith(f"{shards.manifest_path}: key 'inputs.tokenizer.tokenizer.json': the shards were made "
                              "with another tokenizer than the target tokenizer (sha256 abababababab recorded != "
                              "cdcdcdcdcdcd); re-run `hyperofa prepare`") and "\n" not in message
    unrecorded = load_shardset(write_prepare(tmp_path / "bare", inputs={"config": {}}))
    assert unrecorded.tokenizer_sha256 is None and unrecorded.special_tokens == {"cls": 0, "sep": 2, "pad": 1}
    with pytest.raises(HyperofaError, match=r"key 'inputs.tokenizer.tokenizer.json' is missing"):
        unrecorded.require_tokenizer(SHA, "the model's", "re-run prepare")


def test_a_job_rebuilds_a_shardset_from_its_shard_lists_alone():
    shards = ShardSet({"qaa_Latn": ["/a.tar"]}, {}, {"qaa_Latn": 3})
    assert shards.block_size is None and shards.tokenizer_sha256 is None and shards.special_tokens == {}


# --- one shape of every stage's inputs ---------------------------------------------------------------------------


def _stage_modules() -> list[str]:
    modules = [c.target.split(":")[0] for c in COMMANDS if c.is_stage or c.name == "compare"]
    assert len(modules) >= 10
    return modules


def _fingerprint_call(node: ast.AST) -> bool:
    """`config.fingerprint(...)`, or the same on a config held by another object (`plan.config.fingerprint(...)`)."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "fingerprint"):
        return False
    owner = node.func.value
    return (isinstance(owner, ast.Name) and owner.id == "config") or (
        isinstance(owner, ast.Attribute) and owner.attr == "config")


@pytest.mark.parametrize("module", _stage_modules())
def test_every_registered_stage_puts_its_config_fingerprint_under_config(module):
    """`config.fingerprint(...)` appears in a stage's inputs only as the value of "config", never spread at the top
    level, where a section could shadow an input of the same name (init's `source` did)."""
    tree = ast.parse(inspect.getsource(importlib.import_module(module)))
    keyed = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if _fingerprint_call(value):
                    assert key is not None and isinstance(key, ast.Constant) and key.value == "config", (
                        module, ast.unparse(node)[:120])
                    keyed += 1
    assert keyed == 1, module


def test_a_stage_shell_refuses_inputs_without_the_config_fingerprint(tmp_path):
    config = load_config(None, [f"run.dir={tmp_path}", "tracking.enabled=false"])
    with pytest.raises(TypeError, match=r"stage toy: inputs must hold config.fingerprint\(...\) under 'config'"):
        with StageShell.open(config, NullTracker(), "toy", Stage(tmp_path, "toy"), config.fingerprint("init")):
            pytest.fail("the stage body must not run")
    assert list(tmp_path.iterdir()) == []


def test_fingerprint_takes_one_key_by_its_dotted_name(tmp_path):
    config = load_config(None, [f"run.dir={tmp_path}", f"vectors.train.corpus={tmp_path}", "vectors.train.dim=32"])
    both = config.fingerprint("tokenizer", "prepare.normalization", "vectors.train")
    assert both["tokenizer"] == config.fingerprint("tokenizer")["tokenizer"]
    assert both["prepare.normalization"] == config.prepare.normalization
    assert both["vectors.train"]["dim"] == 32 and "corpus" not in both["vectors.train"]  # a location, not content
    moved = config.with_changes({"vectors.train.corpus": str(tmp_path / "elsewhere")})
    assert moved.fingerprint("vectors.train") == config.fingerprint("vectors.train")
    assert config.with_changes({"vectors.train.dim": 16}).fingerprint("vectors.train") != config.fingerprint("vectors.train")
    for excluded in ("init.device", "source.model", "vectors.train.nope"):  # execution-only, a location, no such key
        with pytest.raises(KeyError, match=excluded):
            config.fingerprint(excluded)


# --- the results table and compare's tables -----------------------------------------------------------------------


ROWS = [
    {"method": "ofa", "srt_top10_step0": 0.5, "mlm_loss_step0": 6.123456, "mlm_loss_final": None},
    {"method": "random", "srt_top10_step0": 0.25, "mlm_loss_step0": 7.0, "mlm_loss_final": 5.5},
]
COLUMNS = ("method", "srt_top10_step0", "mlm_loss_step0", "mlm_loss_final")


def test_the_results_table_is_written_and_read_back_by_its_format_module(tmp_path):
    paths = summary.write_summary(tmp_path, ROWS, COLUMNS)
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == ["results/summary.md", "results/summary.csv"]
    assert paths[0].read_text().splitlines() == [
        "| method | srt_top10_step0 | mlm_loss_step0 | mlm_loss_final |", "|---|---|---|---|",
        "| ofa | 0.5000 | 6.1235 | n/a |", "| random | 0.2500 | 7.0000 | 5.5000 |",
    ]
    assert summary.markdown_path(tmp_path) == paths[0]
    back = summary.read_summary(tmp_path)
    assert [r["method"] for r in back] == ["ofa", "random"] and back[0]["mlm_loss_final"] is None
    assert [float(back[i]["mlm_loss_step0"]) for i in range(2)] == [6.123456, 7.0]


def test_a_missing_or_foreign_results_table_is_one_line(tmp_path):
    with pytest.raises(HyperofaError, match=f"^{tmp_path / 'results' / 'summary.csv'}: results table not found$"):
        summary.read_summary(tmp_path)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "summary.csv").write_text("a,b\n1,2\n")
    with pytest.raises(HyperofaError, match="results table has no method column"):
        summary.read_summary(tmp_path)


def test_compares_tables_and_figures_are_written_and_read_back_by_their_format_module(tmp_path):
    table = [{"method": "ofa", "pipeline": "p", "step": 0, "eval/loss": 1 / 3}, {"method": "random", "step": 4}]
    columns = ["method", "pipeline", "step", "eval/loss"]
    paths = comparison.write_tables(tmp_path, table, columns, table[:1], columns)
    assert [p.name for p in paths] == ["table.md", "table.csv", "summary.md", "summary.csv"]
    assert (tmp_path / "table.md").read_text().splitlines()[2:] == ["| ofa | p | 0 | 0.3333 |", "| random |  | 4 |  |"]
    rows = comparison.read_table(tmp_path)
    assert float(rows[0]["eval/loss"]) == 1 / 3 and rows[1]["pipeline"] is None  # repr: every digit comes back
    assert comparison.read_table(tmp_path, comparison.SUMMARY_CSV) == rows[:1]
    figure = comparison.write_figure(tmp_path, comparison.figure_name("eval_loss"), b"\x89PNG")
    assert figure.name == "eval_loss.png" and figure.read_bytes() == b"\x89PNG"
    with pytest.raises(HyperofaError, match="compare table not found"):
        comparison.read_table(tmp_path / "none")


# --- the init methods table --------------------------------------------------------------------------------------


def test_the_init_methods_table_has_every_configurable_method_and_its_provenance():
    choices = set(typing.get_args(InitConfig.model_fields["method"].annotation))
    assert set(METHODS) == choices
    assert set(METHODS) - {"random"} == set(asm.PREDICTED)  # each predicting method marks its rows
    assert [name for name, m in METHODS.items() if m.reads_hypernet] == ["hyperofa"]


def _context(tmp_path, vocab: int = 10, k: int = 4) -> MethodContext:
    """What the hyperofa and random rows read: the run directory, the target vocabulary's size, the mapping's k."""
    config = load_config(None, [f"run.dir={tmp_path}", "tracking.enabled=false", "init.ofa_centre=false"])
    return MethodContext(config, SimpleNamespace(k=k), None, [0] * vocab, tmp_path / "tokenizer", np.arange(3))


def test_random_predicts_nothing_and_hyperofa_reads_the_hypernet_predictions(tmp_path):
    ctx = _context(tmp_path)
    assert METHODS["random"].predict(ctx) == METHODS["random"].predict(ctx)
    assert METHODS["random"].predict(ctx).ids is None and METHODS["random"].predict(ctx).rows is None
    stage = hypernet_stage(tmp_path)
    stage.path.mkdir(parents=True)
    rows = np.arange(8, dtype=np.float32).reshape(2, 4)
    write_predictions(stage.path, np.array([7, 4]), rows)
    stage.write_manifest(config={}, inputs={}, outputs=[])
    predicted = METHODS["hyperofa"].predict(ctx)
    assert predicted.ids.tolist() == [7, 4] and np.array_equal(predicted.rows, rows) and predicted.note is None
    write_predictions(stage.path, np.array([7, 10]), rows)  # id 10 is outside the 10-token target vocabulary
    with pytest.raises(HyperofaError, match=r"hypernet predictions: token ids \(target vocabulary\): id 10 is out of range"):
        METHODS["hyperofa"].predict(ctx)
    with pytest.raises(HyperofaError, match="rows have dimension 4 but the mapping's k is 3"):
        METHODS["hyperofa"].predict(dataclasses.replace(ctx, mapping=SimpleNamespace(k=3)))


def test_the_evaluation_tasks_table_has_every_configurable_task():
    from hyperofa_dist.config import EvaluateConfig
    from hyperofa_dist.evaluate.stage import MAIN_METRIC, TASKS

    (task,) = typing.get_args(EvaluateConfig.model_fields["tasks"].annotation)
    assert set(TASKS) == set(typing.get_args(task)) == set(MAIN_METRIC)
