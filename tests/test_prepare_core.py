"""The pure cores of `hyperofa prepare`: sampling plan, packing, deterministic shards (no Ray, milliseconds)."""

from __future__ import annotations

import tarfile

import numpy as np
import pytest

from data_prep.prepare.packing import Specials, flatten_ids, pack_sentences, unpack_blocks
from data_prep.prepare.stage import group_units
from data_prep.prepare.sampling import (
    ChunkPlan,
    heldout_count,
    kept_order,
    needs_corpus_counts,
    plan_chunks,
    select_sentences,
    split_proportionally,
    temperature_budgets,
    unbudgeted_plan,
)
from hyperofa_dist.formats.shards import build_shards, read_shard, shard_name, write_shard
from hyperofa_dist.formats.corpus import Unit

SPECIALS = Specials(cls=0, sep=2)


def test_split_proportionally_is_exact_and_proportional():
    assert split_proportionally(10, [1, 1, 1]) == [4, 3, 3]  # the tie goes to the lowest index
    assert split_proportionally(7, [0, 5, 2]) == [0, 5, 2]
    shares = split_proportionally(1000, [3, 5, 11, 0, 81])
    assert sum(shares) == 1000 and shares[3] == 0
    assert all(abs(s - 1000 * w / 100) < 1 for s, w in zip(shares, [3, 5, 11, 0, 81]))
    assert split_proportionally(0, [0, 0]) == [0, 0]
    with pytest.raises(ValueError):
        split_proportionally(3, [0, 0])


def test_heldout_count_rounds_and_keeps_a_training_sentence():
    assert heldout_count(1000, 0.01) == 10
    assert heldout_count(149, 0.01) == 1
    assert heldout_count(10, 0.99) == 9
    assert heldout_count(1, 0.5) == 0
    assert heldout_count(500, 0.0) == 0


def test_temperature_budgets_follow_n_to_the_alpha():
    counts = {"aaa_Latn": 100_000, "bbb_Latn": 1_000, "ccc_Cyrl": 10}
    budgets = temperature_budgets(counts, alpha=0.3, total=30_000, cap=None, upsample=True)
    assert sum(budgets.values()) == 30_000
    weights = {k: v**0.3 for k, v in counts.items()}
    for lang, budget in budgets.items():
        assert abs(budget - 30_000 * weights[lang] / sum(weights.values())) <= 1
    # alpha < 1 flattens: the small language is upsampled far beyond its size, the large one subsampled
    assert budgets["ccc_Cyrl"] > 10 * counts["ccc_Cyrl"] and budgets["aaa_Latn"] < counts["aaa_Latn"]
    no_up = temperature_budgets(counts, alpha=0.3, total=30_000, cap=None, upsample=False)
    assert no_up["ccc_Cyrl"] == 10 and no_up["bbb_Latn"] == 1_000 and no_up["aaa_Latn"] == budgets["aaa_Latn"]
    capped = temperature_budgets(counts, alpha=0.3, total=None, cap=500, upsample=True)
    assert capped == {"aaa_Latn": 500, "bbb_Latn": 500, "ccc_Cyrl": 10}


def test_plan_chunks_spreads_language_budgets_over_chunks():
    plans = plan_chunks(
        {"aaa_Latn": [600, 300, 100], "bbb_Cyrl": [40]}, 0.1, alpha=0.5, total=700, cap=None, upsample=True
    )
    a, b = plans["aaa_Latn"], plans["bbb_Cyrl"]
    assert [p.n for p in a] == [600, 300, 100] and sum(p.heldout for p in a) == 100
    assert sum(p.heldout for p in b) == 4
    assert sum(p.train for p in a) + sum(p.train for p in b) == 700
    # budget proportional to the training sentences of each chunk
    assert [p.train for p in a] == split_proportionally(sum(p.train for p in a), [p.n - p.heldout for p in a])


def test_unbudgeted_plan_is_what_plan_chunks_gives_without_budget_or_cap():
    counts = {"aaa_Latn": [1000, 999, 7], "bbb_Cyrl": [1]}
    plans = plan_chunks(counts, 0.05, alpha=0.3, total=None, cap=None, upsample=True)
    assert plans == {lang: [unbudgeted_plan(n, 0.05) for n in ns] for lang, ns in counts.items()}
    assert not needs_corpus_counts(None, None) and needs_corpus_counts(10, None) and needs_corpus_counts(None, 3)


def test_select_sentences_is_seeded_by_lang_and_chunk_only():
    plan = ChunkPlan(n=50, heldout=5, train=120)
    heldout, mult = select_sentences(plan, 7, "aaa_Latn", 3)
    again = select_sentences(plan, 7, "aaa_Latn", 3)
    assert np.array_equal(heldout, again[0]) and np.array_equal(mult, again[1])
    assert heldout.size == 5 and np.all(mult[heldout] == 0)
    assert mult.sum() == 120 and set(np.unique(mult[mult > 0])) == {2, 3}
    assert np.count_nonzero(mult == 3) == 120 - 2 * 45
    other_seed = select_sentences(plan, 8, "aaa_Latn", 3)
    other_chunk = select_sentences(plan, 7, "aaa_Latn", 4)
    other_lang = select_sentences(plan, 7, "bbb_Latn", 3)
    for h, m in (other_seed, other_chunk, other_lang):
        assert not (np.array_equal(h, heldout) and np.array_equal(m, mult))
    sub_heldout, sub = select_sentences(ChunkPlan(n=50, heldout=0, train=20), 7, "aaa_Latn", 3)
    assert sub_heldout.size == 0 and sub.sum() == 20 and sub.max() == 1


