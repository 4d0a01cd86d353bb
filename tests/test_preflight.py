"""Wrong inputs are refused before any launch or expensive work (issue 15, cases 3, 6 and 7): one line on stderr,
exit status 2, and nothing written that looks finished (no manifest, no stage output); valid spellings accepted.

Most cases call `cli.main` in this process (seconds); the read-only run directory and the disk-full drills mount
a small filesystem and need root (skipped otherwise), and those that start Ray or DeepSpeed are marked slow.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from hyperofa_dist import cli, synthetic
from hyperofa_dist.config import load_config
from hyperofa_dist.errors import HyperofaError
from hyperofa_dist.formats import mapping as mapping_format
from hyperofa_dist.formats.corpus import LanguageSource, sample_text
from hyperofa_dist.formats.files import load_npy, load_npz, read_json, save_npy, save_npz
from hyperofa_dist.formats.rundir import MANIFEST
from hyperofa_dist.formats.shards import build_shards, index_shard, read_shard
from hyperofa_dist.formats import corpus as corpus_format
from hyperofa_dist.formats import files as files_format
from hyperofa_dist.formats import models as models_format
from hyperofa_dist.formats import pretrain as pretrain_format
from hyperofa_dist.formats import shards as shards_format
from hyperofa_dist.formats import text as text_format


def run_main(capsys, argv: list[str]) -> subprocess.CompletedProcess:
    """`hyperofa <argv>` in this process, as a CompletedProcess for the `one_line_error` check."""
    capsys.readouterr()  # what building the fixtures printed
    code = cli.main(argv)
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, captured.out, captured.err)


def run_cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hyperofa_dist.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def nothing_finished(root: Path) -> None:
    """No manifest anywhere under `root` (a stage is complete exactly when it has one) and no temporary debris."""
    if root.exists():
        assert not list(root.rglob(MANIFEST)), list(root.rglob(MANIFEST))
        assert not list(root.rglob(".*.tmp-*")), list(root.rglob(".*.tmp-*"))


def truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def flip_byte(path: Path, at: float = 0.5) -> Path:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


# --- case 3: model directories and tokenizers ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory, source_tokenizers, small_corpus):
    """A tiny model with its tokenizer, the same without tokenizer files (its tokenizer_config.json left, the way
    a partial copy leaves it), without weights, with truncated weights, and with another tokenizer's files."""
    root = tmp_path_factory.mktemp("models")
    good = synthetic.make_tiny_model("xlmr", source_tokenizers["xlmr"], root / "good")
    variants = {"good": good}
    for name in ("no_tokenizer", "no_weights", "truncated_weights", "other_tokenizer"):
        variants[name] = Path(shutil.copytree(good, root / name))
    for path in variants["no_tokenizer"].iterdir():
        if path.name not in ("config.json", "model.safetensors", "tokenizer_config.json"):
            path.unlink()
    (variants["no_weights"] / "model.safetensors").unlink()
    truncate(variants["truncated_weights"] / "model.safetensors", 0.7)
    texts = synthetic.read_lines(small_corpus / "qaa_Latn.txt")
    small = synthetic.train_source_tokenizer("xlmr", texts, 120, root / "small_tok")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(small / name, variants["other_tokenizer"] / name)
    return variants


def test_model_preflight_accepts_a_whole_model(models):
    facts = models_format.check_model(models["good"], "evaluate.model", mask=True)
    assert facts.tokenizer_size == facts.vocab_size == 400
    assert facts.parameters > 0


@pytest.mark.parametrize(
    "variant, needles",
    [
        ("no_tokenizer", ["no tokenizer.json", "evaluate.model"]),
        ("no_weights", ["has no weights", "model.safetensors"]),
        ("truncated_weights", ["model.safetensors: weights are truncated or damaged"]),
        ("other_tokenizer", ["tokenizer has 120 tokens but the model has 400 embedding rows"]),
    ],
)
def test_evaluate_refuses_a_model_whose_weights_or_tokenizer_do_not_fit(models, tmp_path, capsys, one_line_error,
                                                                        variant, needles):
    """Before (no tokenizer files, on the redesign's base): a 5-token tokenizer built from tokenizer_config.json
    alone mapped every word to <unk>; a tokenizer of another, smaller vocabulary was accepted."""
    data = tmp_path / "data"
    synthetic.write_retrieval_data(data / "srt", synthetic.World(synthetic.default_languages(3), n_concepts=200), "qaa_Latn",
                                   ["qab_Cyrl"], n=10)
    out = run_main(capsys, ["evaluate", "--model", str(models[variant]), "--tasks", "srt", "--data", str(data),
                            f"run.dir={tmp_path / 'run'}", "evaluate.layer=-1", "tracking.enabled=false"])
    one_line_error(out, "evaluate", str(models[variant]), *needles)
    nothing_finished(tmp_path / "run")
    assert not (tmp_path / "run" / "evaluate").exists()


