"""Fast tests of the causal-LM objective: the chunked loss against full logits and the stock HF loss, the document
layout of packed blocks, the loader's unmasked blocks, the warm-up of both embedding matrices, and the bad input
refused before any DeepSpeed process is launched."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from hyperofa_dist.config import load_config
from hyperofa_dist.errors import HyperofaError
from hyperofa_dist.formats.shards import load_shardset
from hyperofa_dist.formats.tokenizer import load_tokenizer
from hyperofa_dist.pretrain import data as D
from hyperofa_dist.models.causal import (
    IGNORE,
    Frame,
    HeadTransform,
    block_layout,
    causal_lm_loss,
    head_transform,
    hf_labels,
    linear_cross_entropy,
)
from hyperofa_dist.pretrain.optim import (
    EMBEDDING,
    EmbeddingWarmup,
    apply_settings,
    group_settings,
    param_groups,
    trainable_rows_from_provenance,
)
from hyperofa_dist.pretrain.perf import body_params
from hyperofa_dist.pretrain.stage import run as run_pretrain_stage
from hyperofa_dist.tracking import NullTracker

COPIED = 300  # conftest.PretrainKit.COPIED


@pytest.fixture(scope="module")
def causal_world(tmp_path_factory, small_corpus, pretrain_kit):
    root = tmp_path_factory.mktemp("pretrain_causal")
    tok = pretrain_kit.causal_tokenizer(root, small_corpus)
    llama = pretrain_kit.causal_model(root / "llama", tok, "llama")
    qwen_tok = pretrain_kit.causal_tokenizer(root, small_corpus, "qwen2")  # no BOS: blocks open with EOS
    qwen = pretrain_kit.causal_model(root / "qwen2", qwen_tok, "qwen2")
    shards = pretrain_kit.framed_prepare(root / "prepare", small_corpus, tok)
    return {"root": root, "tok": tok, "llama": llama, "qwen2": qwen, "prepare": shards,
            "toks": {"llama": tok, "qwen2": qwen_tok}}


# --- the chunked loss ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("transform, with_bias", [
    (HeadTransform(), False), (HeadTransform(), True), (HeadTransform(scale=0.25), False),
    (HeadTransform(softcap=3.0), True),
])
def test_chunked_loss_and_gradients_equal_the_full_logits_ones(dtype, tol, transform, with_bias):
    gen = torch.Generator().manual_seed(0)
    n, vocab, hidden = 300, 1000, 32
    h0 = torch.randn(n, hidden, generator=gen, dtype=dtype)
    w0 = torch.randn(vocab, hidden, generator=gen, dtype=dtype) * 0.3
    b0 = torch.randn(vocab, generator=gen, dtype=dtype) * 0.1
    labels = torch.randint(vocab, (n,), generator=gen)
    labels[::7] = IGNORE
    got = {}
    for chunk in (0, 64, 1000):  # full logits; chunks that do not divide 300; one chunk holding everything
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        b = b0.clone().requires_grad_() if with_bias else None
        loss = linear_cross_entropy(h, w, labels, bias=b, chunk=chunk, transform=transform)
        (loss * 0.5).backward()
        got[chunk] = [loss.detach(), h.grad, w.grad] + ([b.grad] if with_bias else [])
    reference = torch.nn.functional.cross_entropy(
        _transformed(h0 @ w0.T + (b0 if with_bias else 0), transform), labels, ignore_index=IGNORE, reduction="sum")
    assert got[0][0].item() == pytest.approx(reference.item(), rel=tol)
    for chunk in (64, 1000):
        for a, b in zip(got[chunk], got[0]):
            assert ((a - b).abs().max() / b.abs().max()).item() < tol
    assert (got[64][1][::7] == 0).all()  # an ignored position gets no gradient


def _transformed(z, t):
    z = z * t.scale
    return torch.tanh(z / t.softcap) * t.softcap if t.softcap else z


def test_tied_weight_sums_the_lookup_and_head_gradients():
    gen = torch.Generator().manual_seed(1)
    w0 = torch.randn(50, 8, generator=gen, dtype=torch.float64) * 0.3
    ids, labels = torch.randint(50, (40,), generator=gen), torch.randint(50, (40,), generator=gen)
    grads = []
    for chunk in (0, 16):
        w = w0.clone().requires_grad_()
        linear_cross_entropy(torch.tanh(w[ids] * 2), w, labels, chunk=chunk).backward()
        grads.append(w.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-12)


def test_head_transform_reads_the_families_logit_settings():
    assert head_transform({"model_type": "llama"}) == HeadTransform(1.0, None)
    assert head_transform({"final_logit_softcapping": 30.0}) == HeadTransform(1.0, 30.0)
    assert head_transform({"logit_scale": 0.0625}) == HeadTransform(0.0625, None)
    assert head_transform({"logits_scaling": 8.0}) == HeadTransform(0.125, None)


# --- blocks: positions, documents, labels ------------------------------------------------------------------------


def test_block_layout_by_hand():
    frame = Frame.of(1, 2, 0)
    ids = torch.tensor([
        [1, 5, 6, 7, 2, 8, 9, 2, 10, 11, 2],  # [start] a a a [sep] b b [sep] c c [end]: c is cut by the block end
        [1, 5, 2, 8, 2, 2, 0, 0, 0, 0, 0],  # a padded held-out block: its last line's [sep], then [end], padding
    ])
    layout = block_layout(ids, frame)
    assert layout.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 0], [0, 1, 0, 1, 0, 0, 1, 2, 3, 4, 5]]
    assert layout.documents.tolist() == [[0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 3], [0, 0, 1, 1, 2, 3, 3, 3, 3, 3, 3]]
    x = IGNORE
    assert layout.labels.tolist() == [[5, 6, 7, 2, 8, 9, 2, 10, 11, x, x], [5, 2, 8, 2, x, x, x, x, x, x, x]]
    mask = layout.attention_mask(torch.float32)[0, 0]
    reads = mask == 0
    assert reads[6].nonzero().flatten().tolist() == [4, 5, 6]  # the second line's last token: its own line only
    assert reads[4].nonzero().flatten().tolist() == [4]  # a separator opens the next document
    assert (mask[~reads] == torch.finfo(torch.float32).min).all()
    block = block_layout(ids, frame, "block")
    assert block.position_ids is None and block.attention_mask(torch.float32) is None
    assert torch.equal(block.labels, layout.labels)
    assert Frame.of(1, 2, 2).pad is None and Frame.of(1, 2, 1).pad is None  # a pad that frames never pads


@pytest.mark.parametrize("family, attn", [("llama", "eager"), ("llama", "sdpa"), ("qwen2", "sdpa")])
def test_a_line_inside_a_block_reads_as_the_line_alone(causal_world, family, attn):
    from hyperofa_dist.formats.tokenizer import frame_ids

    model = AutoModelForCausalLM.from_pretrained(causal_world[family], attn_implementation=attn).eval()
    tok = load_tokenizer(causal_world["toks"][family])
    lines = ["alpha beta gamma", "delta epsilon", "zeta eta theta iota"]
    pieces = [tok(line, add_special_tokens=False)["input_ids"] for line in lines]
    frame = Frame.of(*frame_ids(tok, "test"), None)  # qwen2: EOS opens the block too
    ids = [frame.start]
    for piece in pieces:
        ids += piece + [frame.sep]
    block = torch.tensor([ids + [frame.sep]])
    layout = block_layout(block, frame)
    with torch.no_grad():
        packed = model(input_ids=block, attention_mask=layout.attention_mask(torch.float32),
                       position_ids=layout.position_ids, use_cache=False).logits[0]
        start = 1 + len(pieces[0])  # the first line's separator opens the second line
        alone = model(input_ids=torch.tensor([[frame.sep, *pieces[1]]]), use_cache=False).logits[0]
        assert (packed[start : start + len(pieces[1]) + 1] - alone).abs().max() < 1e-5
        first = model(input_ids=torch.tensor([[frame.start, *pieces[0]]]), use_cache=False).logits[0]
        assert (packed[: len(pieces[0]) + 1] - first).abs().max() < 1e-5
        whole = model(input_ids=block, use_cache=False).logits[0]
        assert (whole[start : start + len(pieces[1]) + 1] - alone).abs().max() > 1e-3  # without the mask it differs


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_causal_loss_equals_the_stock_hf_loss_and_its_gradients(causal_world, family):
    if family == "gemma2":  # soft-capped logits, tied: the transform must be applied by the chunked head
        from transformers import Gemma2Config, Gemma2ForCausalLM

        torch.manual_seed(0)
        model = Gemma2ForCausalLM(Gemma2Config(
            vocab_size=516, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, final_logit_softcapping=2.0, attn_implementation="eager",
            bos_token_id=1, eos_token_id=2, pad_token_id=None))
    else:
        model = AutoModelForCausalLM.from_pretrained(causal_world[family])
    model.train(False)
    blocks = D.first_blocks(load_shardset(causal_world["prepare"]).heldout["qaa_Latn"], 4)["qaa_Latn"]
    ids = torch.from_numpy(blocks.astype(np.int64)) % model.config.vocab_size
    tok = load_tokenizer(causal_world["tok"])
    layout = block_layout(ids, Frame.of(tok.bos_token_id, tok.eos_token_id, None))
    mask = layout.attention_mask(torch.float32)
    ours, n = causal_lm_loss(model, ids, layout, chunk=40)
    stock = model(input_ids=ids, attention_mask=mask, position_ids=layout.position_ids, labels=hf_labels(layout)).loss
    assert n == ids.numel() - 2 * ids.shape[0]
    assert ours.item() == pytest.approx(stock.item(), abs=1e-5)
    grads = []
    for loss_fn in (lambda: causal_lm_loss(model, ids, layout, chunk=40)[0],
                    lambda: model(input_ids=ids, attention_mask=mask, position_ids=layout.position_ids,
                                  labels=hf_labels(layout)).loss):
        model.zero_grad()
        loss_fn().backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for key in grads[0]:
        assert torch.allclose(grads[0][key], grads[1][key], atol=1e-6), key


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(causal_world):
    model = AutoModelForCausalLM.from_pretrained(causal_world["llama"]).train()
    ids = torch.randint(3, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    layout = block_layout(ids, Frame.of(0, 1, None))
    runs = []
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.zero_grad()
        loss, _ = causal_lm_loss(model, ids, layout, chunk=16)
        loss.backward()
        runs.append((loss.item(), {k: p.grad.clone() for k, p in model.named_parameters()}))
    assert runs[0][0] == pytest.approx(runs[1][0], abs=1e-6)
    for key, grad in runs[0][1].items():
        assert torch.allclose(grad, runs[1][1][key], atol=1e-6), key


# --- data, warm-up, FLOPs ------------------------------------------------------------------------------------------


def test_loader_and_heldout_give_causal_lms_the_blocks_unmasked(causal_world):
    shardset = load_shardset(causal_world["prepare"])
    probs = D.mixing_probabilities(sorted(shardset.train), shardset.blocks, None)
    kwargs = dict(seed=0, epoch_start=0, world_size=1, rank=0, micro_batch_size=4, n_batches=3, shuffle_buffer=8,
                  num_workers=0, prefetch_factor=2, mask=None)
    batches = list(D.train_loader(shardset, probs, **kwargs))
    again = list(D.train_loader(shardset, probs, **kwargs))
    assert len(batches) == 3 and all(set(b) == {"input_ids", "langs"} for b in batches)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again))
    train = {tuple(row) for lang in shardset.train for row in D.first_blocks(shardset.train[lang])[lang].tolist()}
    assert all(tuple(row) in train for b in batches for row in b["input_ids"].tolist())
    held = D.heldout_batches(shardset.heldout["qaa_Latn"], 5, 2, None, 0, "qaa_Latn")
    assert [b["input_ids"].shape[0] for b in held] == [2, 2, 1] and all(set(b) == {"input_ids"} for b in held)


def test_untied_warmup_moves_only_the_new_rows_of_both_matrices(causal_world):
    model = AutoModelForCausalLM.from_pretrained(causal_world["llama"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    groups = param_groups(model, weight_decay=0.1)
    names = [g["name"] for g in groups]
    assert names[0] == EMBEDDING and len(groups[0]["params"]) == 2  # untied: input and output embeddings
    rows = trainable_rows_from_provenance(np.load(causal_world["llama"].parent / "provenance.npy"),
                                          model.config.vocab_size)
    warm = EmbeddingWarmup(model, rows)
    opt = torch.optim.AdamW(groups, lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (4, 24), generator=gen)
    layout = block_layout(ids, Frame.of(0, 1, None))
    for step in range(3):
        if step == 2:
            warm.remove()
        apply_settings(opt, names, group_settings(step, lr=1e-2, weight_decay=0.1, warmup_embedding_steps=2))
        opt.zero_grad()
        causal_lm_loss(model, ids, layout, chunk=32)[0].backward()
        opt.step()
        if step == 1:
            after = model.state_dict()
            for key in ("model.embed_tokens.weight", "lm_head.weight"):
                assert torch.equal(after[key][:COPIED], before[key][:COPIED]), key
                assert not torch.equal(after[key][COPIED:], before[key][COPIED:]), key
            frozen = [k for k in after if k not in ("model.embed_tokens.weight", "lm_head.weight")]
            assert frozen and all(torch.equal(after[k], before[k]) for k in frozen)
    assert not torch.equal(model.state_dict()["model.layers.0.mlp.up_proj.weight"],
                           before["model.layers.0.mlp.up_proj.weight"])


def test_body_params_of_a_decoder_leave_out_both_embedding_matrices(causal_world):
    for family, matrices in (("llama", 2), ("qwen2", 1)):
        model = AutoModelForCausalLM.from_pretrained(causal_world[family])
        cfg = model.config
        unique = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        assert body_params(model) == unique - matrices * cfg.vocab_size * cfg.hidden_size


# --- errors before launch ------------------------------------------------------------------------------------------


def _config(world, tmp_path, model, *extra):
    return load_config(None, [f"run.dir={tmp_path / 'run'}", f"pretrain.model={model}",
                              f"pretrain.shards={world['prepare']}", "tracking.enabled=false", *extra])


def test_factorised_training_of_a_causal_lm_is_refused(causal_world, tmp_path):
    config = _config(causal_world, tmp_path, causal_world["llama"], "pretrain.embeddings=factorised")
    with pytest.raises(HyperofaError, match="causal LM, whose embeddings train full-rank"):
        run_pretrain_stage(config, NullTracker())
    assert not (tmp_path / "run" / "pretrain").exists()


def test_a_model_that_is_neither_masked_nor_causal_is_refused(causal_world, tmp_path):
    import json
    import shutil

    other = tmp_path / "classifier"
    shutil.copytree(causal_world["llama"], other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "architectures": ["LlamaForSequenceClassification"],
                                                   "model_type": "not-a-model"}))
    with pytest.raises(HyperofaError, match="neither a masked LM nor a causal LM"):
        run_pretrain_stage(_config(causal_world, tmp_path, other), NullTracker())
    assert not (tmp_path / "run" / "pretrain").exists()


@pytest.mark.parametrize("name, zero, rows", [("llama3-8b-glot500", "zero3", 160_256),
                                              ("llama3.2-1b-glot500", "zero2", 160_256)])
def test_packaged_causal_configs_load_and_give_a_deepspeed_config(name, zero, rows):
    from hyperofa_dist.config import PACKAGED_CONFIGS
    from hyperofa_dist.pretrain.stage import build_ds_config

    config = load_config(PACKAGED_CONFIGS / f"{name}.yaml")
    assert config.pretrain.zero == zero and config.pretrain.causal_attention == "document"
    assert set(config.evaluate.tasks) <= {"srt", "srb", "bpb", "fertility"}
    assert (128_256 + config.tokenizer.new_tokens) % config.init.pad_to_multiple_of == 0
    assert 128_256 + config.tokenizer.new_tokens == rows
    from hyperofa_dist.pretrain.stage import batch_plan

    gpus = 8 if zero == "zero3" else 4  # the nodes of the table in docs/USAGE.md
    accum, global_batch = batch_plan(config, gpus)
    config = config.with_changes({"pretrain.grad_accum": accum})
    ds = build_ds_config(config, "bf16")
    assert ds["zero_optimization"]["stage"] == int(zero[-1]) and ds["gradient_clipping"] == 1.0
    assert ds["bf16"]["enabled"] is True
    assert ds["gradient_accumulation_steps"] == accum == 256 // (gpus * config.pretrain.micro_batch_size)
    assert config.pretrain.steps * global_batch * config.prepare.block_size == 2000 * 256 * 2048  # docs/USAGE.md's table
