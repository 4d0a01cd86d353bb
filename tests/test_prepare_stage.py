"""`hyperofa prepare` end to end on a real local Ray (one Ray for the whole module: it takes seconds to start).

The corpus is conftest's small_corpus (6 languages, 3 scripts, skewed sizes, one gzipped file); the target
tokenizer is an XLM-R-style Unigram trained here on all its languages. Expectations are computed from the
corpus files directly, not from the stage's own records.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import psutil
import pytest

from data_prep.prepare.packing import unpack_blocks
from data_prep.prepare.stage import run as run_prepare_stage
from data_prep.prepare.sampling import heldout_count, kept_order, plan_chunks, select_sentences, temperature_budgets
from hyperofa_dist.formats.shards import read_shard
from hyperofa_dist import synthetic
from hyperofa_dist.formats.files import sha256_file
from hyperofa_dist.config import load_config
from hyperofa_dist.formats.corpus import discover, plan_units, read_unit_sentences
from hyperofa_dist.runtime.ray import ray_session
from hyperofa_dist.tracking import NullTracker

pytestmark = pytest.mark.slow

BLOCK = 64
TOTAL = 6000  # training sentences spread by temperature: the small languages repeat, the largest is subsampled
HELDOUT = 0.05


@pytest.fixture(scope="module")
def prep_tokenizer(tmp_path_factory, small_corpus) -> Path:
    texts = [line for path in sorted(small_corpus.iterdir()) for line in synthetic.read_lines(path)]
    return synthetic.train_source_tokenizer("xlmr", texts, 600, tmp_path_factory.mktemp("prep_tok") / "tok")


@pytest.fixture(scope="module")
def ray_cluster():
    with ray_session(load_config(None, ["ray.num_cpus=2"])) as ray:
        yield ray


def make_config(run_dir, corpus, tokenizer, seed=0, chunk_bytes=16384, **extra):
    overrides = [
        f"run.dir={run_dir}",
        f"run.seed={seed}",
        f"corpus.path={corpus}",
        f"tokenizer.path={tokenizer}",
        "tracking.enabled=false",
        f"prepare.block_size={BLOCK}",
        "prepare.blocks_per_sample=4",
        "prepare.samples_per_shard=3",
        f"prepare.chunk_bytes={chunk_bytes}",
        f"prepare.heldout_fraction={HELDOUT}",
        f"prepare.sampling.total_sentences={TOTAL}",
        "prepare.tokenize_batch_size=64",
        *(f"{k.replace('__', '.')}={v}" for k, v in extra.items()),
    ]
    return load_config(None, overrides)


def prepare(config) -> dict:
    assert run_prepare_stage(config, NullTracker()) == 0
    return json.loads((config.run_dir / "prepare" / "manifest.json").read_text())


def shard_files(run_dir: Path) -> dict[str, Path]:
    stage = run_dir / "prepare"
    return {p.relative_to(stage).as_posix(): p for p in sorted(stage.glob("*/*/*.tar"))}


def without_run_dir(manifest: dict) -> dict:
    manifest = json.loads(json.dumps(manifest))
    manifest["config"]["run"].pop("dir")
    return manifest


@pytest.fixture(scope="module")
def run_a(tmp_path_factory, small_corpus, prep_tokenizer, ray_cluster):
    config = make_config(tmp_path_factory.mktemp("run_a"), small_corpus, prep_tokenizer)
    return config, prepare(config)


def test_shard_token_counts_sum_to_manifest_totals(run_a):
    config, manifest = run_a
    files = shard_files(config.run_dir)
    assert sorted(files) == [o["path"] for o in manifest["outputs"]]
    per = defaultdict(lambda: defaultdict(int))
    for entry in manifest["outputs"]:
        assert sha256_file(files[entry["path"]]) == entry["sha256"]
    for rel, path in files.items():
        split, lang = rel.split("/")[:2]
        for _, sample_lang, ids in ((s.key, s.lang, s.blocks) for s in read_shard(path)):
            assert sample_lang == lang and ids.dtype == np.uint32 and ids.shape[1] == BLOCK
            per[lang][f"{split}_blocks"] += ids.shape[0]
            pad = manifest["special_tokens"]["pad"]
            content = (ids[:, 1:-1] != manifest["special_tokens"]["sep"]) & (ids[:, 1:-1] != pad)
            per[lang][f"{split}_tokens_in_blocks"] += int(np.count_nonzero(content))
            per[lang][f"{split}_padded_blocks"] += int(np.count_nonzero(ids[:, -1] == pad))
            per[lang]["all_tokens"] += ids.size
        per[lang][f"{split}_shards"] += 1
    languages = manifest["counts"]["languages"]
    for lang, stats in languages.items():
        for key in ("train_blocks", "heldout_blocks", "train_tokens_in_blocks", "heldout_tokens_in_blocks",
                    "train_shards", "heldout_shards", "train_padded_blocks", "heldout_padded_blocks"):
            assert per[lang][key] == stats[key], (lang, key)
        assert stats["train_blocks"] > 0 and stats["heldout_blocks"] > 0
        assert stats["train_tokens_in_blocks"] + stats["train_tokens_lost"] == stats["train_tokens"]
    totals = manifest["counts"]["totals"]
    assert sum(p["all_tokens"] for p in per.values()) == (totals["train_blocks"] + totals["heldout_blocks"]) * BLOCK
    assert sum(p["train_tokens_in_blocks"] for p in per.values()) == totals["train_tokens_in_blocks"]


def test_blocks_decode_to_the_kept_sentences_in_order(run_a, prep_tokenizer):
    from tokenizers import Tokenizer

    config, manifest = run_a
    tokenizer = Tokenizer.from_file(str(prep_tokenizer / "tokenizer.json"))
    sep, pad = manifest["special_tokens"]["sep"], manifest["special_tokens"]["pad"]
    units = plan_units(discover(config.corpus), config.prepare.chunk_bytes)
    read = {(u.lang, u.chunk): read_unit_sentences(u)[0] for u in units}
    counts = defaultdict(list)
    for unit in units:
        counts[unit.lang].append(len(read[(unit.lang, unit.chunk)]))
    sampling = config.prepare.sampling
    plans = plan_chunks(counts, HELDOUT, sampling.alpha, sampling.total_sentences, None, True)
    blocks = defaultdict(list)
    for entry in manifest["shards"]:  # sorted by path: chunk, then shard index
        for _, _, ids in ((s.key, s.lang, s.blocks) for s in read_shard(config.run_dir / "prepare" / entry["path"])):
            blocks[(entry["split"], entry["lang"], entry["chunk"])].append(ids)
    checked = 0
    for unit in units:
        sentences = read[(unit.lang, unit.chunk)]
        heldout, multiplicity = select_sentences(plans[unit.lang][unit.chunk], 0, unit.lang, unit.chunk)
        expected = {
            "train": [sentences[i] for i in kept_order(multiplicity)],
            "heldout": [sentences[i] for i in heldout],
        }
        for split in ("train", "heldout"):
            arrays = blocks.get((split, unit.lang, unit.chunk))
            if not arrays:
                continue
            pieces = unpack_blocks(np.concatenate(arrays), sep, pad)
            decoded = [tokenizer.decode(p.tolist()) for p in pieces[:-1]]
            assert decoded == expected[split][: len(decoded)], (split, unit.lang, unit.chunk)
            tail = pieces[-1].tolist()
            if len(decoded) < len(expected[split]):
                full = tokenizer.encode(expected[split][len(decoded)], add_special_tokens=False).ids
                assert tail == full[: len(tail)]
            checked += len(decoded)
    totals = manifest["counts"]["totals"]
    assert checked > 0.9 * (totals["train_sentences"] + totals["heldout_sentences"])


def test_per_language_counts_match_a_direct_count(run_a, small_corpus):
    config, manifest = run_a
    languages = manifest["counts"]["languages"]
    assert sorted(languages) == [lang.code for lang in synthetic.default_languages(6)]
    direct = {}
    for path in small_corpus.iterdir():
        lines = synthetic.read_lines(path)
        direct[path.name.split(".")[0]] = (len(lines), sum(1 for line in lines if line.strip()))
    # held out per chunk: round(f * n) of each chunk's sentences
    held = defaultdict(int)
    for unit in plan_units(discover(config.corpus), config.prepare.chunk_bytes):
        held[unit.lang] += heldout_count(len(read_unit_sentences(unit)[0]), HELDOUT)
    assert all(abs(held[lang] - HELDOUT * n) <= 1 + HELDOUT * n / 10 for lang, (_, n) in direct.items())
    budgets = temperature_budgets({lang: n - held[lang] for lang, (_, n) in direct.items()}, 0.3, TOTAL, None, True)
    for lang, (lines, sentences) in direct.items():
        stats = languages[lang]
        assert stats["lines"] == lines and stats["sentences"] == sentences and stats["empty"] == lines - sentences
        assert stats["heldout_sentences"] == held[lang]
        assert stats["train_sentences"] == budgets[lang]
    assert sum(s["train_sentences"] for s in languages.values()) == TOTAL
    smallest, largest = languages["qaf_Cyrl"], languages["qaa_Latn"]
    assert smallest["train_sentences"] > smallest["sentences"]  # upsampled
    assert largest["train_unique"] == largest["train_sentences"] < largest["sentences"]  # subsampled, no repeats
    assert manifest["counts"]["skipped_languages"] == {}


def test_same_seed_identical_shards_other_seed_other_sampling(run_a, tmp_path, small_corpus, prep_tokenizer):
    config_a, manifest_a = run_a
    manifest_b = prepare(make_config(tmp_path / "b", small_corpus, prep_tokenizer))
    files_a, files_b = shard_files(config_a.run_dir), shard_files(tmp_path / "b")
    assert sorted(files_a) == sorted(files_b)
    assert all(files_a[k].read_bytes() == files_b[k].read_bytes() for k in files_a)
    assert without_run_dir(manifest_a) == without_run_dir(manifest_b)

    manifest_c = prepare(make_config(tmp_path / "c", small_corpus, prep_tokenizer, seed=1))
    langs_a, langs_c = manifest_a["counts"]["languages"], manifest_c["counts"]["languages"]
    # the same budgets, different sentences behind them
    budgets_a = {k: v["train_sentences"] for k, v in langs_a.items()}
    assert budgets_a == {k: v["train_sentences"] for k, v in langs_c.items()}
    hashes_a = {o["path"]: o["sha256"] for o in manifest_a["outputs"]}
    hashes_c = {o["path"]: o["sha256"] for o in manifest_c["outputs"]}
    common = set(hashes_a) & set(hashes_c)
    assert sum(hashes_a[p] != hashes_c[p] for p in common) > 0.9 * len(common)


def _mtimes(stage: Path) -> dict[str, int]:
    return {p.relative_to(stage).as_posix(): p.stat().st_mtime_ns for p in stage.rglob("*") if p.is_file()}


def test_rerun_rewrites_nothing_and_a_deleted_shard_comes_back_identical(run_a, tmp_path):
    config_a, manifest_a = run_a
    run_dir = tmp_path / "copy"
    shutil.copytree(config_a.run_dir, run_dir)
    config = config_a.model_copy(update={"run": config_a.run.model_copy(update={"dir": str(run_dir)})})
    stage = run_dir / "prepare"
    before = _mtimes(stage)
    time.sleep(0.01)
    assert prepare(config) == manifest_a
    assert _mtimes(stage) == before  # up to date: not even the manifest is rewritten

    victim = manifest_a["outputs"][len(manifest_a["outputs"]) // 2]["path"]
    original = (stage / victim).read_bytes()
    (stage / victim).unlink()
    manifest = prepare(config)
    assert (stage / victim).read_bytes() == original
    after = _mtimes(stage)
    rewritten = {p for p in before if p.endswith(".tar") and after.get(p) != before[p]}
    assert rewritten == {victim}
    assert without_run_dir(manifest) == without_run_dir(manifest_a)


def test_a_same_size_byte_flip_in_a_shard_is_found_and_only_that_shard_is_written_again(run_a, tmp_path, capfd):
    config_a, manifest_a = run_a
    run_dir = tmp_path / "copy"
    shutil.copytree(config_a.run_dir, run_dir)
    config = config_a.model_copy(update={"run": config_a.run.model_copy(update={"dir": str(run_dir)})})
    stage = run_dir / "prepare"
    victim = manifest_a["outputs"][len(manifest_a["outputs"]) // 3]["path"]
    original = (stage / victim).read_bytes()
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0x40
    (stage / victim).write_bytes(bytes(flipped))
    before = _mtimes(stage)
    time.sleep(0.01)
    capfd.readouterr()
    manifest = prepare(config)
    err = capfd.readouterr().err
    assert f"hyperofa prepare: {stage / victim} differs from the manifest (sha256); rebuilding the stage" in err
    assert "up to date" not in err
    assert (stage / victim).read_bytes() == original
    after = _mtimes(stage)
    assert {p for p in before if p.endswith(".tar") and after.get(p) != before[p]} == {victim}
    assert without_run_dir(manifest) == without_run_dir(manifest_a)
    capfd.readouterr()
    prepare(config)
    assert "up to date" in capfd.readouterr().err


def test_after_a_failed_prepare_a_changed_execution_key_redoes_only_the_missing_chunks(run_a, tmp_path):
    config_a, manifest_a = run_a
    smallest = min(manifest_a["counts"]["languages"], key=lambda lang: manifest_a["counts"]["languages"][lang]["lines"])
    config = make_config(tmp_path / "failed", config_a.corpus.path, config_a.tokenizer.path, prepare__max_retries=0)
    stage = config.run_dir / "prepare"
    # A directory where the smallest language's first shard goes: its task fails (the smallest tasks run last).
    blocker = stage / "train" / smallest / f"{smallest}-00000-000000.tar"
    (blocker / "in-the-way").mkdir(parents=True)
    with pytest.raises(Exception, match="in-the-way|Is a directory|Directory not empty"):
        prepare(config)
    assert not (stage / "manifest.json").exists()
    records = stage / "chunks"
    # (a task cancelled mid-write may leave its `.name.tmp-<host>-<pid>`: not a record; the next run sweeps it)
    done = {p.name: p.stat().st_mtime_ns for p in records.iterdir() if not p.name.startswith(".")} if records.is_dir() else {}
    n_chunks = len(list((config_a.run_dir / "prepare" / "chunks").iterdir()))
    assert 0 < len(done) < n_chunks, (len(done), n_chunks)
    shutil.rmtree(blocker)

    retried = make_config(tmp_path / "failed", config_a.corpus.path, config_a.tokenizer.path, prepare__max_retries=5)
    manifest = prepare(retried)
    after = {p.name: p.stat().st_mtime_ns for p in records.iterdir()}
    assert not [name for name in after if name.startswith(".")]
    assert len(after) == n_chunks
    assert {name: after[name] for name in done} == done  # the chunks finished before were not run again
    assert without_run_dir(manifest)["outputs"] == without_run_dir(manifest_a)["outputs"]


def test_killed_worker_is_retried_and_manifest_equals_uninterrupted_run(tmp_path, world, prep_tokenizer, ray_cluster):
    corpus = tmp_path / "corpus"
    synthetic.write_corpus(corpus, world, synthetic.skewed_sizes(world.languages, 12000, 0.5), seed=3)
    # no sentence budget here: the tasks plan their chunks themselves (the other path of the stage)
    options = {"prepare__max_retries": 3, "prepare__sampling__total_sentences": "null"}
    reference = prepare(make_config(tmp_path / "ref", corpus, prep_tokenizer, **options))
    assert reference["counts"]["totals"]["train_sentences"] + reference["counts"]["totals"]["heldout_sentences"] == sum(
        synthetic.skewed_sizes(world.languages, 12000, 0.5).values()
    )
    n_chunks = len(list((tmp_path / "ref" / "prepare" / "chunks").iterdir()))
    assert n_chunks > 50

    config = make_config(tmp_path / "killed", corpus, prep_tokenizer, **options)
    outcome = {}

    def target():
        try:
            outcome["manifest"] = prepare(config)
        except BaseException as exc:  # handed to the test thread
            outcome["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    killed, done_at_kill = None, None
    deadline = time.time() + 120
    while killed is None and thread.is_alive() and time.time() < deadline:
        for proc in psutil.process_iter(["pid", "cmdline"]):
            cmdline = proc.info["cmdline"] or []
            if cmdline and cmdline[0].startswith("ray::prepare_chunks"):
                records = config.run_dir / "prepare" / "chunks"
                done_at_kill = len(list(records.iterdir())) if records.is_dir() else 0
                proc.kill()
                killed = proc.info["pid"]
                break
        time.sleep(0.005)
    thread.join(timeout=300)
    assert killed is not None, "no ray::prepare_chunks worker was seen"
    assert not psutil.pid_exists(killed) or psutil.Process(killed).status() == psutil.STATUS_ZOMBIE
    assert done_at_kill < n_chunks  # killed in the middle of the prepare round
    assert "error" not in outcome, outcome.get("error")
    assert without_run_dir(outcome["manifest"]) == without_run_dir(reference)
    assert not list((config.run_dir / "prepare").rglob(".*.tmp-*"))


def test_glot500_local_layout_is_prepared_through_the_readers(tmp_path, small_corpus, prep_tokenizer, ray_cluster):
    corpus = tmp_path / "glot500"
    expected = {}
    for i, lang in enumerate(("qac_Latn", "qad_Grek", "qaf_Cyrl")):
        lines = synthetic.read_lines(small_corpus / f"{lang}.txt")
        (corpus / lang).mkdir(parents=True)
        halves = [lines[: len(lines) // 2], lines[len(lines) // 2 :]]
        for j, part in enumerate(halves):
            rows = "".join(json.dumps({"text": t, "source": "gen"}) + "\n" for t in part)
            (corpus / lang / f"part-{j}.jsonl").write_text(rows, encoding="utf-8")
        expected[lang] = len(lines)
    config = make_config(tmp_path / "run", corpus, prep_tokenizer, corpus__format="glot500_local",
                         prepare__sampling__total_sentences="null")
    manifest = prepare(config)
    languages = manifest["counts"]["languages"]
    assert {lang: languages[lang]["sentences"] for lang in expected} == expected
    for lang in expected:
        assert languages[lang]["train_sentences"] + languages[lang]["heldout_sentences"] == expected[lang]
        assert languages[lang]["train_blocks"] > 0
    assert set(manifest["inputs"]["corpus"]["qac_Latn"]) == {"qac_Latn/part-0.jsonl", "qac_Latn/part-1.jsonl"}


def test_every_language_with_heldout_text_gets_a_block_and_the_summary_names_those_without(
    tmp_path, world, prep_tokenizer, ray_cluster, capsys
):
    corpus = tmp_path / "corpus"
    # 60 short sentences: 3 held out (5%), far shorter than one block; 8 sentences: round(0.4) = 0 held out.
    synthetic.write_corpus(corpus, world, {"qaa_Latn": 2000, "qab_Cyrl": 60, "qac_Latn": 8}, seed=0)
    manifest = prepare(make_config(tmp_path / "run", corpus, prep_tokenizer, prepare__sampling__total_sentences="null",
                                   prepare__block_size=256))
    languages = manifest["counts"]["languages"]
    assert languages["qab_Cyrl"]["heldout_sentences"] == 3 and languages["qab_Cyrl"]["heldout_tokens"] + 3 < 254
    assert languages["qab_Cyrl"]["heldout_blocks"] == languages["qab_Cyrl"]["heldout_padded_blocks"] == 1
    assert languages["qab_Cyrl"]["heldout_tokens_lost"] == 0
    # Padding is decided per chunk: qaa_Latn's small chunks (chunk_bytes 16 KiB) pad their short held-out parts too.
    assert languages["qaa_Latn"]["heldout_blocks"] > languages["qaa_Latn"]["heldout_padded_blocks"]
    assert manifest["counts"]["languages_without_heldout"] == {"qac_Latn": "no held-out sentence"}
    assert all(s["train_padded_blocks"] == 0 for s in languages.values())
    err = capsys.readouterr().err
    assert "held-out blocks: 2 of 3 languages have some (fewest: qab_Cyrl with 1; 2 with a padded short block); " \
           "none: qac_Latn (no held-out sentence)" in err


@pytest.fixture(scope="module")
def standin_texts(world):
    codes = [lang.code for lang in world.languages[:3]]
    return synthetic.standin_texts(world, dict(zip(codes, (1500, 400, 60))), seed=2, heldout=40,
                                   heldout_languages=codes[:2])


@pytest.mark.parametrize("layout", synthetic.glot500.LAYOUTS)
def test_glot500_standin_gives_the_same_shards_as_the_same_text_as_txt(
    tmp_path, layout, standin_texts, prep_tokenizer, ray_cluster, capfd
):
    largest = max(standin_texts, key=lambda lang: len(standin_texts[lang]["train"]))
    standin = synthetic.glot500_standin(tmp_path / "glot500", standin_texts, layout, rows_per_group=128,
                                        partial_train=[largest])
    txt = synthetic.write_split_txt(tmp_path / "txt", standin_texts, "train")
    # A cap below the largest language: the table units' plans come from row counts in the files' metadata (no
    # counting round), the text files' from a counting round; both must give the same plan, hence the same bytes.
    keys = dict(chunk_bytes=1 << 20, prepare__sampling__total_sentences="null", prepare__sampling__cap_per_language=900)
    from_txt = prepare(make_config(tmp_path / "run_txt", txt, prep_tokenizer, **keys))
    from_standin = prepare(make_config(tmp_path / "run_standin", standin, prep_tokenizer,
                                       corpus__format="glot500_local", **keys))
    assert f"{largest}: no train split, reading partial-train" in capfd.readouterr().err
    assert from_standin["outputs"] == from_txt["outputs"] and len(from_txt["outputs"]) > 6
    assert from_standin["counts"]["languages"] == from_txt["counts"]["languages"]
    assert from_standin["counts"]["languages"][largest]["train_sentences"] == 900
    assert from_standin["counts"]["splits"] == {lang: "partial-train" if lang == largest else "train"
                                                for lang in standin_texts}
    assert any(f"{largest}/partial-train/" in path for path in from_standin["inputs"]["corpus"][largest])


def test_published_dev_split_is_the_heldout_text(tmp_path, standin_texts, prep_tokenizer, ray_cluster):
    from tokenizers import Tokenizer

    standin = synthetic.glot500_standin(tmp_path / "glot500", standin_texts, "parquet", files_per_split=2,
                                        rows_per_group=64)
    config = make_config(tmp_path / "run", standin, prep_tokenizer, chunk_bytes=8192, corpus__format="glot500_local",
                         corpus__heldout_split="dev", prepare__sampling__total_sentences="null")
    manifest = prepare(config)
    languages = manifest["counts"]["languages"]
    with_dev = sorted(lang for lang in standin_texts if "dev" in standin_texts[lang])
    assert manifest["counts"]["heldout_from"] == {lang: "dev" if lang in with_dev else "prepare.heldout_fraction"
                                                   for lang in standin_texts}
    tokenizer = Tokenizer.from_file(str(prep_tokenizer / "tokenizer.json"))
    sep, pad = manifest["special_tokens"]["sep"], manifest["special_tokens"]["pad"]
    for lang, texts in standin_texts.items():
        stats = languages[lang]
        assert stats["sentences"] == len(texts["train"]) + len(texts.get("dev", []))
        if lang not in with_dev:
            assert stats["heldout_sentences"] == sum(  # the fraction, per unit of its training text
                heldout_count(u.rows, HELDOUT) for u in plan_units(discover(make_config(
                    tmp_path / "x", standin, prep_tokenizer, chunk_bytes=8192, corpus__format="glot500_local",
                    corpus__languages=f"[{lang}]").corpus), 8192))
            continue
        assert stats["train_sentences"] == len(texts["train"])  # nothing of the training split held out
        assert stats["heldout_sentences"] == len(texts["dev"])
        blocks = defaultdict(list)
        for entry in manifest["shards"]:  # sorted by path: chunk, then shard index
            if entry["split"] == "heldout" and entry["lang"] == lang:
                blocks[entry["chunk"]] += [s.blocks for s in read_shard(tmp_path / "run" / "prepare" / entry["path"])]
        dev_units = [u for u in plan_units(discover(config.corpus), 8192) if u.lang == lang and u.role == "heldout"]
        assert sorted(blocks) == [u.chunk for u in dev_units] and len(dev_units) == 2  # a unit per dev file
        for unit in dev_units:
            pieces = unpack_blocks(np.concatenate(blocks[unit.chunk]), sep, pad)
            decoded = [tokenizer.decode(p.tolist()) for p in pieces[:-1]]
            rows = read_unit_sentences(unit)[0]
            assert decoded and decoded == rows[: len(decoded)]  # the dev sentences of that file, in order
