"""`tokenizer extend` from causal-LM tokenizers: byte-level BPE with special tokens after its vocabulary (Llama 3,
Qwen2) and SentencePiece-style BPE with byte fallback (Llama 2, Mistral); sources whose ids would move."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from hyperofa_dist import synthetic
from hyperofa_dist.tokenizer import learn

N_NEW = 300


@pytest.fixture(scope="module")
def scripts_texts() -> dict[str, list[str]]:
    """200 lines of every script the generator writes, lines mixing scripts and emoji included."""
    world = synthetic.World(synthetic.multiscript_languages(), n_concepts=400, seed=0, mixed=True)
    sentences = world.concept_sentences(200, 0)
    return {lang.code: world.render(lang.code, sentences) for lang in world.languages}


@pytest.fixture(scope="module")
def extended(causal_tokenizers, scripts_texts) -> dict[str, tuple[Tokenizer, learn.Extension]]:
    texts = [line for lines in scripts_texts.values() for line in lines]
    sources = {kind: Tokenizer.from_file(str(path / "tokenizer.json")) for kind, path in causal_tokenizers.items()}
    # The newer conversion of a SentencePiece model: no normalizer, a Metaspace pre-tokenizer that does not split.
    metaspace = json.loads(sources["llama2"].to_str())
    metaspace["normalizer"] = None
    metaspace["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first",
                                  "split": False}
    sources["llama2-metaspace"] = Tokenizer.from_str(json.dumps(metaspace))
    return {kind: (src, learn.extend(src, texts, N_NEW)) for kind, src in sources.items()}


KINDS = ("llama3", "llama2", "llama2-metaspace")


@pytest.mark.parametrize("kind", KINDS)
def test_extend_keeps_every_source_id_and_appends_after_the_last_special_token(kind, extended):
    source, ext = extended[kind]
    before, after = source.get_vocab(with_added_tokens=True), ext.tokenizer.get_vocab(with_added_tokens=True)
    assert all(after[token] == token_id for token, token_id in before.items())
    assert len(ext.new_pieces) == N_NEW and ext.shortfall is None
    assert sorted(after[p] for p in ext.new_pieces) == list(range(len(before), len(before) + N_NEW))
    if kind == "llama3":  # the 16 special tokens sit after the 400 BPE entries and keep their ids
        assert [after[t] for t in synthetic.LLAMA3_SPECIALS] == list(range(400, 416))
        assert min(after[p] for p in ext.new_pieces) == 416


@pytest.mark.parametrize("kind", KINDS[1:])
def test_byte_fallback_adds_characters_first_and_no_piece_of_bytes_or_of_two_words(kind, extended, scripts_texts):
    source, ext = extended[kind]
    assert not [p for p in ext.new_pieces if "<0x" in p]
    assert not [p for p in ext.new_pieces if "\u2581" in p[1:]]  # "▁" only opens a piece
    chars = [p for p in ext.new_pieces if len(p) == 1]
    assert len(chars) > 100 and ext.new_pieces[: len(chars)] == chars  # every new character precedes any merge
    # A word of a new script: bytes before, characters and merged pieces after.
    word = " " + scripts_texts["qmg_Ethi"][0].split()[0]
    assert any(t.startswith("<0x") for t in source.encode(word, add_special_tokens=False).tokens)
    assert not any(t.startswith("<0x") for t in ext.tokenizer.encode(word, add_special_tokens=False).tokens)


@pytest.mark.parametrize("kind", KINDS)
def test_extended_causal_tokenizer_never_gives_a_word_more_pieces_and_decodes_every_line(kind, extended, scripts_texts):
    source, ext = extended[kind]
    target = ext.tokenizer
    for lang, lines in scripts_texts.items():
        words = [w for line in lines[:40] for w in line.split()]
        count = lambda tok, w: len(tok.encode(w, add_special_tokens=False).ids)  # noqa: E731
        pieces = [(count(source, w), count(target, w)) for w in words]
        assert all(t <= s for s, t in pieces), lang
        if lang != "qma_Latn":  # the source's own language may gain little; every other script gains
            assert sum(t for _, t in pieces) < 0.6 * sum(s for s, _ in pieces), lang
        assert [target.decode(target.encode(line).ids) for line in lines] == lines


def test_train_bpe_from_a_byte_fallback_source_is_refused_in_one_line(tmp_path, small_corpus, causal_tokenizers,
                                                                     one_line_error):
    out = run_cli("tokenizer", f"run.dir={tmp_path / 'run'}", f"corpus.path={small_corpus}",
                  f"source.model={causal_tokenizers['llama2']}", "tokenizer.mode=train", "tokenizer.model_type=bpe",
                  "tracking.enabled=false")
    one_line_error(out, "tokenizer", "SentencePiece-style BPE of source.model", "tokenizer.mode=extend")
    assert not (tmp_path / "run" / "tokenizer").exists()


def with_moved_id(source: Path, out: Path, kind: str) -> Path:
    """A copy of a tokenizer whose ids have a gap: the last BPE piece (llama2) or the last special token (llama3,
    which the tokenizers library then loads at another id than written) moved up by 3."""
    out.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((source / name).read_bytes())
    data = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    if kind == "llama2":
        vocab = data["model"]["vocab"]
        last = max(vocab, key=vocab.get)
        vocab[last] += 3
    else:
        data["added_tokens"][-1]["id"] += 3
    (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return out


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "hyperofa_dist.cli", *args], capture_output=True, text=True, env=env)


@pytest.mark.parametrize("kind, needle", [("llama2", "have a gap (no token has id 658)"),
                                          ("llama3", "has id 418 in the file but 415 as loaded")])
def test_a_source_whose_ids_would_move_is_one_line_and_writes_nothing(kind, needle, tmp_path, small_corpus,
                                                                     causal_tokenizers, one_line_error):
    moved = with_moved_id(causal_tokenizers[kind], tmp_path / "moved", kind)
    out = run_cli("tokenizer", f"run.dir={tmp_path / 'run'}", f"corpus.path={small_corpus}", f"source.model={moved}",
                  "tokenizer.new_tokens=50", "tracking.enabled=false")
    one_line_error(out, "tokenizer", needle, "would move source ids")
    assert not (tmp_path / "run" / "tokenizer").exists()
