"""Every format's reader, given a truncated, missing or damaged file, stops the command that reads it with one
line naming the file and exit status 2, and writes nothing that looks finished."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from hyperofa_dist import cli
from hyperofa_dist.errors import HyperofaError
from hyperofa_dist.formats import hypernet as hypernet_format
from hyperofa_dist.formats import init as init_format
from hyperofa_dist.formats import mapping as mapping_format
from hyperofa_dist.formats import results as results_format
from hyperofa_dist.formats.files import load_npy, load_npz, save_npy, save_npz
from hyperofa_dist.formats.jobdir import CHECKPOINTS, CLIENT_INFO, LATEST, write_checkpoint_hashes
from hyperofa_dist.formats.rundir import MANIFEST
from hyperofa_dist.formats.tokenizer import TOKENIZER_JSON


def truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: max(1, int(len(data) * keep))])
    return path


def fails_in_one_line(capsys, argv: list[str], *needles: str) -> str:
    code = cli.main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2, lines[-5:]
    assert lines and lines[-1].startswith(f"hyperofa {argv[0]}: error: "), lines[-5:]
    for needle in needles:
        assert needle in lines[-1], lines[-1]
    return lines[-1]


# --- the shared array reader ----------------------------------------------------------------------------------


def test_array_files_truncated_missing_or_pickled_are_one_line(tmp_path):
    array = save_npy(tmp_path / "a.npy", np.arange(1000, dtype=np.float32))
    archive = save_npz(tmp_path / "b.npz", x=np.arange(1000))
    np.save(tmp_path / "pickle.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    truncate(array)
    truncate(archive)
    for call, name in (
        (lambda: load_npy(array), "a.npy: array file is truncated"),
        (lambda: load_npy(tmp_path / "absent.npy"), "absent.npy: array file not found"),
        (lambda: load_npy(tmp_path / "pickle.npy"), "pickle.npy: array file is truncated or not a .npy array"),
        (lambda: load_npz(archive, ["x"]), "b.npz: array archive is truncated"),
    ):
        with pytest.raises(HyperofaError, match=name):
            call()


# --- mapping (read by init and hypernet) ---------------------------------------------------------------------


@pytest.fixture
def xlmr(tmp_path, init_worlds):
    return init_worlds.fresh_run(init_worlds.get("xlmr", k=8), tmp_path / "run")


@pytest.mark.parametrize("name", [mapping_format.POSTINGS_TARGET, mapping_format.COORDINATES, mapping_format.SPLIT])
def test_truncated_mapping_file_stops_init(xlmr, capsys, name):
    truncate(xlmr.run_dir / "mapping" / name)
    fails_in_one_line(capsys, ["init", *xlmr.overrides("init.method=random")], str(xlmr.run_dir / "mapping" / name))
    assert not (xlmr.run_dir / "init").exists()


def test_missing_mapping_file_stops_init(xlmr, capsys):
    (xlmr.run_dir / "mapping" / mapping_format.WORD_VECTORS).unlink()
    fails_in_one_line(capsys, ["init", *xlmr.overrides("init.method=random")], mapping_format.WORD_VECTORS, "missing")


def test_damaged_manifest_is_one_line(xlmr, capsys):
    (xlmr.run_dir / "mapping" / MANIFEST).write_text("{not json")
    fails_in_one_line(capsys, ["init", *xlmr.overrides("init.method=random")], "manifest is not valid JSON")


def test_postings_that_are_not_csr_are_refused(xlmr, capsys):
    path = xlmr.run_dir / "mapping" / mapping_format.POSTINGS_SOURCE
    with np.load(path) as data:
        arrays = {name: data[name] for name in data.files}
    save_npz(path, **{**arrays, "indptr": arrays["indptr"][::-1].copy()})
    fails_in_one_line(capsys, ["init", *xlmr.overrides("init.method=random")], "not a valid CSR index")
    save_npz(path, **{**arrays, "spellings": np.zeros_like(arrays["spellings"])})
    fails_in_one_line(capsys, ["init", *xlmr.overrides("init.method=random")], "spelling counts must be 1-3")


# --- hypernet predictions (read by init) ---------------------------------------------------------------------


def test_truncated_predictions_stop_init(xlmr, init_worlds, capsys):
    init_worlds.write_hypernet(xlmr.run_dir, np.array([5, 6]), np.ones((2, xlmr.k), np.float32))
    path = truncate(xlmr.run_dir / "hypernet" / hypernet_format.PREDICTED_ROWS)
    fails_in_one_line(capsys, ["init", *xlmr.overrides("init.method=hyperofa")], str(path), "truncated")
    assert not (xlmr.run_dir / "init").exists()


# --- tokenizer directories (read by every stage that tokenizes) ------------------------------------------------


def test_truncated_target_tokenizer_stops_prepare(tmp_path, small_corpus, source_tokenizers, capsys):
    target = tmp_path / "tok"
    shutil.copytree(source_tokenizers["xlmr"], target)
    truncate(target / TOKENIZER_JSON)
    argv = ["prepare", f"run.dir={tmp_path / 'run'}", f"corpus.path={small_corpus}", f"tokenizer.path={target}",
            "tracking.enabled=false"]
    fails_in_one_line(capsys, argv, str(target), "cannot load tokenizer")
    assert not (tmp_path / "run" / "prepare").exists()


# --- word vectors (read by mapping) ----------------------------------------------------------------------------


def test_truncated_word_vectors_stop_mapping(xlmr, trained_vectors, tmp_path, capsys):
    broken = tmp_path / "vectors"
    shutil.copytree(trained_vectors.parent, broken, ignore=shutil.ignore_patterns(MANIFEST))
    truncate(broken / trained_vectors.name)
    argv = ["mapping", *xlmr.overrides(f"vectors.path={broken / trained_vectors.name}", "mapping.num_primitives=8")]
    fails_in_one_line(capsys, argv, str(broken / trained_vectors.name), "truncated")


# --- shards (read by pretrain and evaluate) --------------------------------------------------------------------


@pytest.fixture
def shard_world(tmp_path, small_corpus, pretrain_kit):
    tok, model = pretrain_kit.tokenizer_and_model(tmp_path, small_corpus)
    prepare = pretrain_kit.quick_prepare(tmp_path / "prepare", small_corpus, tok, languages=2, lines=60)
    return model, prepare


def test_truncated_shard_stops_evaluate(shard_world, tmp_path, capsys):
    model, prepare = shard_world
    shard = sorted((prepare / "heldout").rglob("*.tar"))[0]
    truncate(shard, keep=0.3)
    argv = ["evaluate", "--model", str(model), "--tasks", "mlm", f"run.dir={tmp_path / 'run'}",
            f"evaluate.heldout_dir={prepare}", "tracking.enabled=false"]
    fails_in_one_line(capsys, argv, str(shard), "truncated")
    assert not list((tmp_path / "run").rglob(results_format.RESULTS))


# --- init output (provenance, read by pretrain's embedding warm-up) ----------------------------------------------


def test_truncated_provenance_stops_pretrain_before_launch(shard_world, tmp_path, capsys):
    model, prepare = shard_world
    truncate(model.parent / init_format.PROVENANCE)
    argv = ["pretrain", f"run.dir={tmp_path / 'run'}", f"pretrain.model={model}", f"pretrain.shards={prepare}",
            "pretrain.embedding_warmup_steps=2", "tracking.enabled=false"]
    fails_in_one_line(capsys, argv, str(model.parent / init_format.PROVENANCE), "truncated")
    assert not (tmp_path / "run" / "pretrain" / "hyperofa" / MANIFEST).exists()


# --- DeepSpeed job directories (checkpoint info, read on resume) ---------------------------------------------------


def test_damaged_checkpoint_info_stops_a_resume(shard_world, tmp_path, capsys):
    model, prepare = shard_world
    ckpt = tmp_path / "run" / "pretrain" / "hyperofa" / CHECKPOINTS
    (ckpt / "step00000002").mkdir(parents=True)
    (ckpt / LATEST).write_text("step00000002")
    (ckpt / "step00000002" / CLIENT_INFO).write_text('{"step": 2, "world_')
    write_checkpoint_hashes(ckpt, "step00000002")  # written as saved: the info itself is what is damaged
    argv = ["pretrain", f"run.dir={tmp_path / 'run'}", f"pretrain.model={model}", f"pretrain.shards={prepare}",
            "pretrain.resume=true", "tracking.enabled=false"]
    fails_in_one_line(capsys, argv, str(ckpt / "step00000002" / CLIENT_INFO), "not valid JSON")


# --- HF model directories (read by init, pretrain, evaluate) -------------------------------------------------------


def test_truncated_model_weights_stop_evaluate(shard_world, tmp_path, capsys):
    model, prepare = shard_world
    truncate(model / "model.safetensors")
    argv = ["evaluate", "--model", str(model), "--tasks", "mlm", f"run.dir={tmp_path / 'run'}",
            f"evaluate.heldout_dir={prepare}", "tracking.enabled=false"]
    fails_in_one_line(capsys, argv, str(model / "model.safetensors"), "weights are truncated")


# --- evaluation results (read by the pipeline's summary) ---------------------------------------------------------


def test_results_are_read_only_when_their_manifest_matches_the_inputs(tmp_path):
    results = {"mlm": {"average": {"loss": 1.0}}}
    stage = results_format.stage_of(tmp_path, "init-random")
    stage.begin("x")
    path = results_format.write_results(stage.path / results_format.RESULTS, results)
    made = stage.write_manifest(config={}, inputs={"model": "a"}, outputs=[results_format.RESULTS])
    assert results_format.find_results(tmp_path, "init-random", made["inputs_digest"]) == results
    assert results_format.find_results(tmp_path, "init-random", "another model") is None
    assert results_format.find_results(tmp_path, "absent", made["inputs_digest"]) is None
    truncate(path)  # damaged: not the file the manifest lists, so not read as current
    assert results_format.find_results(tmp_path, "init-random", made["inputs_digest"]) is None
