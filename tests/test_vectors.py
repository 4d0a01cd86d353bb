"""Word vectors: key parsing as the method specifies, loading every format, clear errors, cross-lingual training."""

from __future__ import annotations

import contextlib
import logging
import re
from collections import Counter

import numpy as np
import pytest
from gensim.models import KeyedVectors

from hyperofa_dist import cli, synthetic
from hyperofa_dist.errors import HyperofaError
from hyperofa_dist.formats.mapping import write_word_vectors
from hyperofa_dist.formats.vectors import keys_path, load_word_vectors, parse_key, save_word_vectors, trained_vectors_path

COLEX_KEYS = ["otq:$ndöhi$", "deu:haus", "water", "fra:$la maison", "eng:ab$", "$x"]
BAD_KEYS = ["ab:cd", "DEU:haus", "deu:a:b", "eng:$", "x\ny", "deu: ", "1234:five"]


def make_kv(keys, dim=4, seed=0) -> KeyedVectors:
    kv = KeyedVectors(dim)
    kv.add_vectors(keys, np.random.default_rng(seed).normal(size=(len(keys), dim)).astype(np.float32))
    return kv


def test_parse_key_follows_the_method():
    assert parse_key("otq:$ndöhi$") == ("otq", " ndöhi ", True)
    assert parse_key("deu:haus") == ("deu", "haus", False)
    assert parse_key("water") == ("eng", "water", False)  # concept nodes: no prefix means English
    assert parse_key("fra:$la maison") == ("fra", " la maison", True)
    assert parse_key("$x") == ("eng", " x", True)
    for key in BAD_KEYS:
        assert parse_key(key) is None, key


def test_gensim_kv_with_colexnet_keys_skips_unexpected_ones_with_examples(tmp_path, caplog):
    keys = COLEX_KEYS[:3] + BAD_KEYS + COLEX_KEYS[3:]
    kv = make_kv(keys)
    path = tmp_path / "colex.wv"
    kv.save(str(path))
    with caplog.at_level(logging.WARNING, logger="hyperofa.vectors"):
        words = load_word_vectors(path)
    assert words.keys == COLEX_KEYS
    assert words.skipped == len(BAD_KEYS) and words.n_keys == len(keys)
    assert "skipped 7 of 13 keys" in caplog.text and "'ab:cd'" in caplog.text
    np.testing.assert_array_equal(words.matrix(), kv.vectors[[keys.index(k) for k in COLEX_KEYS]])
    assert words.languages == ["deu", "eng", "fra", "otq"]
    assert [words.languages[i] for i in words.lang_ids] == ["otq", "deu", "eng", "fra", "eng", "eng"]
    only = load_word_vectors(path, languages=["deu", "fra"])
    assert only.keys == ["deu:haus", "fra:$la maison"]
    out = tmp_path / "m.npy"
    blocks = (words.matrix(start, start + 2) for start in range(0, len(words), 2))
    write_word_vectors(out, len(words), words.dim, blocks, words.keys, path)
    np.testing.assert_array_equal(np.load(out, mmap_mode="r"), words.matrix())


@pytest.mark.parametrize("suffix,binary", [(".vec", False), (".bin", True)])
def test_word2vec_formats(tmp_path, suffix, binary):
    kv = make_kv(["deu:haus", "eng:house", "water"], dim=3)
    path = tmp_path / f"v{suffix}"
    kv.save_word2vec_format(str(path), binary=binary)
    words = load_word_vectors(path)
    assert words.keys == ["deu:haus", "eng:house", "water"]
    np.testing.assert_allclose(words.matrix(), kv.vectors, rtol=1e-6)


def test_separately_stored_kv_is_memory_mapped(tmp_path):
    kv = make_kv([f"deu:w{i}" for i in range(50)])
    path = tmp_path / "big.kv"
    kv.save(str(path), separately=["vectors"])
    words = load_word_vectors(path)
    assert isinstance(words.table, np.memmap)
    np.testing.assert_array_equal(words.matrix(), kv.vectors)


def _error(path, match, **kwargs):
    with pytest.raises(HyperofaError, match=match):
        load_word_vectors(path, **kwargs)


