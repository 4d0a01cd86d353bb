"""Factorised variant F_t P (tied to the output projection) and its export to the stock full-rank format (docs/METHOD.md §4.1)."""

import numpy as np
import torch
from transformers import AutoModelForMaskedLM

from hyperofa_dist.models.factorised import factorise, is_factorised, load_factorised, save_full_rank


def test_factorised_model_matches_full_rank_trains_and_exports(tmp_path, init_worlds):
    w = init_worlds.get("xlmr", k=8)
    init_dir = tmp_path / "init"
    e = init_worlds.export_copy_random(w, init_dir / "model", pad=64, seed=1)
    full, t_tok, mapping = e.model, e.target_tok, e.mapping
    np.save(init_dir / "F_t.npy", e.coordinates)
    np.save(init_dir / "P.npy", mapping.primitives)

    model = load_factorised(init_dir / "model").eval()
    assert is_factorised(model)
    emb, dec = model.get_input_embeddings(), model.get_output_embeddings()
    assert dec.embedding is emb  # the output projection uses the same F_t and P
    assert dec.bias is model.lm_head.bias
    n_full = sum(p.numel() for p in full.parameters())
    n_fact = sum(p.numel() for p in model.parameters())
    vocab, hidden, k = full.config.vocab_size, full.config.hidden_size, mapping.k
    assert n_full - n_fact == vocab * hidden - (vocab * k + k * hidden)

    ids = t_tok(["Бара дома тата.", "bara mu"], padding=True, return_tensors="pt")
    with torch.no_grad():
        want = full.eval()(**ids).logits
        got = model(**ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)

    # one training step moves coordinates and primitives
    model.train()
    labels = ids["input_ids"].clone()
    loss = model(**ids, labels=labels).loss
    loss.backward()
    assert emb.coordinates.weight.grad.abs().sum() > 0 and emb.primitives.grad.abs().sum() > 0
    with torch.no_grad():
        emb.coordinates.weight -= 0.1 * emb.coordinates.weight.grad
        emb.primitives -= 0.1 * emb.primitives.grad
    model.eval()
    with torch.no_grad():
        trained = model(**ids).logits

    save_full_rank(model, t_tok, tmp_path / "exported")
    stock = AutoModelForMaskedLM.from_pretrained(str(tmp_path / "exported"))
    stock.eval()
    assert not is_factorised(stock)
    assert stock.get_input_embeddings().weight.data_ptr() == stock.get_output_embeddings().weight.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(stock(**ids).logits, trained, rtol=0, atol=1e-5)
    torch.testing.assert_close(
        stock.get_input_embeddings().weight,
        (emb.coordinates.weight @ emb.primitives).detach(),
        rtol=0,
        atol=1e-6,
    )


def test_factorise_pads_coordinates_to_the_model_vocabulary(init_worlds):
    from transformers import AutoModelForMaskedLM

    w = init_worlds.get("xlmr", k=8)
    model = AutoModelForMaskedLM.from_pretrained(str(w.source_model))
    vocab, hidden = model.get_input_embeddings().weight.shape
    coords = np.ones((vocab - 3, 4), np.float32)
    factorise(model, coords, np.ones((4, hidden), np.float32))
    weight = model.get_input_embeddings().coordinates.weight
    assert weight.shape == (vocab, 4) and not weight[vocab - 3 :].any()
