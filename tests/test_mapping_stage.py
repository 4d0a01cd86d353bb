"""`hyperofa mapping` end to end with a real local Ray and MLflow: contract files, exact postings, determinism."""

from __future__ import annotations

import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from data_prep.mapping import postings as P
from data_prep.mapping.split import split_tokens
from data_prep.mapping.stage import run as run_mapping_stage
from hyperofa_dist.formats.files import fingerprint_path
from hyperofa_dist.formats.mapping import Postings
from hyperofa_dist import synthetic
from hyperofa_dist.config import load_config
from hyperofa_dist.errors import HyperofaError
from hyperofa_dist.tracking import NullTracker, make_tracker
from hyperofa_dist.formats.vectors import load_word_vectors
from hyperofa_dist.vocab import compute_overlap

pytestmark = pytest.mark.slow

CONTRACT = ["postings_source.npz", "postings_target.npz", "word_vectors.npy", "words.txt", "coordinates_source.npy",
            "primitives.npy", "overlap.npz", "split.npz", "stats.json"]


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def models(source_tokenizers, tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {fam: synthetic.make_tiny_model(fam, path, root / fam, hidden_size=16, num_layers=1) for fam, path in source_tokenizers.items()}


@pytest.fixture(scope="module")
def target_dir(small_corpus, tmp_path_factory):
    texts = [line for p in sorted(small_corpus.iterdir()) for line in synthetic.read_lines(p, limit=200)]
    return synthetic.train_source_tokenizer("xlmr", texts, 600, tmp_path_factory.mktemp("target") / "tok")


def _config(run_dir, model, target, vectors, *extra):
    return load_config(None, [f"run.dir={run_dir}", f"source.model={model}", f"tokenizer.path={target}",
                              f"vectors.path={vectors}", "mapping.num_primitives=8", "mapping.words_per_task=700",
                              "tracking.enabled=false", *extra])


@pytest.mark.parametrize("family", synthetic.FAMILIES)
def test_mapping_outputs_follow_the_contract_and_the_method(ray_cluster, models, target_dir, trained_vectors, tmp_path, family):
    config = _config(tmp_path / "run", models[family], target_dir, trained_vectors)
    assert run_mapping_stage(config, NullTracker()) == 0
    out = tmp_path / "run" / "mapping"
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(r["path"] for r in manifest["outputs"]) == sorted(CONTRACT)
    assert manifest["factorized"] is True and manifest["inputs"]["k"] == 8
    # the digest holds the vectors' content (a moved run directory stays up to date); the manifest says where they were
    assert manifest["inputs"]["vectors"] == {"fingerprint": fingerprint_path(trained_vectors)}
    assert manifest["vectors_path"] == str(trained_vectors)
    assert set(manifest["inputs"]["target_tokenizer"]) >= {"tokenizer.json"}

    source, target = AutoTokenizer.from_pretrained(str(models[family])), AutoTokenizer.from_pretrained(str(target_dir))
    words = load_word_vectors(trained_vectors)
    assert (out / "words.txt").read_text().splitlines() == words.keys
    table = np.load(out / "word_vectors.npy", mmap_mode="r")
    np.testing.assert_array_equal(table, words.matrix())
    counts = manifest["counts"]
    assert (counts["V_s"], counts["V_t"], counts["D"], counts["k"]) == (len(source), len(target), 16, 8)
    assert (counts["n_words"], counts["word_dim"]) == table.shape

    for name, tok in (("source", source), ("target", target)):
        postings = Postings.load(out / f"postings_{name}.npz")
        assert postings.indptr.shape == (len(tok) + 1,) and postings.indices.dtype == np.int32
        assert P.csr_equals_lists(postings, P.reference_postings(tok, words.keys))

    with np.load(out / "overlap.npz") as ov:
        expected = compute_overlap(target, source)
        np.testing.assert_array_equal(ov["target_ids"], expected.target_ids)
        np.testing.assert_array_equal(ov["source_ids"], expected.source_ids)

    from transformers import AutoModelForMaskedLM

    emb = AutoModelForMaskedLM.from_pretrained(str(models[family])).get_input_embeddings().weight.detach().numpy()
    f, prim = np.load(out / "coordinates_source.npy"), np.load(out / "primitives.npy")
    assert f.shape == (len(source), 8) and prim.shape == (8, 16)
    stats = json.loads((out / "stats.json").read_text())
    err = np.linalg.norm(emb - f @ prim) / np.linalg.norm(emb)
    assert stats["factorization"]["relative_reconstruction_error"] == pytest.approx(err, rel=1e-4)

    src_indptr = Postings.load(out / "postings_source.npz").indptr
    covered = set(np.flatnonzero(np.diff(src_indptr) > 0)) - set(source.all_special_ids)
    with np.load(out / "split.npz") as split:
        parts = [split[n] for n in ("train", "val", "test")]
    assert sorted(np.concatenate(parts).tolist()) == sorted(covered)
    assert len(parts[0]) == int(0.97 * len(covered)) and len(parts[1]) == int(0.025 * len(covered))
    assert stats["source"]["covered"] >= len(covered) > 100
    assert set(stats["source"]["per_language"]) == set(words.languages)


def test_split_is_sorted_before_a_seeded_shuffle():
    ids = np.arange(1000, 2000)
    a = split_tokens(ids[::-1], [0.8, 0.15, 0.05], seed=4)
    b = split_tokens(np.random.default_rng(1).permutation(ids), [0.8, 0.15, 0.05], seed=4)
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(a[name], b[name])
    assert [len(a[n]) for n in ("train", "val", "test")] == [800, 150, 50]
    assert not np.array_equal(a["train"], split_tokens(ids, [0.8, 0.15, 0.05], seed=5)["train"])


def test_two_runs_are_byte_identical_rerun_is_a_no_op_and_k_equal_d_works(ray_cluster, models, target_dir, trained_vectors, tmp_path):
    runs = []
    for name in ("a", "b"):
        config = _config(tmp_path / name, models["xlmr"], target_dir, trained_vectors, "mapping.num_primitives=16")
        assert run_mapping_stage(config, NullTracker()) == 0
        runs.append(tmp_path / name / "mapping")
    for file in CONTRACT:
        assert (runs[0] / file).read_bytes() == (runs[1] / file).read_bytes(), file
    manifest = json.loads((runs[0] / "manifest.json").read_text())
    assert manifest["factorized"] is False
    assert json.loads((runs[1] / "manifest.json").read_text())["outputs"] == manifest["outputs"]
    np.testing.assert_array_equal(np.load(runs[0] / "primitives.npy"), np.eye(16, dtype=np.float32))
    emb = __import__("transformers").AutoModelForMaskedLM.from_pretrained(str(models["xlmr"])).get_input_embeddings().weight
    np.testing.assert_array_equal(np.load(runs[0] / "coordinates_source.npy"), emb.detach().numpy())

    stamps = {p.name: p.stat().st_mtime_ns for p in runs[0].iterdir()}
    config = _config(tmp_path / "a", models["xlmr"], target_dir, trained_vectors, "mapping.num_primitives=16")
    assert run_mapping_stage(config, NullTracker()) == 0
    assert {p.name: p.stat().st_mtime_ns for p in runs[0].iterdir()} == stamps


def test_a_truncated_output_rebuilds_the_stage_and_a_moved_run_dir_stays_up_to_date(ray_cluster, models, target_dir,
                                                                                    trained_vectors, tmp_path, capfd):
    import shutil

    vectors = tmp_path / "run" / trained_vectors.name  # inside the run dir, as the demo's trained vectors are
    vectors.parent.mkdir()
    for companion in trained_vectors.parent.glob(trained_vectors.name + "*"):
        shutil.copy2(companion, vectors.parent / companion.name)
    config = _config(tmp_path / "run", models["xlmr"], target_dir, vectors)
    assert run_mapping_stage(config, NullTracker()) == 0
    out = tmp_path / "run" / "mapping"
    manifest = json.loads((out / "manifest.json").read_text())
    assert "vectors_path" in manifest and str(tmp_path) not in json.dumps(manifest["inputs"])
    good = (out / "postings_target.npz").read_bytes()
    (out / "postings_target.npz").write_bytes(good[: len(good) // 2])
    capfd.readouterr()
    assert run_mapping_stage(config, NullTracker()) == 0
    err = capfd.readouterr().err
    assert (f"hyperofa mapping: {out / 'postings_target.npz'} has {len(good) // 2} bytes, the manifest records "
            f"{len(good)}; rebuilding the stage") in err
    assert (out / "postings_target.npz").read_bytes() == good

    shutil.move(tmp_path / "run", tmp_path / "moved")
    moved = _config(tmp_path / "moved", models["xlmr"], target_dir, tmp_path / "moved" / trained_vectors.name)
    capfd.readouterr()
    assert run_mapping_stage(moved, NullTracker()) == 0
    assert f"hyperofa mapping: up to date ({tmp_path / 'moved' / 'mapping' / 'manifest.json'})" in capfd.readouterr().err


def test_statistics_reach_mlflow_and_identical_target_warns(ray_cluster, models, source_tokenizers, trained_vectors, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    config = _config(tmp_path / "run", models["bert"], source_tokenizers["bert"], trained_vectors, "tracking.enabled=true")
    tracker = make_tracker(config)
    with tracker.session("mapping", config):
        assert run_mapping_stage(config, tracker) == 0
    assert "warning: the target tokenizer" in capsys.readouterr().err
    stats = json.loads((tmp_path / "run" / "mapping" / "stats.json").read_text())
    assert stats["target_identical_to_source"] is True
    client = MlflowClient(tracking_uri=tracker.tracking_uri)
    runs = client.search_runs([tracker.experiment_id], "tags.`hyperofa.stage` = 'mapping'")
    metrics = runs[0].data.metrics
    assert metrics["source.covered"] == stats["source"]["covered"]
    assert metrics["target.length_percentiles.50"] == stats["target"]["length_percentiles"]["50"]
    assert metrics["factorization.relative_reconstruction_error"] == pytest.approx(stats["factorization"]["relative_reconstruction_error"])


def test_bad_inputs_fail_before_writing(models, source_tokenizers, target_dir, trained_vectors, tmp_path):
    with pytest.raises(HyperofaError, match="mapping.num_primitives=17: must be between 1 and the source hidden size 16"):
        run_mapping_stage(_config(tmp_path / "k", models["xlmr"], target_dir, trained_vectors, "mapping.num_primitives=17"), NullTracker())
    with pytest.raises(HyperofaError, match="has 401 tokens but the model .* has 400 embedding rows"):
        run_mapping_stage(_config(tmp_path / "v", models["xlmr"], target_dir, trained_vectors,
                                  f"source.tokenizer={source_tokenizers['roberta']}"), NullTracker())
    with pytest.raises(HyperofaError, match="word-vector file not found"):
        run_mapping_stage(_config(tmp_path / "w", models["xlmr"], target_dir, tmp_path / "none.kv"), NullTracker())
    with pytest.raises(HyperofaError, match="no target tokenizer"):
        run_mapping_stage(_config(tmp_path / "t", models["xlmr"], tmp_path / "nothing", trained_vectors), NullTracker())
    for name in ("k", "v", "w", "t"):
        assert not (tmp_path / name / "mapping" / "manifest.json").exists()


@pytest.mark.parametrize("family, tokenizer, matrices", [("llama", "llama3", 2), ("qwen2", "qwen2", 1)])
def test_a_causal_source_is_factorised_with_its_untied_output_projection(ray_cluster, init_worlds, trained_vectors,
                                                                        tmp_path, family, tokenizer, matrices):
    from transformers import AutoModelForCausalLM

    from hyperofa_dist.factorize import factorize
    from hyperofa_dist.formats.mapping import load_mapping

    w = init_worlds.causal(family, tokenizer)
    config = _config(tmp_path / "run", w.source_model, w.target_tokenizer, trained_vectors)
    assert run_mapping_stage(config, NullTracker()) == 0
    mapping = load_mapping(tmp_path / "run")
    counts = mapping.manifest["counts"]
    assert (counts["D"], counts["matrices"], counts["k"]) == (32, matrices, 8)
    assert mapping.primitives.shape == (8, 32 * matrices) and mapping.hidden_size == 32
    model = AutoModelForCausalLM.from_pretrained(str(w.source_model))
    e = model.get_input_embeddings().weight.detach().numpy()
    if matrices == 2:  # [E_in | E_out], one factorisation
        e = np.concatenate([e, model.get_output_embeddings().weight.detach().numpy()], axis=1)
    expected = factorize(e, 8, blocks=matrices)
    np.testing.assert_array_equal(np.asarray(mapping.source_coordinates), expected.coordinates)
    np.testing.assert_array_equal(mapping.primitives, expected.primitives)
    stats = json.loads((tmp_path / "run" / "mapping" / "stats.json").read_text())
    assert stats["factorization"]["matrices"] == matrices
