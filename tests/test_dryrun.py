"""`hyperofa pipeline --dry-run`: every packaged config passes on generated stand-ins of its inputs, laid out as the
real ones are published (Glot500-c's two local layouts, Glot500's SentencePiece-only tokenizer); bad inputs are all
named at once, one line each, exit 2, and nothing is written."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from hyperofa_dist.config import PACKAGED_CONFIGS, load_config
from hyperofa_dist.dryrun import dry_run
from hyperofa_dist.pretrain.stage import batch_plan
from hyperofa_dist.runtime.launch import planned_world_size
from hyperofa_dist.formats.tokenizer import TOKENIZER_JSON, sentencepiece_only
from hyperofa_dist.synthetic.standins import build_standins
from hyperofa_dist.synthetic.sentencepiece import train_sentencepiece_folder

# The source family each packaged config names (a new packaged config must be added here, and so gets checked).
FAMILIES = {"demo": "xlmr", "demo-causal": "llama", "xlmr-glot500": "xlmr", "roberta-glot500": "roberta",
            "llama3.2-1b-glot500": "llama", "llama3-8b-glot500": "llama"}


def test_every_packaged_config_is_covered():
    assert {p.stem for p in PACKAGED_CONFIGS.glob("*.yaml")} == set(FAMILIES)


# Each packaged config on each local layout of its corpus: the Glot500-c configs on both published layouts (they
# name the hub; a user with a local copy sets corpus.format=glot500_local), the demo configs on their .txt corpus.
CASES = [(name, layout) for name in sorted(FAMILIES)
         for layout in (("dir",) if name.startswith("demo") else ("arrow", "parquet"))]


@pytest.mark.parametrize("name,layout", CASES)
def test_packaged_config_passes_the_dry_run_on_standins(name, layout, tmp_path, capsys):
    path = PACKAGED_CONFIGS / f"{name}.yaml"
    overrides = build_standins(tmp_path, load_config(path), FAMILIES[name], layout=layout)
    assert all(key.split("=")[0] in ("source.model", "corpus.path", "corpus.format", "run.dir", "tokenizer.path",
                                     "vectors.path", "evaluate.data_dir") for key in overrides)
    config = load_config(path, overrides)
    assert config.corpus.format == ("dir" if layout == "dir" else "glot500_local")
    if layout != "dir":  # as published: split folders, Glot500-c's own jpn_Japn, partial-train in the conversion
        japanese = tmp_path / "corpus" / "jpn_Japn"
        assert japanese.is_dir() if "jpn_Jpan" in (config.corpus.languages or []) else True
        english = sorted(p.name for p in (tmp_path / "corpus" / "eng_Latn").iterdir())
        assert english == (["dev", "partial-train", "test"] if layout == "parquet" else ["dev", "test", "train"])
    if config.tokenizer.path is not None:  # Glot500's tokenizer as published
        assert sentencepiece_only(config.tokenizer.path)
        assert not (tmp_path / "target_tokenizer" / TOKENIZER_JSON).exists()
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
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
    if config.tokenizer.path is not None:  # its pieces read (it belongs with the source), its conversion planned
        assert "of the source's pieces are in it (copied); SentencePiece only, converted once" in out
    assert not config.run_dir.exists()  # nothing written, not even the tokenizer's conversion
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_dry_run_names_every_problem_at_once_and_writes_nothing(tmp_path):
    path = PACKAGED_CONFIGS / "xlmr-glot500.yaml"
    overrides = build_standins(tmp_path, load_config(path), "xlmr", layout="parquet")
    # a tokenizer made for another model (a Greek-only mT5-style SentencePiece folder, published without
    # tokenizer.json as Glot500's is), evaluation data that is not there, and a language code the corpus does not
    # have (Korean as kor_Kore; the corpus has kor_Hang)
    greek = [line for part in sorted((tmp_path / "corpus" / "ell_Grek" / "train").glob("*.parquet"))
             for line in pq.read_table(part, columns=["text"]).column("text").to_pylist()]
    other = train_sentencepiece_folder(greek, tmp_path / "other", "unigram", vocab_size=300, family="t5")
    languages = [code.replace("kor_Hang", "kor_Kore") for code in load_config(path).corpus.languages]
    bad = [*overrides, f"tokenizer.path={other}", f"evaluate.data_dir={tmp_path / 'no-eval'}",
           f"corpus.languages=[{', '.join(languages)}]"]
    out = subprocess.run([sys.executable, "-m", "hyperofa_dist.cli", "pipeline", "--dry-run", "--config", str(path),
                          *bad], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    errors = [line for line in out.stderr.splitlines() if line.startswith("hyperofa pipeline --dry-run: ")]
    assert out.returncode == 2 and out.stdout == "", out.stderr[-2000:]
    assert len(errors) == 4 and errors[-1].endswith("3 problem(s); nothing was run or written"), errors
    assert "requested language(s) not found: kor_Kore" in errors[0]
    assert re.search(rf"{re.escape(str(other))}: the target tokenizer has \d\.\d% of the source tokenizer's pieces "
                     r".* it belongs to another model than source.model \(tokenizer.path\)", errors[1]), errors[1]
    assert f"{tmp_path / 'no-eval'}: evaluate.data_dir not found (tasks srt, srb, pos, ner)" in errors[2]
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob("mlflow*"))
    assert sentencepiece_only(other)  # read, not converted


def test_dry_run_refuses_a_retrieval_layer_the_source_does_not_have(tmp_path, capsys):
    path = PACKAGED_CONFIGS / "roberta-glot500.yaml"
    overrides = build_standins(tmp_path, load_config(path), "roberta", layout="arrow")
    layers = json.loads((tmp_path / "source_model" / "config.json").read_text())["num_hidden_layers"]
    assert layers == load_config(path).evaluate.layer  # the stand-in reaches the packaged layer, no further
    capsys.readouterr()
    assert dry_run(load_config(path, [*overrides, f"evaluate.layer={layers + 1}"])) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hyperofa pipeline --dry-run")]
    assert errors[0].endswith(f"error: evaluate.layer={layers + 1} but {tmp_path / 'source_model'} has {layers} "
                              f"layers; use 0..{layers} (0 = embeddings) or a negative index such as -1 for the last "
                              "layer"), errors
    assert errors[-1].endswith("1 problem(s); nothing was run or written")


def test_tokenizer_stage_builds_nothing_when_the_config_names_the_target(tmp_path, capsys):
    """xlmr-glot500.yaml names Glot500's tokenizer; `hyperofa tokenizer` (which the pipeline leaves out for it) would
    otherwise extend XLM-R by 150,000 pieces that no stage reads."""
    from hyperofa_dist.tokenizer.stage import run as run_tokenizer
    from hyperofa_dist.tracking import NullTracker

    config = load_config(PACKAGED_CONFIGS / "xlmr-glot500.yaml", [f"run.dir={tmp_path / 'run'}"])
    assert run_tokenizer(config, NullTracker()) == 0
    assert capsys.readouterr().err.startswith("hyperofa tokenizer: nothing to build: tokenizer.path is set "
                                              "(models/glot500-base)")
    assert not (tmp_path / "run").exists()


# CPU sizes for the packaged XLM-R config: a tiny model (hidden 64, k 32), small blocks and shards, two Ray CPUs.
CPU_SIZES = ["mapping.num_primitives=32", "mapping.words_per_task=2000", "ray.num_cpus=2", "prepare.block_size=64",
             "prepare.blocks_per_sample=8", "prepare.samples_per_shard=16", "prepare.chunk_bytes=65536",
             "prepare.sampling.cap_per_language=100000", "tracking.enabled=false"]


@pytest.mark.slow
def test_packaged_config_prepares_and_maps_the_published_standins(tmp_path, capsys):
    """xlmr-glot500.yaml as a user with local copies runs it: Glot500-c's parquet conversion (partial-train, dev
    held out, jpn_Japn) and Glot500's SentencePiece-only tokenizer, through the dry run, prepare and mapping."""
    from data_prep.mapping.stage import run as run_mapping
    from data_prep.prepare.stage import run as run_prepare
    from hyperofa_dist.formats.shards import read_shard
    from hyperofa_dist.runtime.ray import ray_session
    from hyperofa_dist.tracking import NullTracker

    path = PACKAGED_CONFIGS / "xlmr-glot500.yaml"
    sizes = [*CPU_SIZES, "corpus.heldout_split=dev"]
    overrides = build_standins(tmp_path, load_config(path, sizes), "xlmr", layout="parquet")
    config = load_config(path, [*sizes, *overrides])
    assert dry_run(config) == 0 and not config.run_dir.exists()
    capsys.readouterr()
    with ray_session(config):
        assert run_prepare(config, NullTracker()) == 0
        assert run_mapping(config, NullTracker()) == 0

    prepare = json.loads((config.run_dir / "prepare" / "manifest.json").read_text())
    conversion = prepare["tokenizer_conversions"]["tokenizer.path"]
    assert conversion["identical"] and conversion["source"] == str(tmp_path / "target_tokenizer")
    assert not (tmp_path / "target_tokenizer" / TOKENIZER_JSON).exists()  # converted in the run directory only
    corpus = prepare["inputs"]["corpus"]
    assert sorted(corpus) == sorted(config.corpus.languages)
    assert set(corpus["eng_Latn"]) == {f"eng_Latn/{split}/000{i}.parquet" for split in ("partial-train", "dev")
                                       for i in (0, 1)}
    assert all(name.startswith("jpn_Japn/train/") for name in corpus["jpn_Jpan"])
    languages = prepare["counts"]["languages"]
    held = {lang for lang, stats in languages.items() if stats["heldout_blocks"]}
    assert held == {"eng_Latn", "tur_Latn", "ell_Grek"}  # the stand-in's languages with a dev split
    assert all(languages[lang]["sentences"] > 0 and languages[lang]["train_blocks"] > 0 for lang in corpus)
    vocab = conversion["vocab_size"]
    shards = sorted((config.run_dir / "prepare" / "train").rglob("*.tar"))
    ids = np.concatenate([sample.blocks.ravel() for shard in shards for sample in read_shard(shard)])
    assert 0 < ids.max() < vocab and len(np.unique(ids)) > vocab // 4  # the target tokenizer's ids, many of them

    mapping = json.loads((config.run_dir / "mapping" / "manifest.json").read_text())["counts"]
    assert (mapping["V_t"], mapping["D"], mapping["k"]) == (vocab, 64, 32)
    assert mapping["overlap_pairs"] > 0 and mapping["n_words"] > 0
