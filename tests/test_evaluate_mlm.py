"""Per-language held-out MLM loss: prepare-format shards, equality with the stock HF loss, determinism, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hyperofa_dist import synthetic
from hyperofa_dist.errors import HyperofaError
from hyperofa_dist.models import mlm
from hyperofa_dist.formats.models import load_model
from hyperofa_dist.formats.shards import first_blocks, heldout_shards
from hyperofa_dist.formats.tokenizer import load_tokenizer
from hyperofa_dist.models.mlm import mask_tokens
from hyperofa_dist.runtime.seeds import HELDOUT, mix_seed

pytestmark = pytest.mark.usefixtures("one_thread")

BLOCK = 32


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, source_tokenizers):
    return synthetic.make_tiny_model("xlmr", source_tokenizers["xlmr"], tmp_path_factory.mktemp("mlm") / "model")


@pytest.fixture(scope="module")
def prepare_dir(tmp_path_factory, small_corpus, model_dir, prepare_format):
    """The prepare layout: heldout/<lang>/<lang>-<chunk>-<index>.tar and a manifest listing the shards."""
    root = tmp_path_factory.mktemp("run") / "prepare"
    tok = load_tokenizer(model_dir)
    blocks = {}
    for lang in ("qaa_Latn", "qac_Latn"):
        framed = prepare_format.framed_blocks(tok, synthetic.read_lines(small_corpus / f"{lang}.txt", limit=120), BLOCK)
        blocks[lang] = {"heldout": framed[:10], "train": framed[10:20]}
    return prepare_format.write(root, blocks, None, BLOCK, blocks_per_sample=4, samples_per_shard=16)


def test_reads_only_heldout_shards_capped_per_language(prepare_dir):
    shards = heldout_shards(prepare_dir)
    assert [s.relative_to(prepare_dir).as_posix() for s in shards] == [
        "heldout/qaa_Latn/qaa_Latn-00000-000000.tar",
        "heldout/qac_Latn/qac_Latn-00000-000000.tar",
    ]
    blocks = first_blocks(shards, max_blocks=6)
    assert {k: v.shape for k, v in blocks.items()} == {"qaa_Latn": (6, BLOCK), "qac_Latn": (6, BLOCK)}
    assert blocks["qaa_Latn"].dtype == np.uint32
    assert sorted(first_blocks(shards, languages=["qac_Latn"])) == ["qac_Latn"]


def test_loss_equals_stock_hf_loss_and_is_deterministic(prepare_dir, model_dir):
    model, tok = load_model(model_dir, "AutoModelForMaskedLM"), load_tokenizer(model_dir)
    blocks = first_blocks(heldout_shards(prepare_dir))
    out, skipped = mlm.mlm_loss_per_language(model, tok, blocks, seed=3, batch_size=4)
    again, _ = mlm.mlm_loss_per_language(model, tok, blocks, seed=3, batch_size=7)
    other_seed, _ = mlm.mlm_loss_per_language(model, tok, blocks, seed=4, batch_size=4)
    assert skipped == {}
    for lang, ids in blocks.items():
        # The same masks, rebuilt here, through the stock HF forward with labels (logits at every position).
        gen = torch.Generator().manual_seed(mix_seed(3, HELDOUT, lang))
        special = torch.tensor(sorted(set(tok.all_special_ids)))
        inputs, labels = mask_tokens(torch.from_numpy(ids.astype(np.int64)), special, tok.mask_token_id, len(tok), gen)
        with torch.no_grad():
            expected = float(model(input_ids=inputs, labels=labels).loss)
        assert out[lang]["loss"] == pytest.approx(expected, rel=1e-5)
        assert out[lang]["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
        assert again[lang]["loss"] == pytest.approx(out[lang]["loss"], rel=1e-6)
        assert other_seed[lang]["loss"] != out[lang]["loss"]
        # An untrained model over a 400-piece vocabulary is near the uniform loss ln(400).
        assert abs(out[lang]["loss"] - math.log(len(tok))) < 1.0


def test_ids_beyond_the_embedding_are_an_error(tmp_path, model_dir):
    model, tok = load_model(model_dir, "AutoModelForMaskedLM"), load_tokenizer(model_dir)
    bad = np.full((2, BLOCK), 5000, dtype=np.uint32)
    with pytest.raises(HyperofaError, match="qaa_Latn contain token id 5000 but the model has 400 embedding rows"):
        mlm.mlm_loss_per_language(model, tok, {"qaa_Latn": bad}, seed=0)


def test_no_shards_is_an_error(tmp_path):
    with pytest.raises(HyperofaError, match="no .tar shards"):
        heldout_shards(tmp_path)
    with pytest.raises(HyperofaError, match="not found"):
        heldout_shards(tmp_path / "absent")


def test_a_padded_short_block_scores_like_its_unpadded_tokens(model_dir, small_corpus):
    from data_prep.prepare.packing import Specials, flatten_ids, pack_sentences

    model, tok = load_model(model_dir, "AutoModelForMaskedLM"), load_tokenizer(model_dir)
    lines = synthetic.read_lines(small_corpus / "qaa_Latn.txt", limit=3)
    flat, offsets = flatten_ids(tok(lines, add_special_tokens=False)["input_ids"])
    specials = Specials(tok.cls_token_id, tok.sep_token_id, tok.pad_token_id)
    blocks = pack_sentences(flat, offsets, np.arange(3), 128, specials, pad_short=True).blocks
    real = int(np.count_nonzero(blocks[0] != tok.pad_token_id))
    assert blocks.shape == (1, 128) and real < 100  # a short block, padded
    out, skipped = mlm.mlm_loss_per_language(model, tok, {"qac_Latn": blocks}, seed=11)
    gen = torch.Generator().manual_seed(mix_seed(11, HELDOUT, "qac_Latn"))
    special = torch.tensor(sorted(set(tok.all_special_ids)))
    inputs, labels = mask_tokens(torch.from_numpy(blocks.astype(np.int64)), special, tok.mask_token_id, len(tok), gen)
    assert int((labels[0, real:] != -100).sum()) == 0  # padding is never a prediction target
    with torch.no_grad():
        unpadded = float(model(input_ids=inputs[:, :real], labels=labels[:, :real]).loss)
        ignoring_mask = float(model(input_ids=inputs, labels=labels).loss)
    assert skipped == {} and out["qac_Latn"]["loss"] == pytest.approx(unpadded, rel=1e-6)
    # Attending to the padding moves the loss by ~1e-5 (relative) on this tiny model: 100x the tolerance above.
    assert ignoring_mask != pytest.approx(unpadded, rel=1e-6)