def test_tokenizer_stage_refuses_a_source_without_tokenizer_files(models, small_corpus, tmp_path, capsys,
                                                                  one_line_error):
    """Before: a traceback ("The vocabulary is not large enough to contain all chars", exit 1), or with more new
    tokens a tokenizer "extended 5 -> 2505" and a manifest."""
    out = run_main(capsys, ["tokenizer", f"source.model={models['no_tokenizer']}", f"corpus.path={small_corpus}",
                            f"run.dir={tmp_path / 'run'}", "tokenizer.new_tokens=50", "tracking.enabled=false"])
    one_line_error(out, "tokenizer", str(models["no_tokenizer"]), "no tokenizer files", "source.model")
    nothing_finished(tmp_path / "run")
    assert not (tmp_path / "run" / "tokenizer").exists()


# --- case 3: a binary-garbage language ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def garbage_corpus(tmp_path_factory, small_corpus) -> Path:
    root = Path(shutil.copytree(small_corpus, tmp_path_factory.mktemp("garbage") / "corpus"))
    (root / "zzz_Latn.txt").write_bytes(np.random.default_rng(0).integers(0, 256, 200_000, dtype=np.uint8).tobytes())
    return root


def test_real_text_in_every_script_is_far_below_the_noise_limit_and_random_bytes_far_above(tmp_path, garbage_corpus):
    languages = synthetic.multiscript_languages() + synthetic.default_languages(6)
    world = synthetic.World(languages, n_concepts=500, seed=0)
    paths = synthetic.write_corpus(tmp_path, world, {lang.code: 400 for lang in languages})
    shares = {lang: corpus_format.noise_share(sample_text(path).text)[0] for lang, path in paths.items()}
    assert max(shares.values()) < 0.05, shares  # measured 1.5-3.1 % (Latin ... Hangul, Han, emoji lines)
    share, counted = corpus_format.noise_share(sample_text(garbage_corpus / "zzz_Latn.txt").text)
    assert 0.7 < share < 0.8 and counted > 100_000  # measured 74 % on these random bytes


def test_prepare_refuses_a_binary_garbage_language_naming_the_file_and_the_share(garbage_corpus, source_tokenizers,
                                                                                 tmp_path, capsys, one_line_error):
    """Before: 200 KB of random bytes became 4,866 training blocks next to the real languages, exit 0."""
    argv = ["prepare", f"corpus.path={garbage_corpus}", f"tokenizer.path={source_tokenizers['xlmr']}",
            f"run.dir={tmp_path / 'run'}", "tracking.enabled=false"]
    out = run_main(capsys, argv)
    line = one_line_error(out, "prepare", str(garbage_corpus / "zzz_Latn.txt"), "74% of the sampled text of zzz_Latn",
                          "corpus.max_noise_share=0.5")
    assert "invalid UTF-8 or not letters" in line
    assert not (tmp_path / "run" / "prepare").exists()
    # the key moves the limit: at 0.8 the file passes the check (the stage then starts Ray; not run here)
    sources = [LanguageSource("zzz_Latn", "dir", (garbage_corpus / "zzz_Latn.txt",))]
    assert corpus_format.checked_samples(sources, 0.8)["zzz_Latn"][0].total_bytes == 200_000
    with pytest.raises(HyperofaError, match="zzz_Latn.txt: 74%"):
        corpus_format.checked_samples(sources, 0.7)


