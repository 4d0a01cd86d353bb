"""The model-family records against tiny models of every registered masked family: the names a record gives (vocab
keys, word embedding, head modules) are the model's, its prediction head gives the model's own logits, the masked
objective equals the stock loss, the factorised form round-trips under the family's names, a headless checkpoint's
missing head is found, and an expansion onto the source's own vocabulary reproduces the source model."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from hyperofa_dist import synthetic
from hyperofa_dist.errors import HyperofaError
from hyperofa_dist.models import (
    FAMILIES,
    CausalFamily,
    MaskedFamily,
    family_for_type,
    family_named,
    masked_family,
    position_offset,
    sep_token_extra,
)

MASKED = [f.name for f in FAMILIES if isinstance(f, MaskedFamily)]
# The generated tokenizer each masked family is tested with (a family without its own: BERT's WordPiece).
TOKENIZER = {"xlmr": "xlmr", "roberta": "roberta", "bert": "bert", "modernbert": "bert"}


def test_every_model_type_has_one_family_and_unknown_ones_are_refused():
    types = [t for f in FAMILIES for t in f.model_types]
    assert len(types) == len(set(types))
    assert {"bert", "xlmr", "roberta", "llama", "qwen2", "mistral", "gemma"} <= {f.name for f in FAMILIES}
    assert family_for_type("xlm-roberta") is family_named("xlmr") and family_for_type("gpt2") is None
    assert isinstance(family_named("qwen2"), CausalFamily)
    assert position_offset({"model_type": "roberta"}) == position_offset({"model_type": "xlm-roberta"}) == 2
    assert position_offset({"model_type": "bert"}) == position_offset({"model_type": "llama"}) == 0
    assert sep_token_extra("roberta") and sep_token_extra("xlm-roberta") and not sep_token_extra("bert")
    assert not sep_token_extra("llama") and not sep_token_extra(None)
    with pytest.raises(HyperofaError, match=r"^source model: model_type 'llama' is not supported; expected one of \["):
        masked_family({"model_type": "llama"})
    with pytest.raises(ValueError, match="unknown model family 'nope'"):
        family_named("nope")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, source_tokenizers):
    """name -> (saved model dir, model, tokenizer) of every masked family."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    root = tmp_path_factory.mktemp("families")
    out = {}
    for name in MASKED:
        path = synthetic.make_tiny_model(name, source_tokenizers[TOKENIZER.get(name, "bert")], root / name,
                                         hidden_size=32, max_position=40)
        out[name] = (path, AutoModelForMaskedLM.from_pretrained(str(path)).eval(), AutoTokenizer.from_pretrained(str(path)))
    return out


def _batch(tok, n: int = 24) -> torch.Tensor:
    ids = tok(["qaa bla " * 20, "bli qaa " * 20], add_special_tokens=True)["input_ids"]
    return torch.tensor([row[:n] for row in ids])


@pytest.mark.parametrize("name", MASKED)
def test_the_records_names_are_the_models(tiny, name):
    path, model, tok = tiny[name]
    family = masked_family(model.config)
    assert family.name == name and family.kind == "masked"
    state = model.state_dict()
    assert set(family.vocab_keys) <= set(state)
    assert all(state[k].shape[0] == model.config.vocab_size for k in family.vocab_keys)
    assert model.get_submodule(family.embedding) is model.get_input_embeddings()
    assert family.embedding_suffix == family.embedding.rpartition(".")[2] + ".weight"

    from hyperofa_dist.formats.models import read_word_embeddings

    rows = np.array([0, 3, 17])
    np.testing.assert_array_equal(read_word_embeddings(path, rows, family.embedding_suffix),
                                  model.get_input_embeddings().weight.detach().double().numpy()[rows])
    # the base model as retrieval loads it (no pooling layer) gives the masked LM's hidden states
    from transformers import AutoModel

    from hyperofa_dist.models import base_model_kwargs

    base = AutoModel.from_pretrained(str(path), **base_model_kwargs(model.config)).eval()
    assert getattr(base, "pooler", None) is None
    ids = _batch(tok)
    with torch.no_grad():
        torch.testing.assert_close(base(input_ids=ids).last_hidden_state,
                                   model(input_ids=ids, output_hidden_states=True).hidden_states[-1])
    # the table holds the longest block the pretrain stage allows: max_position_embeddings - offset tokens
    longest = model.config.max_position_embeddings - position_offset(model.config)
    with torch.no_grad():
        model(input_ids=torch.full((1, longest), tok.unk_token_id))