def test_bad_vector_files_give_one_line_errors(tmp_path):
    _error(tmp_path / "missing.wv", "word-vector file not found")
    (tmp_path / "junk.kv").write_bytes(b"\x80\x04garbage that is no pickle")
    _error(tmp_path / "junk.kv", "corrupt or truncated")
    (tmp_path / "v.txt").write_text("x")
    _error(tmp_path / "v.txt", "unknown word-vector format")

    kv = make_kv([f"deu:w{i}" for i in range(20)])
    vec = tmp_path / "t.vec"
    kv.save_word2vec_format(str(vec), binary=False)
    vec.write_text("\n".join(vec.read_text().splitlines()[:10]) + "\n")
    _error(vec, "corrupt or truncated")
    binary = tmp_path / "t.bin"
    kv.save_word2vec_format(str(binary), binary=True)
    binary.write_bytes(binary.read_bytes()[:-30])
    _error(binary, "corrupt or truncated")
    whole = tmp_path / "whole.kv"
    kv.save(str(whole))
    whole.write_bytes(whole.read_bytes()[:200])
    _error(whole, "corrupt or truncated")
    split = tmp_path / "split.kv"
    kv.save(str(split), separately=["vectors"])
    npy = tmp_path / "split.kv.vectors.npy"
    npy.write_bytes(npy.read_bytes()[:-40])
    _error(split, "split.kv.vectors.npy: array vectors of split.kv is truncated")

    bad = tmp_path / "bad.kv"
    make_kv(BAD_KEYS).save(str(bad))
    _error(bad, "none of its 7 keys is a usable word")
    _error(_saved(tmp_path), "of languages", languages=["zzz"])


def _saved(tmp_path):
    path = tmp_path / "ok.kv"
    make_kv(["deu:haus"]).save(str(path))
    return path


def test_non_finite_vector_is_reported_by_key(tmp_path):
    kv = make_kv(["deu:a", "deu:b"])
    kv.vectors[1, 2] = np.nan
    path = tmp_path / "nan.npy"
    save_word_vectors(path, kv.index_to_key, kv.vectors)
    with pytest.raises(HyperofaError, match="'deu:b' is not finite"):
        words = load_word_vectors(path)
        write_word_vectors(tmp_path / "m.npy", len(words), words.dim, [words.matrix()], words.keys, path)
    assert not (tmp_path / "m.npy").exists()


def _counts(path):
    return Counter(w for line in synthetic.read_lines(path) for w in line.lower().rstrip(".").split())


def test_trained_vectors_put_translations_next_to_each_other(trained_vectors, small_corpus, world):
    kv = KeyedVectors(48)
    words = load_word_vectors(trained_vectors)
    kv.add_vectors(words.keys, words.matrix())
    assert words.skipped == 0 and all(len(k) > 4 and k[3] == ":" for k in kv.index_to_key)  # iso:word keys only, no sentence ids
    files = {p.name.split(".")[0]: p for p in small_corpus.iterdir()}
    for a, b in [("qaa_Latn", "qab_Cyrl"), ("qaa_Latn", "qac_Latn"), ("qab_Cyrl", "qad_Grek")]:
        ca, cb = _counts(files[a]), _counts(files[b])
        keys_b = [k for k in kv.index_to_key if k.startswith(b[:3] + ":")]
        other = kv[keys_b] / np.linalg.norm(kv[keys_b], axis=1, keepdims=True)
        hits = total = 0
        for concept in range(world.n_concepts):
            wa, wb = world.lexicon[a][concept].lower(), world.lexicon[b][concept].lower()
            if ca[wa] >= 3 and cb[wb] >= 3:
                v = kv[f"{a[:3]}:{wa}"]
                total += 1
                hits += keys_b[int(np.argmax(other @ (v / np.linalg.norm(v))))] == f"{b[:3]}:{wb}"
        # Stated threshold: at least 80% of words seen 3+ times in both languages have their translation as
        # nearest neighbour among all words of the other language (measured ~0.95-0.99 on this corpus).
        assert total >= 90 and hits / total >= 0.8, (a, b, total, hits)


def test_vectors_train_is_reproducible_and_a_rerun_is_a_no_op(trained_vectors, small_corpus, tmp_path, capsys):
    argv = ["vectors", "train", f"run.dir={tmp_path}", f"vectors.train.corpus={small_corpus}", "tracking.enabled=false",
            "vectors.train.dim=48", "vectors.train.epochs=10", "vectors.train.alpha=0.25", "vectors.train.prefix_aligned=true"]
    assert cli.main(argv) == 0
    ours = trained_vectors_path(tmp_path)
    assert ours.read_bytes() == trained_vectors.read_bytes()
    assert keys_path(ours).read_bytes() == keys_path(trained_vectors).read_bytes()
    # The progress bar, on stderr: one step per epoch with that epoch's words/s.
    captured = capsys.readouterr()
    bars = [part for part in captured.err.split("\r") if part.startswith("vectors train:")]
    assert len(bars) >= 10 and "10/10" in bars[-1] and "words/s" in bars[-1] and "vectors train" not in captured.out
    assert int(re.search(r"([\d,]+) words/s", bars[-1]).group(1).replace(",", "")) > 1000
    manifest = tmp_path / "vectors" / "manifest.json"
    before = manifest.stat().st_mtime_ns, ours.stat().st_mtime_ns
    assert cli.main(argv) == 0
    assert (manifest.stat().st_mtime_ns, ours.stat().st_mtime_ns) == before


