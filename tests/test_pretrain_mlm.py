import pytest
import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer

from hyperofa_dist import synthetic
from hyperofa_dist.models.mlm import IGNORE, full_lm_loss, mask_tokens, masked_lm_loss, sparse_embedding_grad


def test_masking_rates_and_special_tokens_never_masked():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (64, 128))
    ids[:, 0], ids[:, -1] = 0, 2
    special = torch.tensor([0, 1, 2, 3, 4])
    inputs, labels = mask_tokens(ids, special, mask_id=4, vocab_size=1000, generator=gen)
    chosen = labels != IGNORE
    assert not chosen[:, 0].any() and not chosen[:, -1].any()
    rate = chosen.float().mean().item() * 128 / 126
    assert abs(rate - 0.15) < 0.01
    assert torch.equal(labels[chosen], ids[chosen])
    masked = (inputs == 4) & chosen
    unchanged = (inputs == ids) & chosen
    assert abs(masked.sum().item() / chosen.sum().item() - 0.8) < 0.03
    # 10% random + 10% kept (a random draw can equal the original, so "unchanged" is a little above 10%)
    assert 0.08 < unchanged.sum().item() / chosen.sum().item() < 0.13
    assert torch.equal(inputs[~chosen], ids[~chosen])


def test_masking_is_seeded():
    ids = torch.randint(5, 1000, (8, 32))
    special = torch.tensor([0, 1, 2])
    a = mask_tokens(ids, special, 4, 1000, torch.Generator().manual_seed(3))
    b = mask_tokens(ids, special, 4, 1000, torch.Generator().manual_seed(3))
    c = mask_tokens(ids, special, 4, 1000, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


@pytest.mark.parametrize("family", synthetic.FAMILIES)
def test_masked_head_loss_equals_full_head_loss(family, source_tokenizers, tmp_path, small_corpus):
    model_dir = synthetic.make_tiny_model(family, source_tokenizers[family], tmp_path / "m")
    model = AutoModelForMaskedLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = synthetic.read_lines(small_corpus / "qaa_Latn.txt", 6)
    enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=64)
    special = torch.tensor(tok.all_special_ids)
    inputs, labels = mask_tokens(enc["input_ids"], special, tok.mask_token_id, len(tok), torch.Generator().manual_seed(0))
    labels[enc["attention_mask"] == 0] = IGNORE
    with torch.no_grad():
        fast, n = masked_lm_loss(model, inputs, labels, enc["attention_mask"])
        slow = full_lm_loss(model, inputs, labels, enc["attention_mask"])
    assert n == int((labels != IGNORE).sum()) > 0
    assert torch.allclose(fast, slow, atol=1e-5), (fast.item(), slow.item())
    # gradients agree too (the head's weights are tied to the input embeddings)
    model.train(False)
    model.zero_grad()
    masked_lm_loss(model, inputs, labels, enc["attention_mask"])[0].backward()
    g_fast = model.get_input_embeddings().weight.grad.clone()
    model.zero_grad()
    full_lm_loss(model, inputs, labels, enc["attention_mask"]).backward()
    g_slow = model.get_input_embeddings().weight.grad.clone()
    assert torch.allclose(g_fast, g_slow, atol=1e-5)
    # the sparse lookup gradient of the training wrapper: one dense gradient, the same values
    assert sparse_embedding_grad(model) and model.get_input_embeddings().sparse
    model.zero_grad(set_to_none=True)
    masked_lm_loss(model, inputs, labels, enc["attention_mask"])[0].backward()
    g_sparse = model.get_input_embeddings().weight.grad
    assert g_sparse.layout == torch.strided and torch.allclose(g_sparse, g_slow, atol=1e-5)
    # a batch with nothing masked still gives the tied weight a dense (zero) gradient
    model.zero_grad(set_to_none=True)
    masked_lm_loss(model, inputs, torch.full_like(labels, IGNORE), enc["attention_mask"])[0].backward()
    g_none = model.get_input_embeddings().weight.grad
    assert g_none.layout == torch.strided and not g_none.any()


def test_untied_embeddings_keep_the_dense_lookup_gradient(source_tokenizers, tmp_path):
    model_dir = synthetic.make_tiny_model("xlmr", source_tokenizers["xlmr"], tmp_path / "m")
    model = AutoModelForMaskedLM.from_pretrained(model_dir)
    model.get_output_embeddings().weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
    assert not sparse_embedding_grad(model) and not model.get_input_embeddings().sparse
