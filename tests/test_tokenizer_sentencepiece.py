"""SentencePiece-only target tokenizers, as Glot500's is published (`sentencepiece.bpe.model`, an XLM-R
`tokenizer_config.json`, no `tokenizer.json`): converted once into the run directory, encoding exactly as
SentencePiece does, and accepted by the stages that take a target tokenizer (prepare through Ray, mapping's
fingerprint, init). The folders are trained here with the `sentencepiece` library on generated text."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hyperofa_dist import synthetic
from hyperofa_dist.config import load_config
from hyperofa_dist.errors import HyperofaError
from hyperofa_dist.formats.files import sha256_file
from hyperofa_dist.formats.tokenizer import (
    load_tokenizer,
    same_as_sentencepiece,
    take_conversions,
    target_tokenizer_dir,
    tokenizer_dir,
)

LANGS = ("qaa_Latn", "qad_Grek", "qaf_Cyrl")


@pytest.fixture(scope="module")
def sp_texts(small_corpus) -> list[str]:
    return [line for lang in LANGS for line in synthetic.read_lines(small_corpus / f"{lang}.txt", limit=400)]


@pytest.fixture(scope="module")
def sp_folders(tmp_path_factory, sp_texts) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sentencepiece")
    return {kind: synthetic.train_sentencepiece_folder(sp_texts, root / kind, kind, 500) for kind in ("unigram", "bpe")}


def processor(folder: Path):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(folder / "sentencepiece.bpe.model"))


@pytest.mark.parametrize("kind", ["unigram", "bpe"])
def test_converted_once_into_the_run_dir_and_encodes_like_sentencepiece(kind, sp_folders, sp_texts, tmp_path):
    folder = sp_folders[kind]
    before = {p.name: sha256_file(p) for p in folder.iterdir()}
    take_conversions()
    out = tokenizer_dir(folder, tmp_path / "run", "tokenizer.path")
    assert out.parent == (tmp_path / "run" / "tokenizers").resolve() and out.name.startswith(f"{kind}-")
    assert {p.name: sha256_file(p) for p in folder.iterdir()} == before  # the user's folder is never written

    made = take_conversions()["tokenizer.path"]
    assert made == {**json.loads((out / "conversion.json").read_text()), "to": f"tokenizers/{out.name}"}
    assert made["files"]["sentencepiece.bpe.model"] == before["sentencepiece.bpe.model"]
    assert made["model_type"] == kind and made["family_class"] == "XLMRobertaTokenizer" and made["identical"]
    assert made["vocab_size"] == 502 and made["sample_texts"] > 8  # 500 pieces, <pad> and <mask>

    # Corpus text, not the conversion's own sample: SentencePiece's pieces under XLM-R's fairseq ids, framed.
    tok = load_tokenizer(out)
    sp = processor(folder)
    assert [tok.convert_tokens_to_ids(t) for t in ("<s>", "<pad>", "</s>", "<unk>", "<mask>")] == [0, 1, 2, 3, 501]
    texts = sp_texts[::5]
    got = tok(texts)["input_ids"]
    for text, ids in zip(texts, got):
        assert ids == [0, *(i + 1 if i >= 3 else 3 for i in sp.encode(text)), 2], text

    # Once: the next use converts nothing and rewrites nothing; another run directory gets the same bytes.
    stamp = (out / "tokenizer.json").stat().st_mtime_ns
    assert tokenizer_dir(folder, tmp_path / "run", "tokenizer.path") == out and take_conversions() == {}
    assert (out / "tokenizer.json").stat().st_mtime_ns == stamp
    other = tokenizer_dir(folder, tmp_path / "other", "tokenizer.path")
    assert (other / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()
    # tokenizer.path resolves to the same copy
    config = load_config(None, [f"run.dir={tmp_path / 'run'}", f"tokenizer.path={folder}"])
    assert target_tokenizer_dir(config) == out
    # A damaged copy is converted again.
    (out / "tokenizer.json").write_text("{}")
    assert (tokenizer_dir(folder, tmp_path / "run", "k") / "tokenizer.json").read_bytes() == \
        (other / "tokenizer.json").read_bytes()
    take_conversions()


@pytest.mark.parametrize("family, kind, model_file", [("llama", "bpe", "tokenizer.model"),
                                                      ("t5", "unigram", "spiece.model")])
def test_older_llama_and_t5_folders_convert_to_their_own_layout(family, kind, model_file, sp_texts, tmp_path):
    """Older Llama (BPE with byte fallback, tokenizer.model) and mT5/T5 (spiece.model, sentinel tokens after the
    pieces): SentencePiece's own ids, framed as transformers' class frames them."""
    import sentencepiece
    from transformers import AutoTokenizer

    folder = synthetic.train_sentencepiece_folder(sp_texts, tmp_path / family, kind, 400, family=family)
    out = tokenizer_dir(folder, tmp_path / "run", "source.model")
    made = take_conversions()["source.model"]
    assert made["converted"] == model_file and made["model_type"] == kind
    tok, stock = load_tokenizer(out), AutoTokenizer.from_pretrained(str(folder))
    assert tok.get_vocab() == stock.get_vocab() and len(tok) == (408 if family == "t5" else 400)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / model_file))
    texts = [*sp_texts[::9], "unseen characters ☃ ⌘ and 😀"]  # byte fallback spells them in bytes
    for text, framed in zip(texts, tok(texts)["input_ids"]):
        ids = sp.encode(text)
        assert framed == ([1, *ids] if family == "llama" else [*ids, 1]), text
    assert any(sp.id_to_piece(i).startswith("<0x") for i in sp.encode(texts[-1])) is (family == "llama")


def test_transformers_own_class_over_a_bpe_model_is_the_mismatch_the_check_names(sp_folders, sp_texts, tmp_path):
    """transformers 5's XLMRobertaTokenizer builds a Unigram from any SentencePiece model: over a BPE model it
    splits text otherwise than SentencePiece. The check names the first such text; the conversion passes it."""
    from transformers import AutoTokenizer

    folder = sp_folders["bpe"]
    sp = processor(folder)
    texts = sp_texts[:200]
    family = AutoTokenizer.from_pretrained(str(folder))
    first = next(t for t in texts if family.tokenize(t) != sp.encode(t, out_type=str))
    with pytest.raises(HyperofaError) as caught:
        same_as_sentencepiece(family, sp, texts, "the family class")
    message = str(caught.value)
    assert "\n" not in message and repr(first[:60]) in message and "otherwise than SentencePiece" in message
    same_as_sentencepiece(load_tokenizer(tokenizer_dir(folder, tmp_path, "k")), sp, texts, "the conversion")
    take_conversions()


def test_refusals_are_one_line_and_leave_nothing(sp_folders, tmp_path):
    import shutil

    folder = sp_folders["unigram"]
    with pytest.raises(HyperofaError, match="converted once inside a run directory"):
        load_tokenizer(folder, "tokenizer.path")
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(folder / "sentencepiece.bpe.model", bare)
    with pytest.raises(HyperofaError, match=r"bare: a SentencePiece tokenizer needs its tokenizer_config.json"):
        tokenizer_dir(bare, tmp_path / "run", "tokenizer.path")
    damaged = tmp_path / "damaged"
    shutil.copytree(folder, damaged)
    data = (damaged / "sentencepiece.bpe.model").read_bytes()
    (damaged / "sentencepiece.bpe.model").write_bytes(data[: len(data) // 3])
    with pytest.raises(HyperofaError, match=r"sentencepiece.bpe.model: not a SentencePiece model \(tokenizer.path\)"):
        tokenizer_dir(damaged, tmp_path / "run", "tokenizer.path")
    assert not (tmp_path / "run" / "tokenizers").exists() and take_conversions() == {}


def test_a_source_model_published_with_a_sentencepiece_tokenizer_loads_through_its_conversion(sp_folders, tmp_path):
    """A source model folder as XLM-R-era checkpoints are published (weights, config, the SentencePiece files, no
    tokenizer.json): load_source reads its tokenizer from the run directory's converted copy."""
    import shutil

    from hyperofa_dist.formats.models import load_source
    from hyperofa_dist.formats.tokenizer import source_tokenizer

    folder = sp_folders["unigram"]
    converted = tokenizer_dir(folder, tmp_path / "scratch", "fixture")
    model_dir = synthetic.make_tiny_model("xlmr", converted, tmp_path / "source_model", hidden_size=16)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model_dir / name).unlink(missing_ok=True)
    for path in folder.iterdir():
        shutil.copy(path, model_dir / path.name)
    take_conversions()
    config = load_config(None, [f"run.dir={tmp_path / 'run'}", f"source.model={model_dir}"])
    source = load_source(config)
    assert "source.model" in take_conversions()
    assert len(source.tokenizer) == source.model.get_input_embeddings().weight.shape[0] == 502
    assert source.tokenizer.get_vocab() == load_tokenizer(converted).get_vocab()
    assert source_tokenizer(config)("qaa")["input_ids"] == load_tokenizer(converted)("qaa")["input_ids"]
    assert take_conversions() == {}  # converted once


