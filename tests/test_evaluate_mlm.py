"""Per-language held-out MLM loss: prepare-format shards, equality with the stock HF loss, determinism, errors."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
import webdataset as wds

from hyperofa_dist import synthetic
from hyperofa_dist.errors import HyperofaError
from hyperofa_dist.evaluate import mlm
from hyperofa_dist.evaluate.model import load_model, load_tokenizer, stable_seed
from hyperofa_dist.pretrain.mlm import mask_tokens

from .evaluate_helpers import one_thread  # noqa: F401  (autouse)

BLOCK = 32


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, source_tokenizers):
    return synthetic.make_tiny_model("xlmr", source_tokenizers["xlmr"], tmp_path_factory.mktemp("mlm") / "model")


def packed_blocks(tok, lines: list[str]) -> np.ndarray:
    stream = [i for line in lines for i in tok(line, add_special_tokens=False)["input_ids"] + [tok.sep_token_id]]
    n = len(stream) // (BLOCK - 2)
    pieces = np.array(stream[: n * (BLOCK - 2)], dtype=np.uint32).reshape(n, BLOCK - 2)
    frame = np.full((n, 1), tok.cls_token_id, np.uint32), np.full((n, 1), tok.sep_token_id, np.uint32)
    return np.concatenate([frame[0], pieces, frame[1]], axis=1)


def write_shard(path, lang: str, blocks: np.ndarray, per_sample: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as sink:
        for s, start in enumerate(range(0, len(blocks), per_sample)):
            buffer = io.BytesIO()
            np.save(buffer, blocks[start : start + per_sample])
            sink.write({"__key__": f"{lang}-00000-{s:08d}", "input_ids.npy": buffer.getvalue(), "lang.txt": lang})


@pytest.fixture(scope="module")
def prepare_dir(tmp_path_factory, small_corpus, model_dir):
    """The prepare layout: heldout/<lang>/<lang>-<chunk>-<index>.tar and a manifest listing the shards."""
    root = tmp_path_factory.mktemp("prepare")
    tok = load_tokenizer(model_dir)
    listed = []
    for lang in ("qaa_Latn", "qac_Latn"):
        blocks = packed_blocks(tok, synthetic.read_lines(small_corpus / f"{lang}.txt", limit=120))
        for split, part in (("heldout", blocks[:10]), ("train", blocks[10:20])):
            rel = f"{split}/{lang}/{lang}-00000-000000.tar"
            write_shard(root / rel, lang, part, per_sample=4)
            listed.append({"path": rel, "split": split, "lang": lang, "blocks": len(part)})
    (root / "manifest.json").write_text(json.dumps({"stage": "prepare", "shards": listed}), encoding="utf-8")
    return root


def test_reads_only_heldout_shards_capped_per_language(prepare_dir):
    shards = mlm.find_heldout_shards(prepare_dir)
    assert [s.relative_to(prepare_dir).as_posix() for s in shards] == [
        "heldout/qaa_Latn/qaa_Latn-00000-000000.tar",
        "heldout/qac_Latn/qac_Latn-00000-000000.tar",
    ]
    blocks = mlm.read_heldout_blocks(shards, max_blocks=6)
    assert {k: v.shape for k, v in blocks.items()} == {"qaa_Latn": (6, BLOCK), "qac_Latn": (6, BLOCK)}
    assert blocks["qaa_Latn"].dtype == np.uint32
    assert sorted(mlm.read_heldout_blocks(shards, languages=["qac_Latn"])) == ["qac_Latn"]


def test_loss_equals_stock_hf_loss_and_is_deterministic(prepare_dir, model_dir):
    model, tok = load_model(model_dir, "AutoModelForMaskedLM"), load_tokenizer(model_dir)
    blocks = mlm.read_heldout_blocks(mlm.find_heldout_shards(prepare_dir))
    out = mlm.mlm_loss_per_language(model, tok, blocks, seed=3, batch_size=4)
    again = mlm.mlm_loss_per_language(model, tok, blocks, seed=3, batch_size=7)
    other_seed = mlm.mlm_loss_per_language(model, tok, blocks, seed=4, batch_size=4)
    for lang, ids in blocks.items():
        # The same masks, rebuilt here, through the stock HF forward with labels (logits at every position).
        gen = torch.Generator().manual_seed(stable_seed(3, "heldout-mlm", lang))
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
        mlm.find_heldout_shards(tmp_path)
    with pytest.raises(HyperofaError, match="not found"):
        mlm.find_heldout_shards(tmp_path / "absent")