def test_tokenizer_stage_refuses_the_garbage_language_too(garbage_corpus, source_tokenizers, tmp_path, capsys,
                                                          one_line_error):
    out = run_main(capsys, ["tokenizer", f"source.model={source_tokenizers['xlmr']}", f"corpus.path={garbage_corpus}",
                            f"run.dir={tmp_path / 'run'}", "tracking.enabled=false"])
    one_line_error(out, "tokenizer", "zzz_Latn.txt", "corpus.max_noise_share")
    nothing_finished(tmp_path / "run")


def test_samples_spread_over_a_large_file_catch_garbage_after_a_clean_start(tmp_path):
    path = tmp_path / "qzz_Latn.txt"
    clean = ("ein ganz normaler Satz mit Wörtern\n" * 8000).encode()
    junk = np.random.default_rng(1).integers(0, 256, 3 * len(clean), dtype=np.uint8).tobytes()
    path.write_bytes(clean + junk)
    sample = sample_text(path)
    assert sample.total_bytes == len(clean) + len(junk) and sample.sample_bytes <= 1 << 18
    assert corpus_format.noise_share(sample.text)[0] > 0.5


# --- case 3: misaligned parallel corpora ---------------------------------------------------------------------------


def test_vectors_train_refuses_a_misaligned_parallel_corpus(small_corpus, tmp_path, capsys, one_line_error):
    """Before: 100 vs 3,200 lines trained vectors and wrote a manifest, exit 0."""
    corpus = tmp_path / "parallel"
    corpus.mkdir()
    lines = synthetic.read_lines(small_corpus / "qaa_Latn.txt")
    (corpus / "qaa.txt").write_text("\n".join(lines[:100]) + "\n")
    (corpus / "qab.txt").write_text("\n".join(lines[:300]))  # no final newline: its last line still counts
    argv = ["vectors", "train", f"vectors.train.corpus={corpus}", f"run.dir={tmp_path / 'run'}",
            "vectors.train.epochs=1", "tracking.enabled=false"]
    one_line_error(run_main(capsys, argv), "vectors", "misaligned", "qaa.txt has 100 lines", "qab.txt has 300",
                   "vectors.train.prefix_aligned")
    assert not (tmp_path / "run" / "vectors").exists()
    # equal line counts, or the explicit key for a corpus whose shorter files translate the first lines, train
    assert cli.main([*argv, "vectors.train.prefix_aligned=true"]) == 0
    manifest = read_json(tmp_path / "run" / "vectors" / MANIFEST)
    assert manifest["counts"]["lines_per_file"] == {"qaa.txt": 100, "qab.txt": 300}


def test_line_counts_of_plain_and_gzip_files(tmp_path):
    import gzip

    (tmp_path / "a.txt").write_bytes(b"x\ny\n")
    (tmp_path / "b.txt").write_bytes(b"x\ny")
    (tmp_path / "c.txt").write_bytes(b"")
    (tmp_path / "d.txt.gz").write_bytes(gzip.compress(b"x\n" * 70000))
    assert [text_format.count_lines(tmp_path / n) for n in ("a.txt", "b.txt", "c.txt", "d.txt.gz")] == [2, 2, 0, 70000]


# --- case 6: damaged .npz/.npy (hypernet and init inputs) -------------------------------------------------------------


def test_every_truncation_and_byte_flip_of_array_files_is_one_line_or_loads(tmp_path):
    """Before: a flipped byte in a zip header escaped as NotImplementedError or RuntimeError, in a .npy header as
    tokenize.TokenError, each a traceback in whichever stage read the file."""
    archive = save_npz(tmp_path / "a.npz", indptr=np.arange(9, dtype=np.int64), indices=np.arange(8, dtype=np.int32))
    array = save_npy(tmp_path / "a.npy", np.arange(24, dtype=np.float32).reshape(4, 6))
    for path, read in ((archive, lambda p: load_npz(p, ("indptr", "indices"))), (array, load_npy)):
        data = path.read_bytes()
        variants = [data[:i] for i in range(0, len(data), 2)]
        variants += [data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:] for i in range(len(data))]
        bad = tmp_path / f"bad{path.suffix}"
        refused = 0
        for variant in variants:
            bad.write_bytes(variant)
            try:
                read(bad)
            except HyperofaError as exc:
                refused += 1
                assert "\n" not in str(exc) and str(bad) in str(exc)
        assert refused > len(variants) // 3