def test_evaluate_finds_the_held_out_tokenizer_through_the_conversion(sp_folders, source_tokenizers, prepare_format,
                                                                    tmp_path):
    """Shards prepared with a SentencePiece-only tokenizer.path are read back (bpb, fertility) with its converted
    copy, found by the tokenizer.json sha256 prepare recorded, also as evaluate.heldout_tokenizer."""
    from hyperofa_dist.evaluate.stage import heldout_tokenizer_dir

    folder = sp_folders["bpe"]
    run_dir = tmp_path / "run"
    converted = tokenizer_dir(folder, run_dir, "tokenizer.path")
    take_conversions()
    prepare_format.write(run_dir / "prepare", {}, converted, 32)
    other_model = source_tokenizers["xlmr"]  # a model directory whose tokenizer did not make the shards
    for key in ("tokenizer.path", "evaluate.heldout_tokenizer"):
        config = load_config(None, [f"run.dir={run_dir}", f"{key}={folder}", "evaluate.tasks=[bpb]"])
        assert heldout_tokenizer_dir(config, other_model) == (key, converted)
    assert take_conversions() == {}


@pytest.mark.slow
def test_prepare_and_init_take_a_sentencepiece_only_target(sp_folders, small_corpus, init_worlds, tmp_path):
    """prepare (Ray workers) converts the BPE folder, records it, and packs SentencePiece's ids; init, in the same
    run, reuses the copy, matches the mapping built from a conversion made elsewhere (same bytes), exports the
    model with the converted tokenizer and a card that names the prepared languages."""
    from data_prep.prepare.packing import unpack_blocks
    from data_prep.prepare.stage import run as run_prepare
    from hyperofa_dist.cli import main
    from hyperofa_dist.formats.rundir import Stage
    from hyperofa_dist.formats.shards import read_shard
    from hyperofa_dist.tracking import NullTracker
    from tests.conftest import write_init_mapping

    folder = sp_folders["bpe"]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for lang in LANGS:
        lines = synthetic.read_lines(small_corpus / f"{lang}.txt", limit=300)
        (corpus / f"{lang}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    run_dir = tmp_path / "run"
    config = load_config(None, [
        f"run.dir={run_dir}", f"corpus.path={corpus}", f"tokenizer.path={folder}", "tracking.enabled=false",
        "prepare.block_size=32", "prepare.heldout_fraction=0.1", "prepare.sampling.total_sentences=null",
        "ray.num_cpus=1",
    ])
    take_conversions()
    assert run_prepare(config, NullTracker()) == 0
    manifest = Stage(run_dir, "prepare").require()
    converted = target_tokenizer_dir(config)
    record = manifest["tokenizer_conversions"]["tokenizer.path"]
    assert record["model_type"] == "bpe" and record["to"] == f"tokenizers/{converted.name}"
    assert manifest["inputs"]["tokenizer"]["tokenizer.json"] == sha256_file(converted / "tokenizer.json")

    sp = processor(folder)
    encoded = {tuple(i + 1 if i >= 3 else 3 for i in sp.encode(line)) for lang in LANGS
               for line in (corpus / f"{lang}.txt").read_text(encoding="utf-8").splitlines()}
    sep, pad = manifest["special_tokens"]["sep"], manifest["special_tokens"]["pad"]
    whole = 0
    for entry in manifest["shards"]:
        blocks = np.concatenate([s.blocks for s in read_shard(run_dir / "prepare" / entry["path"])])
        for piece in unpack_blocks(blocks, sep, pad)[:-1]:  # the last one may be cut by the block's end
            assert tuple(piece.tolist()) in encoded
            whole += 1
    assert whole > 300

    # init: the mapping is built from a conversion in another directory; the fingerprints must agree.
    source = init_worlds.get("xlmr", k=8).source_model
    elsewhere = tokenizer_dir(folder, tmp_path / "elsewhere", "fixture")
    take_conversions()
    write_init_mapping(run_dir, source, elsewhere, init_worlds.world, k=8)
    assert main(["init", f"run.dir={run_dir}", f"source.model={source}", f"tokenizer.path={folder}",
                 f"corpus.path={corpus}", "tracking.enabled=false", "init.method=random",
                 "init.heldout_blocks=3"]) == 0
    init = Stage(run_dir, "init/random").require()
    assert "tokenizer_conversions" not in init  # prepare made the copy; init reused it
    model_dir = run_dir / "init" / "random" / "model"
    assert (model_dir / "tokenizer.json").read_bytes() == (converted / "tokenizer.json").read_bytes()
    card = (model_dir / "README.md").read_text(encoding="utf-8")
    assert f"| Languages | 3: {', '.join(LANGS)} |" in card
    assert f"| Target tokenizer | 502 tokens (`{folder}`) |" in card
    loss = init["new_token_mlm_loss"]
    assert loss and all(f"| {lang} | {value:.4f} |" in card for lang, value in loss.items())