def test_kept_order_is_pass_major_in_file_order():
    assert kept_order(np.array([2, 0, 1, 3])).tolist() == [0, 2, 3, 0, 3, 3]
    assert kept_order(np.zeros(4, dtype=np.int64)).tolist() == []


def _random_sentences(rng, n, vocab=(5, 900)):
    return [rng.integers(*vocab, size=int(rng.integers(1, 40))).tolist() for _ in range(n)]


def test_pack_round_trip_and_token_accounting():
    rng = np.random.default_rng(0)
    sentences = _random_sentences(rng, 200)
    flat, offsets = flatten_ids(sentences)
    order = kept_order(rng.integers(0, 3, size=200))
    packed = pack_sentences(flat, offsets, order, 32, SPECIALS)
    assert packed.blocks.dtype == np.uint32 and packed.blocks.shape[1] == 32
    assert np.all(packed.blocks[:, 0] == 0) and np.all(packed.blocks[:, -1] == 2)
    assert packed.sentences == order.size
    assert packed.tokens == sum(len(sentences[i]) for i in order)
    assert packed.tokens_in_blocks + packed.tokens_lost == packed.tokens
    # content tokens in blocks = all non-frame, non-separator positions
    assert packed.tokens_in_blocks == int(np.count_nonzero(packed.blocks[:, 1:-1] != 2))
    stream_len = packed.tokens + packed.sentences
    assert packed.blocks.shape[0] == stream_len // 30
    pieces = unpack_blocks(packed.blocks, sep=2)
    full = pieces[:-1]
    assert [p.tolist() for p in full] == [sentences[i] for i in order[: len(full)]]
    tail = pieces[-1].tolist()
    assert tail == sentences[order[len(full)]][: len(tail)]


def test_pack_with_too_little_text_loses_everything_and_says_so():
    flat, offsets = flatten_ids([[5, 6, 7], [8]])
    packed = pack_sentences(flat, offsets, np.array([0, 1]), 16, SPECIALS)
    assert packed.blocks.shape == (0, 16)
    assert packed.tokens == 4 and packed.tokens_lost == 4 and packed.tokens_in_blocks == 0


def test_shards_are_deterministic_tars_with_fixed_headers(tmp_path):
    blocks = np.arange(11 * 8, dtype=np.uint32).reshape(11, 8)
    first = list(build_shards(blocks, "aaa_Latn", 3, blocks_per_sample=2, samples_per_shard=2))
    second = list(build_shards(blocks.copy(), "aaa_Latn", 3, blocks_per_sample=2, samples_per_shard=2))
    assert [s.data for s in first] == [s.data for s in second]
    assert [s.name for s in first] == [shard_name("aaa_Latn", 3, i) for i in range(3)]
    assert [s.blocks for s in first] == [4, 4, 3]
    paths = []
    for shard in first:
        path = tmp_path / shard.name
        assert write_shard(path, shard.data, keep_existing=False)
        paths.append(path)
    with tarfile.open(paths[0]) as tar:
        for member in tar.getmembers():
            assert (member.mtime, member.uid, member.gid, member.uname, member.gname) == (0, 0, 0, "", "")
    samples = [s for p in paths for s in [(s.key, s.lang, s.blocks) for s in read_shard(p)]]
    assert [k for k, _, _ in samples] == [f"aaa_Latn-00003-{i:08d}" for i in range(6)]
    assert all(lang == "aaa_Latn" for _, lang, _ in samples)
    assert np.array_equal(np.concatenate([a for _, _, a in samples]), blocks)
    assert samples[-1][2].shape == (1, 8) and samples[-1][2].dtype == np.uint32
    assert not write_shard(paths[0], first[0].data, keep_existing=True)  # present, right size: untouched
    assert list(build_shards(blocks[:0], "aaa_Latn", 3, 2, 2)) == []


def test_group_units_groups_small_units_and_puts_large_groups_first():
    units = [Unit("aaa_Latn", i, "a", "bytes", 0, 1, 100) for i in range(3)]
    units += [Unit("bbb_Latn", 0, "b", "bytes", 0, 1, 30), Unit("ccc_Latn", 0, "c", "bytes", 0, 1, 30)]
    units += [Unit("ddd_Latn", 0, "", "hub", 0, -1, 0)]
    groups = group_units(units, 100)
    assert sorted((u.lang, u.chunk) for g in groups for u in g) == sorted((u.lang, u.chunk) for u in units)
    assert [sum(u.bytes for u in g) for g in groups] == [100, 100, 100, 60, 0]
    assert [u.lang for u in groups[3]] == ["bbb_Latn", "ccc_Latn"]
