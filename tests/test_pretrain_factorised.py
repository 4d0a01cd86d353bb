"""Factorised continued pretraining, in-process: the masked head on F_t P, its sparse lookup gradient, the AdamW
groups and warm-up, the FLOP count, the export's state-dict conversion, and the stage's plan (which form trains)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hyperofa_dist import synthetic
from hyperofa_dist.config import load_config
from hyperofa_dist.errors import HyperofaError
from hyperofa_dist.formats import init as init_format
from hyperofa_dist.formats.models import load_model
from hyperofa_dist.models.factorised import (
    factorise,
    full_rank_state,
    load_factorised,
    parameter_counts,
    to_full_rank,
)
from hyperofa_dist.models.mlm import IGNORE, mask_tokens, masked_lm_loss, sparse_embedding_grad
from hyperofa_dist.pretrain.optim import DECAY, EMBEDDING, EmbeddingWarmup, param_groups
from hyperofa_dist.pretrain.perf import body_params, flops_per_token, model_flops_per_token
from hyperofa_dist.pretrain.stage import embeddings_plan

K = 8


@pytest.fixture(scope="module")
def kit(tmp_path_factory, small_corpus, pretrain_kit):
    root = tmp_path_factory.mktemp("factorised")
    tok, model = pretrain_kit.tokenizer_and_model(root / "full", small_corpus)
    factorised = pretrain_kit.factorised_model(root / "fact", model, k=K)
    texts = synthetic.read_lines(small_corpus / "qaa_Latn.txt", 8)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(factorised)
    enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=32)
    special = torch.tensor(tokenizer.all_special_ids)
    inputs, labels = mask_tokens(enc["input_ids"], special, tokenizer.mask_token_id, len(tokenizer),
                                 torch.Generator().manual_seed(0), 0.3)
    labels[enc["attention_mask"] == 0] = IGNORE
    return {"root": root, "full": model, "model": factorised, "inputs": inputs, "labels": labels,
            "mask": enc["attention_mask"]}


def test_masked_loss_of_the_factorised_model_equals_the_full_rank_one(kit):
    full = load_model(kit["model"])
    fact = load_factorised(kit["model"])
    with torch.no_grad():
        want, n = masked_lm_loss(full, kit["inputs"], kit["labels"], kit["mask"])
        got, m = masked_lm_loss(fact, kit["inputs"], kit["labels"], kit["mask"])
    assert n == m > 0
    assert got.item() == pytest.approx(want.item(), abs=1e-5)
    counts = parameter_counts(fact)
    vocab, hidden = full.get_input_embeddings().weight.shape
    assert counts["parameters_embeddings"] == vocab * K + K * hidden
    assert parameter_counts(full)["parameters_total"] - counts["parameters_total"] == vocab * hidden - (vocab * K + K * hidden)


def test_sparse_coordinate_lookup_gives_the_dense_gradient(kit):
    grads = []
    for sparse in (False, True):
        model = load_factorised(kit["model"])
        assert sparse_embedding_grad(model) if sparse else True
        loss, _ = masked_lm_loss(model, kit["inputs"], kit["labels"], kit["mask"])
        loss.backward()
        emb = model.get_input_embeddings()
        grads.append((emb.coordinates.weight.grad.to_dense(), emb.primitives.grad.clone()))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-7) and grads[0][0].abs().sum() > 0
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-7)


def test_groups_and_warmup_train_only_new_coordinate_rows(kit):
    model = load_factorised(kit["model"])
    emb = model.get_input_embeddings()
    groups = {g["name"]: g["params"] for g in param_groups(model, 0.01)}
    assert any(p is emb.coordinates.weight for p in groups[EMBEDDING]) and len(groups[EMBEDDING]) == 1
    assert any(p is emb.primitives for p in groups[DECAY])  # P waits with the encoder
    rows = torch.zeros(emb.coordinates.weight.shape[0], dtype=torch.bool)
    rows[300:] = True
    warmup = EmbeddingWarmup(model, rows)
    loss, _ = masked_lm_loss(model, kit["inputs"], kit["labels"], kit["mask"])
    loss.backward()
    grad = emb.coordinates.weight.grad
    assert not grad[:300].any() and grad[300:].abs().sum() > 0
    assert not emb.primitives.grad.any()
    warmup.remove()


def test_flops_of_the_factorised_head_by_hand(kit):
    # XLM-R-base x 401,145 at k = 400, every position predicted: 6 N + 12 L d T + 6 k d + 6 (d k + k V)
    n_body, layers, d, t, v, k = 86.44e6, 12, 768, 512, 401_145, 400
    by_hand = 6 * n_body + 12 * layers * d * t + 6 * k * d + 6 * (d * k + k * v)
    assert flops_per_token(n_body, layers, d, t, v, 1.0, rank=k) == pytest.approx(by_hand, rel=1e-12)
    assert by_hand / 1e9 == pytest.approx(1.54, abs=0.01)  # against 2.42 GFLOP full rank
    full = load_model(kit["model"])
    fact = load_factorised(kit["model"])
    assert body_params(fact) == body_params(full)
    cfg = full.config
    assert model_flops_per_token(fact, 32, 0.15) == pytest.approx(
        flops_per_token(body_params(full), cfg.num_hidden_layers, cfg.hidden_size, 32, cfg.vocab_size, 0.15, K))


def test_state_dict_conversion_and_to_full_rank_agree(kit):
    fact = load_factorised(kit["model"])
    with torch.no_grad():
        fact.get_input_embeddings().primitives.mul_(1.5)  # as if trained: no longer the init's product
    state, factors = full_rank_state(fact.state_dict())
    assert factors is not None and not any(key.endswith("coordinates.weight") for key in state)
    full = to_full_rank(load_factorised(kit["model"]))
    with torch.no_grad():
        full.get_input_embeddings().weight.copy_(state["roberta.embeddings.word_embeddings.weight"])
    with torch.no_grad():
        a, _ = masked_lm_loss(fact, kit["inputs"], kit["labels"], kit["mask"])
        b, _ = masked_lm_loss(full, kit["inputs"], kit["labels"], kit["mask"])
    assert a.item() == pytest.approx(b.item(), abs=1e-5)
    untouched, none = full_rank_state(full.state_dict())
    assert none is None and untouched.keys() == full.state_dict().keys()


def test_factorise_a_token_classifier_keeps_its_head(kit):
    from transformers import AutoModelForTokenClassification

    tagger = load_model(kit["model"], "AutoModelForTokenClassification", num_labels=3)
    assert isinstance(tagger, AutoModelForTokenClassification._model_mapping[type(tagger.config)])
    coordinates, primitives = init_format.load_factors(kit["model"].parent)
    factorise(tagger, coordinates, primitives)
    with torch.no_grad():
        out = tagger(input_ids=kit["inputs"], attention_mask=kit["mask"]).logits
    assert out.shape[-1] == 3 and torch.isfinite(out).all()


def _config(kit, *extra):
    return load_config(None, [f"run.dir={kit['root'] / 'run'}", *extra])


def test_plan_auto_factorised_full_and_refusals(kit, tmp_path):
    assert embeddings_plan(_config(kit), kit["model"]) == ("factorised", kit["model"].parent)
    assert embeddings_plan(_config(kit, "pretrain.embeddings=full"), kit["model"]) == ("full", None)
    assert embeddings_plan(_config(kit), kit["full"]) == ("full", None)  # no factors beside it
    with pytest.raises(HyperofaError, match=r"needs F_t.npy and P.npy beside the model"):
        embeddings_plan(_config(kit, "pretrain.embeddings=factorised"), kit["full"])
    # Factors left beside a model they do not belong to are refused, not trained.
    import shutil

    stray = tmp_path / "init" / "hyperofa"
    shutil.copytree(kit["model"].parent, stray)
    np.save(stray / init_format.PRIMITIVES, np.load(stray / init_format.PRIMITIVES) * 2)
    with pytest.raises(HyperofaError, match=r"not F_t P of the factors beside it"):
        embeddings_plan(_config(kit), stray / "model")
