"""The pure cores of `hyperofa prepare`: sampling plan, packing, deterministic shards (no Ray, milliseconds)."""

from __future__ import annotations

import io
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
from hyperofa_dist.formats.files import sync_files
from hyperofa_dist.formats.shards import build_shards, read_shard, shard_name, tar_bytes, write_shard
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


def test_pad_short_gives_text_shorter_than_a_block_one_padded_block_and_changes_nothing_else():
    padding = Specials(cls=0, sep=2, pad=1)
    flat, offsets = flatten_ids([[5, 6, 7], [8]])
    packed = pack_sentences(flat, offsets, np.array([0, 1]), 16, padding, pad_short=True)
    assert packed.blocks.tolist() == [[0, 5, 6, 7, 2, 8, 2, 2] + [1] * 8]
    assert (packed.tokens, packed.tokens_in_blocks, packed.tokens_lost, packed.padded_blocks) == (4, 4, 0, 1)
    assert [p.tolist() for p in unpack_blocks(packed.blocks, sep=2, pad=1)] == [[5, 6, 7], [8], []]
    # Text that fills a block is cut exactly as without pad_short: the tail is still dropped, never padded.
    rng = np.random.default_rng(1)
    flat, offsets = flatten_ids(_random_sentences(rng, 30))
    order = np.arange(30)
    plain = pack_sentences(flat, offsets, order, 32, SPECIALS)
    padded = pack_sentences(flat, offsets, order, 32, padding, pad_short=True)
    assert np.array_equal(plain.blocks, padded.blocks) and padded.padded_blocks == 0
    assert padded.tokens_lost == plain.tokens_lost > 0
    # No pad token of its own (none, or the same id as sep): nothing to pad with, the short text is lost as before.
    for specials in (SPECIALS, Specials(cls=0, sep=2, pad=2)):
        flat, offsets = flatten_ids([[5, 6, 7], [8]])
        assert pack_sentences(flat, offsets, np.array([0, 1]), 16, specials, pad_short=True).blocks.shape == (0, 16)


def test_a_language_with_three_short_heldout_sentences_gets_a_heldout_block(tmp_path, world, source_tokenizers):
    from data_prep.prepare.chunk import ChunkJob, Settings, process_chunk
    from hyperofa_dist import synthetic
    from hyperofa_dist.config import CorpusConfig
    from hyperofa_dist.formats.corpus import discover, plan_units
    from hyperofa_dist.formats.tokenizer import backend_json, load_tokenizer, worker_backend

    corpus = tmp_path / "corpus"
    synthetic.write_corpus(corpus, world, {"qaa_Latn": 60}, seed=0)
    (unit,) = plan_units(discover(CorpusConfig(path=str(corpus))), 1 << 20)
    tok = load_tokenizer(source_tokenizers["xlmr"])
    backend = worker_backend(backend_json(tok))

    def run(out, specials):
        settings = Settings(str(out), specials, seed=0, normalization="NFC", heldout_fraction=0.05, block_size=64,
                            blocks_per_sample=4, samples_per_shard=4, batch_size=16)
        return process_chunk(ChunkJob(unit, None, "digest", keep_existing=False), settings, backend)

    record = run(tmp_path / "padded", Specials(tok.cls_token_id, tok.sep_token_id, tok.pad_token_id))
    stats = record["stats"]
    assert stats["heldout_sentences"] == 3 and 0 < stats["heldout_tokens"] + 3 < 62  # shorter than one block
    assert (stats["heldout_blocks"], stats["heldout_padded_blocks"], stats["heldout_tokens_lost"]) == (1, 1, 0)
    (heldout,) = [s for s in record["shards"] if s["split"] == "heldout"]
    (sample,) = list(read_shard(tmp_path / "padded" / heldout["path"]))
    block = sample.blocks[0]
    assert block[0] == tok.cls_token_id and block[-1] == tok.pad_token_id
    assert int(np.count_nonzero(block == tok.pad_token_id)) == 64 - 2 - stats["heldout_tokens"] - 3
    pieces = unpack_blocks(sample.blocks, tok.sep_token_id, tok.pad_token_id)
    assert len(pieces) == 4 and pieces[-1].size == 0
    assert sum(p.size for p in pieces) == stats["heldout_tokens"]

    # Without a pad token the held-out text is lost as before, and the training shards are byte for byte the same.
    before = run(tmp_path / "plain", Specials(tok.cls_token_id, tok.sep_token_id))
    assert before["stats"]["heldout_blocks"] == 0 and before["stats"]["heldout_tokens_lost"] == stats["heldout_tokens"]
    train = [s for s in record["shards"] if s["split"] == "train"]
    assert train and train == [s for s in before["shards"] if s["split"] == "train"]


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


