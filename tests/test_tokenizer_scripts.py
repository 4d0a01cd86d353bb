"""`hyperofa tokenizer extend` on text of every script the generator writes (Han, Thai without spaces, Arabic and
Hebrew, Devanagari with combining vowel signs, Ethiopic, Hangul, emoji, lines mixing scripts), for the four kinds
of masked-LM source tokenizer and the two causal-LM kinds (Llama 3 byte-level BPE, Llama 2 BPE with byte fallback),
each also published with a fixed truncation and padding in its tokenizer.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from hyperofa_dist import synthetic
from hyperofa_dist.cli import main as cli_main
from hyperofa_dist.formats.rundir import Stage

KINDS = {"xlmr": ("xlmr", True), "roberta": ("roberta", True), "bert-uncased": ("bert", True),
         "bert-cased": ("bert", False), "llama3": ("llama3", True), "llama2": ("llama2", True), "qwen2": ("qwen2", True)}


@pytest.fixture(scope="module")
def scripts_corpus(tmp_path_factory) -> Path:
    languages = synthetic.multiscript_languages()
    world = synthetic.World(languages, n_concepts=400, seed=0, mixed=True)
    root = tmp_path_factory.mktemp("scripts") / "corpus"
    synthetic.write_corpus(root, world, {lang.code: 300 for lang in languages}, seed=0)
    return root


def with_fixed_length(source: Path, out: Path) -> Path:
    """A copy of a tokenizer directory whose tokenizer.json truncates at 16 and pads to 16, as published ones can."""
    shutil.copytree(source, out)
    data = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    pad = AutoTokenizer.from_pretrained(str(source))
    pad_id, pad_token = (pad.pad_token_id, pad.pad_token) if pad.pad_token else (pad.eos_token_id, pad.eos_token)
    data["truncation"] = {"direction": "Right", "max_length": 16, "strategy": "LongestFirst", "stride": 0}
    data["padding"] = {"strategy": {"Fixed": 16}, "direction": "Right", "pad_to_multiple_of": None,
                       "pad_id": pad_id, "pad_type_id": 0, "pad_token": pad_token}
    (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return out


def extend(run_dir: Path, source: Path, corpus: Path) -> int:
    return cli_main(["tokenizer", f"run.dir={run_dir}", f"source.model={source}", f"corpus.path={corpus}",
                     "tokenizer.new_tokens=600", "tokenizer.sentences_per_language=300", "tracking.enabled=false"])


@pytest.mark.parametrize("kind", KINDS)
def test_extend_round_trips_every_script_and_ignores_a_published_fixed_length(kind, scripts_corpus, tmp_path, capsys):
    family, lowercase = KINDS[kind]
    texts = synthetic.read_lines(scripts_corpus / "qma_Latn.txt")
    clean = synthetic.train_source_tokenizer(family, texts, 400, tmp_path / "clean", lowercase=lowercase)
    fixed = with_fixed_length(clean, tmp_path / "fixed")
    assert extend(tmp_path / "a", clean, scripts_corpus) == 0  # the stage checks AutoTokenizer == built tokenizer
    assert extend(tmp_path / "b", fixed, scripts_corpus) == 0
    assert "ignored the source tokenizer's padding and truncation" in capsys.readouterr().err
    built = [(tmp_path / run / "tokenizer" / "tokenizer.json").read_bytes() for run in ("a", "b")]
    assert built[0] == built[1]  # the published settings change nothing
    data = json.loads(built[1])
    assert data["truncation"] is None and data["padding"] is None
    ignored = Stage(tmp_path / "b", "tokenizer").require()["source_settings_ignored"]
    assert ignored["truncation"]["max_length"] == 16 and ignored["padding"]["strategy"] == {"Fixed": 16}
    # Every new script's sample got new pieces: each language's words take fewer pieces, or fewer of them are [UNK] (a
    # source that maps a whole word to [UNK] counts it as one piece, so fertility alone can rise as UNK falls).
    fertility = Stage(tmp_path / "a", "tokenizer").require()["fertility"]
    improved = {lang for lang, f in fertility.items()
                if f["fertility_target"] < f["fertility_source"] or f["unk_rate_target"] < f["unk_rate_source"]}
    new_languages = {lang.code for lang in synthetic.multiscript_languages()} - {"qma_Latn"}  # the source's own
    assert improved >= new_languages, json.dumps(fertility)
    assert all(f["unk_rate_target"] <= f["unk_rate_source"] for f in fertility.values())
    target = AutoTokenizer.from_pretrained(str(tmp_path / "b" / "tokenizer"))
    long_line = " ".join(synthetic.read_lines(scripts_corpus / "qmf_Deva.txt", 5))
    assert len(target(long_line)["input_ids"]) > 16  # nothing truncates


def test_prepare_blocks_from_a_fixed_length_tokenizer_equal_the_clean_ones(tmp_path, small_corpus, pretrain_kit,
                                                                            capsys):
    texts = synthetic.read_lines(small_corpus / "qaa_Latn.txt")
    clean = synthetic.train_source_tokenizer("xlmr", texts, 400, tmp_path / "clean")
    fixed = with_fixed_length(clean, tmp_path / "fixed")
    made = {}
    for name, tok in (("clean", clean), ("fixed", fixed)):
        prepared = pretrain_kit.real_prepare(tmp_path / name, small_corpus, tok)
        manifest = json.loads((prepared / "manifest.json").read_text())
        made[name] = ({o["path"]: o["sha256"] for o in manifest["outputs"]}, manifest)
    assert made["clean"][0] == made["fixed"][0] and len(made["clean"][0]) > 4  # every shard, byte for byte
    assert "tokenizer_settings_ignored" not in made["clean"][1]
    ignored = made["fixed"][1]["tokenizer_settings_ignored"]["tokenizer"]
    assert ignored["truncation"]["max_length"] == 16 and ignored["padding"]["strategy"] == {"Fixed": 16}
    assert "ignored the truncation and padding set in the tokenizer.json of tokenizer" in capsys.readouterr().err