@pytest.fixture
def hypernet_world(tmp_path, hypernet_kit):
    return hypernet_kit.mapping(tmp_path / "run")


@pytest.mark.parametrize("damage", [truncate, flip_byte])
@pytest.mark.parametrize("name", [mapping_format.POSTINGS_SOURCE, mapping_format.SPLIT, mapping_format.OVERLAP])
def test_damaged_mapping_archive_stops_hypernet_before_launch(hypernet_world, hypernet_kit, capsys, one_line_error,
                                                              damage, name):
    damage(hypernet_world.run_dir / "mapping" / name)
    out = run_main(capsys, ["hypernet", *hypernet_kit.overrides(hypernet_world)])
    one_line_error(out, "hypernet", str(hypernet_world.run_dir / "mapping" / name))
    assert not (hypernet_world.run_dir / "hypernet").exists()


@pytest.mark.parametrize("name", [mapping_format.SPLIT, mapping_format.POSTINGS_TARGET])
def test_byte_flipped_mapping_archive_stops_init(tmp_path, init_worlds, capsys, one_line_error, name):
    w = init_worlds.fresh_run(init_worlds.get("xlmr", k=8), tmp_path / "run")
    flip_byte(w.run_dir / "mapping" / name)
    one_line_error(run_main(capsys, ["init", *w.overrides("init.method=random")]), "init",
                   str(w.run_dir / "mapping" / name))
    assert not (w.run_dir / "init").exists()


# --- case 6: shards ------------------------------------------------------------------------------------------------


def _shard(tmp_path: Path) -> tuple[Path, bytes]:
    blocks = np.arange(32 * 40, dtype=np.uint32).reshape(40, 32)
    shard = next(build_shards(blocks, "qaa_Latn", 0, 4, 100))
    path = tmp_path / "s.tar"
    path.write_bytes(shard.data)
    return path, shard.data


def test_shard_index_and_reader_refuse_a_shard_cut_between_members(tmp_path):
    """Before: a shard cut exactly between two samples read as a shorter, valid one (8 of its 40 blocks)."""
    import io
    import tarfile

    path, data = _shard(tmp_path)
    index = index_shard(path)
    assert (index.samples, index.blocks, index.width) == (10, 40, 32)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        boundary = tar.getmembers()[4].offset
    path.write_bytes(data[:boundary])
    with pytest.raises(HyperofaError, match="no end-of-archive blocks"):
        index_shard(path)
    with pytest.raises(HyperofaError, match="truncated"):
        list(read_shard(path))


def test_every_truncation_and_byte_flip_of_a_shard_is_one_line_or_reads(tmp_path):
    path = tmp_path / "s.tar"
    data = next(build_shards(np.arange(64, dtype=np.uint32).reshape(8, 8), "qaa_Latn", 0, 4, 100)).data
    for variant in [data[:i] for i in range(0, len(data), 61)] + [
        data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:] for i in range(0, 5 * 512, 3)  # the data ends there
    ]:
        path.write_bytes(variant)
        for read in (index_shard, lambda p: list(read_shard(p))):
            with contextlib.suppress(HyperofaError):
                read(path)


@pytest.fixture
def shard_world(tmp_path, small_corpus, pretrain_kit):
    tok, model = pretrain_kit.tokenizer_and_model(tmp_path, small_corpus)
    prepare = pretrain_kit.quick_prepare(tmp_path / "prepare", small_corpus, tok, languages=2, lines=60)
    return model, prepare


