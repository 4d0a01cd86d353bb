"""Fast tests of the pretraining core: schedule, groups, warm-up masks, loader split and seeding, FLOPs, and the
bad-input errors raised before any DeepSpeed process is launched."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer

from hyperofa_dist.config import load_config
from hyperofa_dist.errors import HyperofaError
from hyperofa_dist.formats.jobdir import write_checkpoint_hashes
from hyperofa_dist.formats.shards import load_shardset
from hyperofa_dist.pretrain import data as D
from hyperofa_dist.models.mlm import IGNORE, masked_lm_loss
from hyperofa_dist.pretrain.optim import (
    EMBEDDING,
    EmbeddingWarmup,
    apply_settings,
    group_settings,
    lr_at,
    param_groups,
    trainable_rows_from_provenance,
)
from hyperofa_dist.pretrain.perf import body_params, flops_per_token
from hyperofa_dist.pretrain.stage import run as run_pretrain_stage
from hyperofa_dist.tracking import NullTracker

COPIED = 300  # conftest.PretrainKit.COPIED: rows [0, COPIED) play the copied tokens


@pytest.fixture(scope="module")
def quick_world(tmp_path_factory, small_corpus, pretrain_kit):
    assert pretrain_kit.COPIED == COPIED
    root = tmp_path_factory.mktemp("pretrain_quick")
    tok, model = pretrain_kit.tokenizer_and_model(root, small_corpus)
    shards = pretrain_kit.quick_prepare(root / "prepare", small_corpus, tok)
    return {"root": root, "tok": tok, "model": model, "prepare": shards}


def test_lr_schedule_warmup_then_linear_cosine_constant():
    kw = dict(peak=1.0, warmup=4, total=14)
    assert [lr_at(s, schedule="linear", **kw) for s in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert lr_at(9, schedule="linear", **kw) == pytest.approx(0.5)
    assert lr_at(14, schedule="linear", **kw) == 0.0
    assert lr_at(9, schedule="cosine", **kw) == pytest.approx(0.5)
    assert lr_at(6, schedule="cosine", **kw) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))
    assert lr_at(13, schedule="constant", **kw) == 1.0
    assert lr_at(0, peak=2.0, warmup=0, total=10, schedule="linear") == 2.0


def test_embedding_warmup_moves_only_new_rows_then_everything(quick_world):
    model = AutoModelForMaskedLM.from_pretrained(quick_world["model"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    groups = param_groups(model, weight_decay=0.1)
    names = [g["name"] for g in groups]
    assert names[0] == EMBEDDING and len(groups[0]["params"]) == 1  # tied decoder is the same matrix
    rows = trainable_rows_from_provenance(np.load(quick_world["model"].parent / "provenance.npy"), model.config.vocab_size)
    assert rows[:COPIED].sum() == 0 and rows[COPIED:].all()
    warm = EmbeddingWarmup(model, rows)
    opt = torch.optim.AdamW(groups, lr=1e-2)
    ids = torch.randint(5, model.config.vocab_size, (4, 16))
    labels = torch.where(torch.rand(4, 16) < 0.5, ids, torch.full_like(ids, IGNORE))
    for step in range(3):
        if step == 2:
            warm.remove()
        apply_settings(opt, names, group_settings(step, lr=1e-2, weight_decay=0.1, warmup_embedding_steps=2))
        opt.zero_grad()
        masked_lm_loss(model, ids, labels)[0].backward()
        opt.step()
        if step == 1:
            after = model.state_dict()
            emb = "roberta.embeddings.word_embeddings.weight"
            assert torch.equal(after[emb][:COPIED], before[emb][:COPIED])
            assert (after[emb][COPIED:] != before[emb][COPIED:]).any(dim=1).float().mean() > 0.5
            moved = [k for k in after if k not in (emb, "lm_head.decoder.weight") and not torch.equal(after[k], before[k])]
            assert moved == []
    after = model.state_dict()
    assert not torch.equal(after["roberta.encoder.layer.0.attention.self.query.weight"],
                           before["roberta.encoder.layer.0.attention.self.query.weight"])


def test_mixing_probabilities():
    langs = ["a_Latn", "b_Latn", "c_Latn"]
    assert D.mixing_probabilities(langs, {"a_Latn": 1, "b_Latn": 3, "c_Latn": 4}, None).tolist() == [0.125, 0.375, 0.5]
    assert D.mixing_probabilities(langs, {}, None).tolist() == pytest.approx([1 / 3] * 3)
    assert D.mixing_probabilities(langs, {}, {"a_Latn": 1.0, "c_Latn": 3.0}).tolist() == [0.25, 0.0, 0.75]
    with pytest.raises(HyperofaError, match="without training shards: x_Latn"):
        D.mixing_probabilities(langs, {}, {"x_Latn": 1.0})
    with pytest.raises(HyperofaError, match="positive sum"):
        D.mixing_probabilities(langs, {}, {"a_Latn": 0.0})


def test_slot_shards_split_by_shard_or_by_block():
    shards = [f"s{i}" for i in range(5)]
    assert D.slot_shards(shards, 1, 2) == (["s1", "s3"], None)
    assert D.slot_shards(shards, 3, 8) == (shards, (3, 8))


def _collect(shardset, rank, world, workers, epoch_start=0, n_batches=6, weights=None):
    tok = AutoTokenizer.from_pretrained(str(shardset[1]))
    probs = D.mixing_probabilities(sorted(shardset[0].train), shardset[0].blocks, weights)
    loader = D.train_loader(
        shardset[0], probs, seed=5, epoch_start=epoch_start, rank=rank, world_size=world, micro_batch_size=4,
        n_batches=n_batches, shuffle_buffer=8, mask=D.mask_spec(tok, 0.15), num_workers=workers, prefetch_factor=2,
        audit=True,
    )
    return list(loader)


def test_loader_ranks_disjoint_equal_counts_and_seeded(quick_world):
    shardset = load_shardset(quick_world["prepare"])
    pair = (shardset, quick_world["tok"])
    for workers in (0, 2):
        ranks = [_collect(pair, r, 2, workers) for r in range(2)]
        assert [len(b) for b in ranks] == [6, 6]
        ids = [[i for b in batches for i in b["block_ids"]] for batches in ranks]
        assert set(ids[0]).isdisjoint(ids[1])
        assert all(b["input_ids"].shape == (4, 32) for batches in ranks for b in batches)
    again = _collect(pair, 0, 2, 2)
    first = _collect(pair, 0, 2, 2)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
               for a, b in zip(first, again))
    later = _collect(pair, 0, 2, 2, epoch_start=10)
    assert [b["block_ids"] for b in later] != [b["block_ids"] for b in first]
    only = sorted(shardset.train)[1]
    mixed = _collect(pair, 0, 1, 0, weights={only: 1.0})
    assert {lang for b in mixed for lang in b["langs"]} == {only}


def test_heldout_batches_are_fixed(quick_world):
    shardset = load_shardset(quick_world["prepare"])
    tok = AutoTokenizer.from_pretrained(str(quick_world["tok"]))
    lang = sorted(shardset.heldout)[0]
    a = D.heldout_batches(shardset.heldout[lang], 10, 4, D.mask_spec(tok, 0.15), 0, lang)
    b = D.heldout_batches(shardset.heldout[lang], 10, 4, D.mask_spec(tok, 0.15), 0, lang)
    assert [x["input_ids"].shape[0] for x in a] == [4, 4, 2]
    assert all(torch.equal(x["labels"], y["labels"]) for x, y in zip(a, b))
    special = torch.tensor(tok.all_special_ids)
    assert not torch.isin(a[0]["input_ids"][a[0]["labels"] != IGNORE], special).all()


def test_heldout_batches_give_padding_no_attention_and_no_label(quick_world, tmp_path, prepare_format):
    from data_prep.prepare.packing import Specials, flatten_ids, pack_sentences

    tok = AutoTokenizer.from_pretrained(str(quick_world["tok"]))
    flat, offsets = flatten_ids([[7, 8, 9], [10, 11]])
    short = pack_sentences(flat, offsets, np.arange(2), 32, Specials(tok.cls_token_id, tok.sep_token_id,
                                                                     tok.pad_token_id), pad_short=True).blocks
    assert short.shape == (1, 32) and short[0, -1] == tok.pad_token_id
    out = prepare_format.write(tmp_path / "prepare", {"qaa_Latn": {"heldout": short}}, quick_world["tok"], 32)
    (batch,) = D.heldout_batches(load_shardset(out).heldout["qaa_Latn"], 10, 4, D.mask_spec(tok, 0.5), 0, "qaa_Latn")
    padding = torch.from_numpy(short.astype(np.int64)) == tok.pad_token_id
    assert int(padding.sum()) == 32 - 9
    assert torch.equal(batch["attention_mask"], (~padding).long())
    assert (batch["labels"][padding] == IGNORE).all() and (batch["labels"][~padding] != IGNORE).any()


def test_flops_per_token_matches_the_design_table(quick_world):
    # docs/DISTRIBUTED.md §4: XLM-R-base body 86.44M, V=401,145, seq 512: 2.42 GFLOP full logits, 0.85 masked-only.
    assert flops_per_token(86.44e6, 12, 768, 512, 401_145, 1.0) / 1e9 == pytest.approx(2.42, abs=0.01)
    assert flops_per_token(86.44e6, 12, 768, 512, 401_145, 0.15) / 1e9 == pytest.approx(0.85, abs=0.01)
    model = AutoModelForMaskedLM.from_pretrained(quick_world["model"])
    cfg = model.config
    embeddings = (cfg.vocab_size + cfg.max_position_embeddings + cfg.type_vocab_size) * cfg.hidden_size
    assert body_params(model) == sum(p.numel() for p in model.parameters()) - embeddings


# --- errors before launch ------------------------------------------------------------------------------------


def _config(world, tmp_path, *extra):
    return load_config(None, [f"run.dir={tmp_path / 'run'}", f"pretrain.model={world['model']}",
                              f"pretrain.shards={world['prepare']}", "tracking.enabled=false", *extra])


def test_shards_of_another_tokenizer_are_rejected(quick_world, tmp_path, small_corpus, pretrain_kit):
    _, other_model = pretrain_kit.tokenizer_and_model(tmp_path / "other", small_corpus, vocab=450, seed=1)
    config = _config({**quick_world, "model": other_model}, tmp_path)
    with pytest.raises(HyperofaError, match="shards were made with another tokenizer than the model's"):
        run_pretrain_stage(config, NullTracker())
    assert not (tmp_path / "run" / "pretrain").exists()


def test_deepspeed_config_with_removed_or_invalid_keys_is_rejected(quick_world, tmp_path):
    template = json.loads((Path(__file__).resolve().parents[1] / "ds_configs" / "zero2.json").read_text())
    removed = tmp_path / "old.json"
    removed.write_text(json.dumps({**template, "sparse_gradients": True}))
    with pytest.raises(HyperofaError, match="sparse_gradients"):
        run_pretrain_stage(_config(quick_world, tmp_path, f"pretrain.ds_config={removed}"), NullTracker())
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**template, "zero_optimization": {"stage": 2, "overlap_com": True}}))
    with pytest.raises(HyperofaError, match="bad.json: DeepSpeed .* rejects this config"):
        run_pretrain_stage(_config(quick_world, tmp_path, f"pretrain.ds_config={bad}"), NullTracker())
    assert not (tmp_path / "run" / "pretrain").exists()


def test_resume_errors_before_launch(quick_world, tmp_path):
    with pytest.raises(HyperofaError, match="no checkpoint to resume from"):
        run_pretrain_stage(_config(quick_world, tmp_path, "pretrain.resume=true"), NullTracker())
    ckpt = tmp_path / "run" / "pretrain" / "hyperofa" / "checkpoints"
    (ckpt / "step00000004").mkdir(parents=True)
    (ckpt / "latest").write_text("step00000004")
    (ckpt / "step00000004" / "hyperofa.json").write_text(json.dumps({"world_size": 4, "step": 4}))
    write_checkpoint_hashes(ckpt, "step00000004")
    with pytest.raises(HyperofaError, match="step00000004: records no fingerprint of the settings"):
        run_pretrain_stage(_config(quick_world, tmp_path, "pretrain.resume=true"), NullTracker())
    with pytest.raises(HyperofaError, match="written by 4 ranks, this launch has 2; set pretrain.universal=true"):
        run_pretrain_stage(_config(quick_world, tmp_path, "pretrain.resume=true", "pretrain.allow_config_change=true"),
                           NullTracker())
    with pytest.raises(HyperofaError, match="checkpoints of an earlier run exist"):
        run_pretrain_stage(_config(quick_world, tmp_path), NullTracker())
    with pytest.raises(HyperofaError, match="language_weights names languages without training shards"):
        run_pretrain_stage(_config(quick_world, tmp_path, "pretrain.language_weights={zzz_Latn: 1.0}"), NullTracker())


def test_rebuilding_a_finished_run_removes_its_checkpoints_before_launch(quick_world, tmp_path, monkeypatch):
    """The fresh-run policy both stages share (runtime/checkpoint.py; hypernet: tests/test_checkpoint.py): an
    unfinished run's checkpoints are refused above, a finished run's (its manifest exists) go with its stale
    outputs. The launcher is replaced by one that records what the job directory held and reports a failure."""
    import subprocess

    from hyperofa_dist.pretrain import stage

    out = tmp_path / "run" / "pretrain" / "hyperofa"
    ckpt = out / "checkpoints"
    (ckpt / "step00000004").mkdir(parents=True)
    (ckpt / "step00000004" / "hyperofa.json").write_text(json.dumps({"world_size": 2, "step": 4}))
    write_checkpoint_hashes(ckpt, "step00000004")
    (ckpt / "latest").write_text("step00000004")
    (out / "manifest.json").write_text(json.dumps({"inputs_digest": "of the finished run, with other inputs"}))
    seen = {}

    def no_launch(cmd):
        seen["checkpoints"] = sorted(p.name for p in ckpt.glob("*"))
        seen["job"] = json.loads((out / "job.json").read_text())
        return subprocess.CompletedProcess(cmd, 1)

    monkeypatch.setattr(stage, "run_launcher", no_launch)
    with pytest.raises(HyperofaError, match=r"^the pretrain training job exited with status 1$"):
        run_pretrain_stage(_config(quick_world, tmp_path), NullTracker())
    assert seen["checkpoints"] == [] and (seen["job"]["resume"], seen["job"]["resume_tag"]) == (False, None)


def test_flop_model_equals_a_count_of_every_matmul_in_a_tiny_step():
    """perf.py's 6 N + 12 L d T + 6 d V f against torch's FLOP counter over one forward and backward of a tiny
    XLM-R with logits everywhere (f = 1): equal once N keeps only the matmul weights (biases and LayerNorms are
    in perf's N, a 6-FLOP-per-parameter overcount that is 0.1% at XLM-R-base)."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import XLMRobertaConfig, XLMRobertaForMaskedLM

    vocab, d, layers, ff, seq, batch = 1000, 32, 2, 128, 16, 3
    cfg = XLMRobertaConfig(vocab_size=vocab, hidden_size=d, num_hidden_layers=layers, num_attention_heads=2,
                           intermediate_size=ff, max_position_embeddings=seq + 2, attn_implementation="eager")
    torch.manual_seed(0)
    model = XLMRobertaForMaskedLM(cfg)
    ids = torch.randint(5, vocab, (batch, seq))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    measured = counter.get_total_flops() / (batch * seq)
    # By hand: per layer q, k, v, o (d x d each), the feed-forward pair (d x ff twice); the LM head's dense d x d.
    n_matmul = layers * (4 * d * d + 2 * d * ff) + d * d
    assert measured == flops_per_token(n_matmul, layers, d, seq, vocab, 1.0)
    # perf's own N adds the non-matmul parameters: 2d per LayerNorm, every bias, the output bias of V rows.
    n_other = 2 * d + layers * (4 * d + 2 * d + ff + d + 2 * d) + d + 2 * d + vocab
    assert body_params(model) == n_matmul + n_other


# --- the optimizer step's size --------------------------------------------------------------------------------


def test_global_batch_size_derives_the_accumulation_from_the_ranks():
    from hyperofa_dist.pretrain.stage import batch_plan

    config = load_config(None, ["pretrain.micro_batch_size=32", "pretrain.global_batch_size=512"])
    assert [batch_plan(config, world) for world in (1, 4, 16)] == [(16, 512), (4, 512), (1, 512)]
    with pytest.raises(HyperofaError, match=r"^pretrain.global_batch_size=512 is not a multiple of 3 ranks x "
                                            r"pretrain.micro_batch_size=32 = 96; change one of them$"):
        batch_plan(config, 3)
    # grad_accum alone keeps its meaning (per-rank accumulation), and its default stays 4
    assert batch_plan(load_config(None, ["pretrain.micro_batch_size=8", "pretrain.grad_accum=2"]), 3) == (2, 48)
    assert batch_plan(load_config(None, ["pretrain.micro_batch_size=8"]), 2) == (4, 64)
    # both set: they must describe the same step on this launch
    both = config.with_changes({"pretrain.grad_accum": 4})
    assert batch_plan(both, 4) == (4, 512)
    with pytest.raises(HyperofaError, match=r"pretrain.grad_accum=4 gives 1024 sequences per step on 8 ranks, "
                                            r"pretrain.global_batch_size says 512; unset pretrain.grad_accum"):
        batch_plan(both, 8)
