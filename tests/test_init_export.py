"""The expanded model in stock HF format for XLM-R, RoBERTa and BERT (docs/METHOD.md §1.10, §4.1)."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer

from hyperofa_dist.errors import HyperofaError
from hyperofa_dist.models.export import merge_copy_pairs, special_token_pairs


def stock(model_dir):
    """Loaded as any HF user would: stock AutoModelForMaskedLM and AutoTokenizer."""
    return AutoModelForMaskedLM.from_pretrained(str(model_dir)), AutoTokenizer.from_pretrained(str(model_dir))


def export(init_worlds, w, out_dir, pad=None):
    e = init_worlds.export_copy_random(w, out_dir, pad)
    return e.source, e.source_tok, e.mapping, e.copy_t, e.copy_s, e.info


def tied(model):
    return model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()


@pytest.mark.parametrize("family", ["xlmr", "roberta", "bert"])
def test_full_rank_export_loads_stock_and_matches_source_logits(
    tmp_path, init_worlds, family
):
    w = init_worlds.get(family)  # k = D
    source, s_tok, mapping, copy_t, copy_s, info = export(init_worlds, w, tmp_path / "model")
    model, tok = stock(tmp_path / "model")  # stock AutoModelForMaskedLM / AutoTokenizer
    model.eval()
    assert type(model) is type(source) and tied(model)
    assert model.config.vocab_size == len(tok) == info.vocab_size > len(s_tok)
    emb = model.get_input_embeddings().weight.detach()
    src_emb = source.get_input_embeddings().weight.detach()
    torch.testing.assert_close(emb[copy_t], src_emb[copy_s], rtol=0, atol=0)
    # output bias: source bias for copied tokens, the mean source bias elsewhere
    bias = model.get_output_embeddings().bias.detach()
    src_bias = source.get_output_embeddings().bias.detach()
    torch.testing.assert_close(bias[copy_t], src_bias[copy_s], rtol=0, atol=0)
    others = np.setdiff1d(np.arange(len(tok)), copy_t)
    torch.testing.assert_close(bias[others], torch.full((len(others),), src_bias.double().mean().item()), rtol=0,
                               atol=1e-6)
    # a sentence made only of copied tokens: same logits over the copied ids as the source model's
    specials = set(tok.all_special_ids)
    body = [int(t) for t in copy_t if int(t) not in specials][:12]
    pair = dict(zip(copy_t.tolist(), copy_s.tolist()))
    t_ids = [tok.cls_token_id] + body + [tok.sep_token_id]
    s_ids = [pair[t] for t in t_ids]
    with torch.no_grad():
        got = model(torch.tensor([t_ids])).logits[0][:, torch.from_numpy(copy_t)]
        want = source(torch.tensor([s_ids])).logits[0][:, torch.from_numpy(copy_s)]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    # and it runs on target-tokenizer text of new languages
    enc = tok(["Дома бара.", "ωμέγα τα"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**enc).logits
    assert out.shape[-1] == len(tok) and torch.isfinite(out).all()


def test_factorised_copies_equal_fs_p_rows_and_padding(tmp_path, init_worlds):
    w = init_worlds.get("xlmr", k=8)
    source, s_tok, mapping, copy_t, copy_s, info = export(init_worlds, w, tmp_path / "model", pad=64)
    model, tok = stock(tmp_path / "model")
    assert tied(model)
    assert model.config.vocab_size % 64 == 0 and model.config.vocab_size >= len(tok)
    assert info.padded_rows == [len(tok), model.config.vocab_size]
    emb = model.get_input_embeddings().weight.detach().numpy()
    f_s_p = np.asarray(mapping.source_coordinates)[copy_s] @ mapping.primitives
    np.testing.assert_allclose(emb[copy_t], f_s_p, rtol=0, atol=1e-6)
    assert not np.allclose(emb[copy_t], source.get_input_embeddings().weight.detach().numpy()[copy_s], atol=1e-6)
    assert not emb[len(tok):].any()  # padded rows: zero embeddings (documented)


def test_special_tokens_map_by_role_or_fail(source_tokenizers, tmp_path):
    xlmr = AutoTokenizer.from_pretrained(str(source_tokenizers["xlmr"]))
    bert = AutoTokenizer.from_pretrained(str(source_tokenizers["bert"]))
    t, s, names = special_token_pairs(xlmr, bert)  # bert target, xlmr source: every role has a partner
    assert names["[CLS]"] == "<s>" and names["[MASK]"] == "<mask>" and names["[PAD]"] == "<pad>"
    assert dict(zip(t, s))[bert.mask_token_id] == xlmr.mask_token_id
    extra = AutoTokenizer.from_pretrained(str(source_tokenizers["xlmr"]))
    extra.add_special_tokens({"additional_special_tokens": ["<lang_qab>"]})  # no such token in the source
    with pytest.raises(HyperofaError, match="special token '<lang_qab>' .* cannot be mapped"):
        special_token_pairs(xlmr, extra)
    no_mask = AutoTokenizer.from_pretrained(str(source_tokenizers["xlmr"]))
    no_mask.mask_token = None
    with pytest.raises(HyperofaError, match="has no mask_token"):
        special_token_pairs(xlmr, no_mask)


def test_merge_copy_pairs_special_roles_win():
    t, s = merge_copy_pairs(np.array([0, 4, 9]), np.array([10, 14, 19]), np.array([4, 2]), np.array([1, 0]))
    assert t.tolist() == [0, 2, 4, 9] and s.tolist() == [10, 0, 1, 19]


def test_head_weights_are_only_those_missing_under_every_tied_name(init_worlds):
    from hyperofa_dist.formats.models import load_model
    from hyperofa_dist.models.head import head_weights

    model = load_model(init_worlds.get("xlmr").source_model)
    # lm_head.decoder.bias is lm_head.bias: reported missing under one name only, it was loaded under the other.
    assert head_weights(model, ["lm_head.decoder.bias"]) == []
    both = ["lm_head.bias", "lm_head.decoder.bias", "lm_head.dense.weight"]
    assert head_weights(model, both) == both
    assert head_weights(model, ["lm_head.decoder.weight"]) == []  # the word embedding, rebuilt by the export
    with pytest.raises(HyperofaError, match="lacks 1 weights outside the MLM head"):
        head_weights(model, ["roberta.encoder.layer.0.output.dense.weight", "lm_head.bias"])