def _tarfile_archive(members):
    """The archive Python's tarfile writes for the members with the shard headers' fixed fields."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = (
                len(data), 0, 0o444, 0, 0, "", "")
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_the_shard_writer_gives_tarfiles_bytes_for_every_name_and_size():
    rng = np.random.default_rng(0)
    names = ["a", "aaa_Latn-00003-00000001.input_ids.npy", "x" * 99, "y" * 100, "dir/name.txt",
             "dir/" + "z" * 99, "qaa_Grek/é.lang.txt"]  # the last two go through tarfile itself (prefix split, not ASCII)
    sizes = [0, 1, 511, 512, 513, 10_240, 12_345]
    for trial in range(40):
        members = [(str(rng.choice(names)), rng.integers(0, 256, int(rng.choice(sizes)), dtype=np.uint8).tobytes())
                   for _ in range(int(rng.integers(0, 12)))]
        assert tar_bytes(members) == _tarfile_archive(members), members
    assert len(tar_bytes([])) == tarfile.RECORDSIZE  # an empty archive is one record of zeros, as tarfile's
    assert tar_bytes([]) == _tarfile_archive([])


def test_shards_written_without_fsync_are_made_durable_together(tmp_path):
    paths = [tmp_path / "train" / f"s{i}.tar" for i in range(5)]
    for path in paths:
        assert write_shard(path, b"x" * 1000, keep_existing=False, durable=False)
    assert sync_files(paths) == 5
    assert all(p.read_bytes() == b"x" * 1000 for p in paths)
    paths[2].unlink()  # a shard a task reported but that is not there: the stage must not name it in a manifest
    with pytest.raises(FileNotFoundError):
        sync_files(paths)


def test_group_units_groups_small_units_and_puts_large_groups_first():
    units = [Unit("aaa_Latn", i, "a", "bytes", 0, 1, 100) for i in range(3)]
    units += [Unit("bbb_Latn", 0, "b", "bytes", 0, 1, 30), Unit("ccc_Latn", 0, "c", "bytes", 0, 1, 30)]
    units += [Unit("ddd_Latn", 0, "", "hub", 0, -1, 0)]
    groups = group_units(units, 100)
    assert sorted((u.lang, u.chunk) for g in groups for u in g) == sorted((u.lang, u.chunk) for u in units)
    assert [sum(u.bytes for u in g) for g in groups] == [100, 100, 100, 60, 0]
    assert [u.lang for u in groups[3]] == ["bbb_Latn", "ccc_Latn"]


class _CountingModel:
    """A tokenizer model that counts how often its word cache is emptied."""

    def __init__(self) -> None:
        self.cleared = 0

    def _clear_cache(self) -> None:
        self.cleared += 1


class _ClearCountingBackend:
    def __init__(self, backend) -> None:
        self.backend, self.model = backend, _CountingModel()

    def encode_batch_fast(self, *args, **kwargs):
        return self.backend.encode_batch_fast(*args, **kwargs)


def test_each_unit_is_tokenized_with_an_emptied_word_cache_and_the_same_ids(source_tokenizers, small_corpus):
    from data_prep.prepare.chunk import encode
    from hyperofa_dist import synthetic
    from hyperofa_dist.formats.tokenizer import TOKENIZER_JSON, backend_from_json, fresh_word_cache

    units = [synthetic.read_lines(small_corpus / f"{lang}.txt")[:200] for lang in ("qad_Grek", "qaa_Latn", "qad_Grek")]
    for family, folder in source_tokenizers.items():  # Unigram (xlmr), byte-level BPE (roberta), WordPiece (bert)
        backend = backend_from_json((folder / TOKENIZER_JSON).read_text(encoding="utf-8"))
        expected = [[e.ids for e in backend.encode_batch_fast(u, add_special_tokens=False)] for u in units]
        counting = _ClearCountingBackend(backend)
        for n, unit in enumerate(units, start=1):
            flat, offsets = encode(counting, unit, batch_size=64)
            assert counting.model.cleared == n, family  # once per unit, before its first batch
            assert [flat[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])] == expected[n - 1], family
        fresh_word_cache(backend)  # a model without a cache (WordPiece) is left as it is
        assert [e.ids for e in backend.encode_batch_fast(units[0], add_special_tokens=False)] == expected[0], family