def test_vectors_train_rejects_a_non_parallel_layout(tmp_path, capsys):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "english.txt").write_text("a b\n")
    (tmp_path / "c" / "deu.txt").write_text("a b\n")
    assert cli.main(["vectors", "train", f"run.dir={tmp_path}/r", f"vectors.train.corpus={tmp_path}/c", "tracking.enabled=false"]) == 2
    assert "english.txt: not a parallel-corpus file name" in capsys.readouterr().err


# --- no code from data: gensim pickles through the restricted unpickler, our own vectors without pickle ----------


class _Payload:
    """Unpickling this runs `open(marker, 'w')`: what a crafted vector file would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _crafted_files(tmp_path, marker):
    """Vector files whose loading would write `marker`: a bare payload, one inside a genuine KeyedVectors'
    state, and a genuine pickle whose separately stored array is itself a pickle (object dtype)."""
    import pickle

    bare = tmp_path / "bare.kv"
    bare.write_bytes(pickle.dumps(_Payload(marker), protocol=4))
    kv = make_kv(["deu:haus", "eng:house"])
    kv.lifecycle_events = None
    kv.expandos = {"count": _Payload(marker)}
    inside = tmp_path / "vectors.wv"
    kv.save(str(inside))
    array = tmp_path / "apart.kv"
    genuine = make_kv(["deu:haus", "eng:house"])
    genuine.save(str(array), separately=["vectors"])
    np.save(tmp_path / "apart.kv.vectors.npy", np.array([_Payload(marker)], dtype=object), allow_pickle=True)
    return {"bare": bare, "inside": inside, "array": array}


def test_a_crafted_gensim_file_is_refused_in_one_line_and_runs_nothing(tmp_path):
    marker = tmp_path / "payload-ran"
    for what, path in _crafted_files(tmp_path, marker).items():
        with pytest.raises(HyperofaError) as caught:
            load_word_vectors(path)
        message = str(caught.value)
        assert "\n" not in message and str(path.name) in message, (what, message)
        assert ("refused: the pickle names io.open" in message) or "not a .npy array" in message, (what, message)
        assert not marker.exists(), what
    # The payloads are live: gensim's own loader runs them.
    from gensim.utils import SaveLoad

    with contextlib.suppress(Exception):
        SaveLoad.load(str(tmp_path / "vectors.wv"))
    assert marker.exists()


def _sentences(n=400, seed=0):
    rng = np.random.default_rng(seed)
    words = [f"deu:w{i}" for i in range(60)]
    return [[words[j] for j in rng.integers(0, len(words), 8)] for _ in range(n)]


@pytest.mark.parametrize("how", ["inline", "separately", "model"])
def test_a_genuine_gensim_save_loads_with_identical_vectors(tmp_path, how):
    from gensim.models import Word2Vec

    model = Word2Vec(_sentences(), vector_size=12, min_count=1, workers=1, seed=3, epochs=2)
    path = tmp_path / ("m.wv" if how == "model" else "v.kv")
    if how == "model":
        model.save(str(path), separately=["syn1neg"])  # a whole model, one array apart
    else:
        model.wv.save(str(path), **({"separately": ["vectors"]} if how == "separately" else {}))
    reference = KeyedVectors.load(str(path)) if how != "model" else Word2Vec.load(str(path)).wv
    words = load_word_vectors(path)
    assert words.keys == list(reference.index_to_key) and words.skipped == 0
    np.testing.assert_array_equal(words.matrix(), reference.vectors)
    if how == "separately":
        assert isinstance(words.table, np.memmap)


def test_own_vectors_round_trip_without_pickle_and_give_the_same_bytes(tmp_path):
    keys = ["deu:haus", "eng:house", "x\ny", "fra:$la maison"]
    table = np.random.default_rng(1).normal(size=(4, 5)).astype(np.float32)
    first = save_word_vectors(tmp_path / "a" / "vectors.npy", keys, table)
    second = save_word_vectors(tmp_path / "b" / "vectors.npy", keys, table)
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    words = load_word_vectors(first[-1])
    assert words.keys == ["deu:haus", "eng:house", "fra:$la maison"] and words.skipped == 1
    assert isinstance(words.table, np.memmap)
    np.testing.assert_array_equal(words.matrix(), table[[0, 1, 3]])
    keys_path(first[-1]).write_text('{"not": "a list"}')
    _error(first[-1], "not a JSON list of keys")
    keys_path(first[-1]).unlink()
    _error(first[-1], "keys of the word-vector matrix vectors.npy not found")