@pytest.mark.parametrize("name", MASKED)
def test_prediction_head_and_masked_objective_are_the_models(tiny, name):
    from hyperofa_dist.models.mlm import encoder_of, full_lm_loss, lm_head_of, mask_tokens, masked_lm_loss

    _, model, tok = tiny[name]
    ids = _batch(tok)
    with torch.no_grad():
        hidden = encoder_of(model)(input_ids=ids).last_hidden_state
        torch.testing.assert_close(lm_head_of(model)(hidden), model(input_ids=ids).logits)
        generator = torch.Generator().manual_seed(0)
        inputs, labels = mask_tokens(ids, torch.tensor(tok.all_special_ids), tok.mask_token_id, len(tok), generator, 0.3)
        loss, n = masked_lm_loss(model, inputs, labels)
        assert n == int((labels != -100).sum()) > 0
        torch.testing.assert_close(loss, full_lm_loss(model, inputs, labels))


@pytest.mark.parametrize("name", MASKED)
def test_factorised_form_round_trips_under_the_familys_names(tiny, name):
    from hyperofa_dist.models.factorised import factorise, full_rank_state, to_full_rank

    _, source, tok = tiny[name]
    model = copy.deepcopy(source)
    family = masked_family(model.config)
    rng = np.random.default_rng(0)
    coordinates = rng.standard_normal((model.config.vocab_size, 4)).astype(np.float32)
    primitives = rng.standard_normal((4, model.config.hidden_size)).astype(np.float32)
    factorise(model, coordinates, primitives)
    ids = _batch(tok)
    with torch.no_grad():
        factorised_logits = model(input_ids=ids).logits
    stock, factors = full_rank_state(model.state_dict())
    assert factors is not None and family.embedding + ".weight" in stock
    # every stock name is there but the tied decoder weight, which loading ties back to the embedding
    assert set(stock) <= set(source.state_dict()) and set(source.state_dict()) - set(stock) <= set(family.vocab_keys)
    product = torch.from_numpy(coordinates).double() @ torch.from_numpy(primitives).double()
    torch.testing.assert_close(stock[family.embedding + ".weight"], product.float())
    to_full_rank(model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, factorised_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", MASKED)
def test_a_headless_checkpoint_lacks_exactly_the_familys_head(tiny, name, tmp_path):
    from transformers import AutoModel

    from hyperofa_dist.formats.models import load_model_reporting_missing, quiet_transformers
    from hyperofa_dist.models.head import head_weights

    path, _, tok = tiny[name]
    with quiet_transformers():
        AutoModel.from_pretrained(str(path)).save_pretrained(tmp_path / "encoder")
    tok.save_pretrained(tmp_path / "encoder")
    model, missing = load_model_reporting_missing(tmp_path / "encoder", key="source.model")
    names = head_weights(model, missing)
    prefixes = tuple(m + "." for m in masked_family(model.config).head_modules)
    assert names and all(n.startswith(prefixes) for n in names)


@pytest.mark.parametrize("name", MASKED)
def test_expanding_onto_the_source_vocabulary_reproduces_the_source(tiny, name):
    """Target = source tokenizer, E_t = E_s, every token copied: the expansion path (config rewrite, vocab keys,
    position table) must give back the source model's logits."""
    from hyperofa_dist.models.export import build_expanded_model, merge_copy_pairs, special_token_pairs

    _, source, tok = tiny[name]
    st, ss, _ = special_token_pairs(tok, tok)
    every = np.arange(len(tok))
    copy_t, copy_s = merge_copy_pairs(every, every, st, ss)
    embeddings = source.get_input_embeddings().weight.detach().numpy()[: len(tok)]
    model, info = build_expanded_model(source, tok, tok, embeddings, copy_t, copy_s, pad_to_multiple_of=8)
    assert info.family == name and info.position_shift == 0 and info.model_vocab_size % 8 == 0
    ids = _batch(tok)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits[..., : len(tok)], source(input_ids=ids).logits[..., : len(tok)])