def test_shard_preflight_checks_sizes_blocks_and_with_verify_the_hashes(tmp_path):
    from hyperofa_dist.formats.files import atomic_write_json, sha256_file

    prepare = tmp_path / "prepare"
    path, data = _shard(tmp_path)
    shard = prepare / "train" / "qaa_Latn" / "qaa_Latn-00000-000000.tar"
    shard.parent.mkdir(parents=True)
    shutil.move(path, shard)
    record = {"path": "train/qaa_Latn/qaa_Latn-00000-000000.tar", "bytes": len(data), "sha256": sha256_file(shard)}
    listed = {"path": record["path"], "split": "train", "lang": "qaa_Latn", "blocks": 40}
    atomic_write_json(prepare / MANIFEST, {"outputs": [record], "shards": [listed]})
    assert shards_format.check_shards([shard], prepare, verify=True, block_size=32) == 40
    with pytest.raises(HyperofaError, match="blocks of 32 tokens, expected 64"):
        shards_format.check_shards([shard], prepare, verify=False, block_size=64)
    flip_byte(shard, 0.2)  # inside a sample's ids: same size, same headers
    assert shards_format.check_shards([shard], prepare, verify=False, block_size=32) == 40
    with pytest.raises(HyperofaError, match="sha256 mismatch"):
        shards_format.check_shards([shard], prepare, verify=True, block_size=32)
    shard.write_bytes(data + bytes(512))
    with pytest.raises(HyperofaError, match=f"shard has {len(data) + 512} bytes, the prepare manifest records"):
        shards_format.check_shards([shard], prepare, verify=False, block_size=32)
    atomic_write_json(prepare / MANIFEST, {"outputs": [], "shards": [{**listed, "blocks": 44}]})
    shard.write_bytes(data)
    with pytest.raises(HyperofaError, match="shard holds 40 blocks, the prepare manifest records 44"):
        shards_format.check_shards([shard], prepare, verify=False, block_size=32)


def test_truncated_shard_stops_pretrain_before_any_rank_launches(shard_world, tmp_path, capsys, one_line_error):
    """Before: the ranks launched, trained, and died mid-training (45 lines, 110 s)."""
    model, prepare = shard_world
    shard = sorted((prepare / "train").rglob("*.tar"))[0]
    truncate(shard, 0.3)
    out = run_main(capsys, ["pretrain", f"run.dir={tmp_path / 'run'}", f"pretrain.model={model}",
                            f"pretrain.shards={prepare}", "tracking.enabled=false"])
    one_line_error(out, "pretrain", str(shard), "truncated")
    assert not (tmp_path / "run" / "pretrain").exists()  # no job.json: nothing was launched


def test_shard_cut_between_samples_stops_evaluate_mlm(shard_world, tmp_path, capsys, one_line_error):
    """Before: evaluated the shorter shard and wrote results and a manifest."""
    import io
    import tarfile

    model, prepare = shard_world
    shard = sorted((prepare / "heldout").rglob("*.tar"))[0]
    with tarfile.open(fileobj=io.BytesIO(shard.read_bytes())) as tar:
        boundary = tar.getmembers()[2].offset
    truncate(shard, boundary / shard.stat().st_size)
    out = run_main(capsys, ["evaluate", "--model", str(model), "--tasks", "mlm", f"run.dir={tmp_path / 'run'}",
                            f"evaluate.heldout_dir={prepare}", "tracking.enabled=false"])
    one_line_error(out, "evaluate", str(shard), "end-of-archive")
    assert not (tmp_path / "run" / "evaluate").exists()


@pytest.mark.parametrize("damage", ["no_weights", "truncated"])
def test_model_without_whole_weights_stops_pretrain_before_any_rank_launches(shard_world, tmp_path, capsys,
                                                                           one_line_error, damage):
    """Before: two ranks launched, then each failed with OSError (23 lines, 59 s)."""
    model, prepare = shard_world
    weights = model / "model.safetensors"
    weights.unlink() if damage == "no_weights" else truncate(weights, 0.9)
    out = run_main(capsys, ["pretrain", f"run.dir={tmp_path / 'run'}", f"pretrain.model={model}",
                            f"pretrain.shards={prepare}", "tracking.enabled=false"])
    one_line_error(out, "pretrain", str(model), "no weights" if damage == "no_weights" else "truncated")
    assert not (tmp_path / "run" / "pretrain").exists()


# --- case 6: free space -----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def free_space_of(monkeypatch, free: int):
    """Every free-space question answered with `free` bytes: the real check, an injected figure."""
    total = shutil.disk_usage("/")

    def usage(path):
        return type(total)(total.total, total.total - free, free)

    monkeypatch.setattr(shutil, "disk_usage", usage)
    yield


