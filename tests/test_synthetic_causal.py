"""The generated causal-LM sources: Llama-3-style and Llama-2-style tokenizers, tiny untied and tied causal LMs."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hyperofa_dist import synthetic


def test_llama3_style_keeps_its_special_tokens_after_the_bpe_vocabulary(causal_tokenizers):
    data = json.loads((causal_tokenizers["llama3"] / "tokenizer.json").read_text(encoding="utf-8"))
    bpe = data["model"]["vocab"]
    assert data["model"]["type"] == "BPE" and data["model"]["ignore_merges"] and len(bpe) == 400
    added = {t["content"]: t["id"] for t in data["added_tokens"]}
    assert list(added) == list(synthetic.LLAMA3_SPECIALS)
    assert sorted(added.values()) == list(range(400, 400 + len(synthetic.LLAMA3_SPECIALS)))
    tok = AutoTokenizer.from_pretrained(str(causal_tokenizers["llama3"]))
    assert len(tok) == 416 and tok.bos_token == "<|begin_of_text|>" and tok.eos_token == "<|end_of_text|>"
    assert tok.pad_token is None and tok.unk_token is None
    assert tok("Kalo mi")["input_ids"][0] == 400  # BOS opens every encoding


def test_llama2_style_has_unk_bos_eos_then_256_byte_tokens_then_pieces(causal_tokenizers):
    tok = AutoTokenizer.from_pretrained(str(causal_tokenizers["llama2"]))
    assert tok.convert_ids_to_tokens([0, 1, 2, 3, 258]) == ["<unk>", "<s>", "</s>", "<0x00>", "<0xFF>"]
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, None)
    assert len(tok) == 259 + 400
    # A character the pieces never saw falls back to its UTF-8 bytes, not to <unk>.
    assert tok.tokenize("ሀ") == ["▁", "<0xE1>", "<0x88>", "<0x80>"]


@pytest.mark.parametrize("kind", synthetic.CAUSAL_TOKENIZER_FAMILIES)
def test_causal_tokenizers_are_deterministic_and_decode_every_script(kind, small_corpus, causal_tokenizers, tmp_path):
    texts = synthetic.read_lines(small_corpus / "qaa_Latn.txt")
    again = synthetic.train_source_tokenizer(kind, texts, 400, tmp_path / kind)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (again / name).read_bytes() == (causal_tokenizers[kind] / name).read_bytes()
    tok = AutoTokenizer.from_pretrained(str(again))
    world = synthetic.World(synthetic.multiscript_languages(), n_concepts=200, seed=0, mixed=True)
    lines = [line for lang in world.languages for line in world.render(lang.code, world.concept_sentences(5, 1))]
    assert [tok.decode(tok(line)["input_ids"], skip_special_tokens=True) for line in lines] == lines
    assert tok.unk_token_id not in {i for line in lines for i in tok(line)["input_ids"]}


def test_qwen2_style_is_what_qwen2tokenizer_rebuilds_beside_a_qwen2_model(causal_tokenizers, tmp_path):
    tok = AutoTokenizer.from_pretrained(str(causal_tokenizers["qwen2"]))
    assert type(tok).__name__ == "Qwen2Tokenizer" and len(tok) == 403 and tok.bos_token is None
    assert tok.convert_ids_to_tokens([400, 401, 402]) == list(synthetic.QWEN2_SPECIALS)
    assert tok.eos_token_id == tok.pad_token_id == 400
    model_dir = synthetic.make_tiny_model("qwen2", causal_tokenizers["qwen2"], tmp_path / "m", hidden_size=32)
    beside = AutoTokenizer.from_pretrained(str(model_dir))  # the class transformers forces for model_type qwen2
    assert type(beside).__name__ == "Qwen2Tokenizer" and beside.get_vocab() == tok.get_vocab()
    with pytest.raises(ValueError, match="needs a qwen2 tokenizer"):
        synthetic.make_tiny_model("qwen2", causal_tokenizers["llama3"], tmp_path / "bad", hidden_size=32)


@pytest.mark.parametrize("family, kind, rows", [("llama", "llama3", 416), ("qwen2", "qwen2", 403)])
def test_tiny_causal_models_are_tied_only_for_qwen2(family, kind, rows, causal_tokenizers, tmp_path):
    path = synthetic.make_tiny_model(family, causal_tokenizers[kind], tmp_path / family, hidden_size=32)
    model = AutoModelForCausalLM.from_pretrained(str(path))
    tied = synthetic.CAUSAL_FAMILIES[family]
    assert model.config.tie_word_embeddings is tied
    assert (model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()) is tied
    assert model.get_input_embeddings().num_embeddings == rows and model.get_input_embeddings().padding_idx is None
    again = synthetic.make_tiny_model(family, causal_tokenizers[kind], tmp_path / "again", hidden_size=32)
    assert (again / "model.safetensors").read_bytes() == (path / "model.safetensors").read_bytes()
    ids = torch.tensor([AutoTokenizer.from_pretrained(str(path))("Kalo mi ne.")["input_ids"]])
    assert model(ids).logits.shape == (1, ids.shape[1], rows)