def test_prepare_refuses_to_start_without_space_for_its_estimated_shards(small_corpus, source_tokenizers, tmp_path,
                                                                          capsys, monkeypatch, one_line_error):
    argv = ["prepare", f"corpus.path={small_corpus}", f"tokenizer.path={source_tokenizers['xlmr']}",
            f"run.dir={tmp_path / 'run'}", "prepare.block_size=32", "tracking.enabled=false"]
    with free_space_of(monkeypatch, 100 << 10):
        one_line_error(run_main(capsys, argv), "prepare", str(tmp_path / "run" / "prepare"), "needs about",
                       "100.0 KiB free")
    assert not (tmp_path / "run" / "prepare").exists()


@pytest.mark.slow
def test_prepare_estimate_is_at_least_what_prepare_writes_and_not_much_more(small_corpus, source_tokenizers, tmp_path):
    from data_prep.prepare.stage import run
    from hyperofa_dist.formats.corpus import discover
    from hyperofa_dist.formats.tokenizer import load_tokenizer
    from hyperofa_dist.tracking import NullTracker

    for i, extra in enumerate((["prepare.block_size=32", "prepare.blocks_per_sample=4", "prepare.samples_per_shard=8"],
                               ["prepare.block_size=64", "prepare.sampling.total_sentences=9000"])):
        config = load_config(None, [f"run.dir={tmp_path / str(i)}", f"corpus.path={small_corpus}", "ray.num_cpus=1",
                                    f"tokenizer.path={source_tokenizers['xlmr']}", "tracking.enabled=false", *extra])
        samples = corpus_format.checked_samples(discover(config.corpus), 0.5)
        estimate = shards_format.prepare_bytes(samples, load_tokenizer(source_tokenizers["xlmr"]), config)
        assert run(config, NullTracker()) == 0
        written = files_format.used_bytes(tmp_path / str(i) / "prepare")
        assert written < estimate < 1.5 * written, (extra, estimate, written)  # measured 1.09-1.25x


def test_pretrain_refuses_to_launch_without_space_for_its_checkpoints(shard_world, tmp_path, capsys, monkeypatch,
                                                                     one_line_error):
    model, prepare = shard_world
    argv = ["pretrain", f"run.dir={tmp_path / 'run'}", f"pretrain.model={model}", f"pretrain.shards={prepare}",
            "pretrain.steps=4", "pretrain.save_every=2", "pretrain.ranks_per_node=2", "tracking.enabled=false"]
    facts = models_format.check_model(model, "pretrain.model")
    needed = pretrain_format.pretrain_bytes(facts.parameters, load_config(None, argv[1:]), 2)
    assert needed == 2 * (facts.parameters * 16 + 2 * (64 << 10)) + facts.parameters * 4
    with free_space_of(monkeypatch, needed - 1):
        one_line_error(run_main(capsys, argv), "pretrain", "needs about", "every checkpoint")
    assert not (tmp_path / "run" / "pretrain").exists()


def test_a_write_the_disk_refuses_is_one_line_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    import errno

    from hyperofa_dist.formats import files

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full)
    with pytest.raises(HyperofaError, match=r"x\.json: cannot write 3 bytes: no space left on device \(\d+ bytes free"):
        files.atomic_write_bytes(tmp_path / "x.json", b"{}\n")
    assert list(tmp_path.iterdir()) == []


# --- case 6: read-only run directory, disk full for real (root: mounts) ------------------------------------------------


@contextlib.contextmanager
def mounted(kind: str, where: Path, size: str = "1m"):
    where.mkdir(parents=True, exist_ok=True)
    if kind == "tmpfs":
        cmd = f"mount -t tmpfs -o size={size} tmpfs {where}"
    else:  # a read-only bind mount: root ignores permission bits, a read-only mount it does not
        cmd = f"mount --bind {where} {where} && mount -o remount,ro,bind {where}"
    if os.geteuid() != 0 or subprocess.run(cmd, shell=True, capture_output=True).returncode != 0:
        pytest.skip("needs root and mount (a tmpfs or a read-only bind mount)")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_read_only_run_dir_fails_at_once_before_mlflow_opens_its_store(tmp_path, small_corpus, source_tokenizers,
                                                                       one_line_error):
    """Before: 105 s of sqlite retries, then a 181-line sqlalchemy traceback, exit 1."""
    with mounted("ro", tmp_path / "run") as run_dir:
        started = time.perf_counter()
        out = run_cli("tokenizer", f"source.model={source_tokenizers['xlmr']}", f"corpus.path={small_corpus}",
                      f"run.dir={run_dir}", "tokenizer.new_tokens=50")
        one_line_error(out, "tokenizer", str(run_dir), "not writable", "Read-only file system", "run.dir")
        assert time.perf_counter() - started < 30
        assert list(run_dir.iterdir()) == []


def test_read_only_local_mlflow_store_is_named(tmp_path, one_line_error):
    with mounted("ro", tmp_path / "store") as store:
        out = run_cli("tokenizer", f"run.dir={tmp_path / 'run'}", f"tracking.tracking_uri=sqlite:///{store}/mlflow.db")
        one_line_error(out, "tokenizer", str(store), "tracking.tracking_uri")


@pytest.mark.slow
def test_prepare_on_a_full_disk_fails_in_one_line_with_nothing_finished(tmp_path, small_corpus, source_tokenizers,
                                                                         monkeypatch, capfd):
    """The estimate says it fits (an injected free-space figure), the disk does not: the Ray task's ENOSPC becomes
    the stage's one error line. Before: a 45-line traceback ending in OSError, exit 1."""
    with mounted("tmpfs", tmp_path / "run", "96k") as run_dir:
        monkeypatch.setattr(files_format, "free_bytes", lambda path: 1 << 40)
        code = cli.main(["prepare", f"corpus.path={small_corpus}", f"tokenizer.path={source_tokenizers['xlmr']}",
                         f"run.dir={run_dir}", "prepare.block_size=32", "ray.num_cpus=1", "tracking.enabled=false"])
        err = capfd.readouterr().err
        errors = [line for line in err.splitlines() if "error" in line.lower()]
        assert code == 2 and "Traceback" not in err, err[-3000:]
        assert len(errors) == 1 and "no space left on device" in errors[0], errors
        assert errors[0].startswith("hyperofa prepare: error: ") and str(run_dir / "prepare") in errors[0]
        nothing_finished(run_dir)
        assert not list(run_dir.rglob("*.tar"))


@pytest.mark.slow
def test_pretrain_on_a_disk_that_fills_up_mid_run_names_it_and_keeps_the_last_good_checkpoint(
    tmp_path, small_corpus, pretrain_kit
):
    """A drill: once the first checkpoint is written another writer fills the filesystem. The rank that fails
    says so in one line, the stage's error names the full filesystem and the checkpoint to resume from, no
    manifest is written and `latest` still names the last whole checkpoint. Before: rank 0 died with an
    OSError traceback and the stage's line said only "exited with status 1"."""
    with mounted("tmpfs", tmp_path / "run", "12m") as run_dir:
        tok, model = pretrain_kit.tokenizer_and_model(run_dir, small_corpus)
        prepare = pretrain_kit.quick_prepare(run_dir / "prepare", small_corpus, tok, languages=2, lines=60)
        ckpt = run_dir / "pretrain" / "hyperofa" / "checkpoints"

        def fill() -> None:
            while not (ckpt / "latest").is_file():
                time.sleep(0.05)
            with open(run_dir / "filler", "wb") as handle, contextlib.suppress(OSError):
                while True:
                    handle.write(bytes(1 << 16))

        filler = threading.Thread(target=fill, daemon=True)
        filler.start()
        out = run_cli("pretrain", f"run.dir={run_dir}", f"pretrain.model={model}", f"pretrain.shards={prepare}",
                      "pretrain.steps=60", "pretrain.save_every=20", "pretrain.eval_every=20", "pretrain.log_every=5",
                      "pretrain.eval_blocks=2", "pretrain.micro_batch_size=2", "pretrain.grad_accum=1",
                      "pretrain.num_workers=0", "pretrain.ranks_per_node=2", "tracking.enabled=false", timeout=600)
        filler.join(timeout=5)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2, out.stderr[-3000:]
        ours = [line for line in lines if line.startswith("hyperofa pretrain: error: ")]
        assert "no space left on device" in ours[0], ours
        assert "is on a full filesystem" in ours[-1] and "step00000020" in ours[-1], ours
        assert (ckpt / "latest").read_text().strip() == "step00000020"
        assert not (run_dir / "pretrain" / "hyperofa" / MANIFEST).exists()
        assert not (run_dir / "pretrain" / "hyperofa" / "model").exists()
