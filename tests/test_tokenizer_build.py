"""The target tokenizer: extend (all three source families) and train, the stage, its manifest and its errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from hyperofa_dist import synthetic
from hyperofa_dist import fertility
from hyperofa_dist.tokenizer import learn
from hyperofa_dist.cli import main as cli_main
from hyperofa_dist.formats.rundir import HASHES_SUFFIX

FAMILIES = synthetic.FAMILIES
SOURCE_LANG = "qaa_Latn"  # the conftest source tokenizers are trained on this language only
N_NEW = 120
PER_LANG = 150


@pytest.fixture(scope="module")
def sample(small_corpus) -> dict[str, list[str]]:
    """The first PER_LANG sentences of each language, as the stage samples them."""
    out = {}
    for path in sorted(small_corpus.iterdir()):
        out[path.name.split(".")[0]] = synthetic.read_lines(path, PER_LANG)
    return out


@pytest.fixture(scope="module")
def texts(sample) -> list[str]:
    return [s for lang in sorted(sample) for s in sample[lang]]


@pytest.fixture(scope="module")
def backends(source_tokenizers) -> dict[str, Tokenizer]:
    return {fam: Tokenizer.from_file(str(path / "tokenizer.json")) for fam, path in source_tokenizers.items()}


@pytest.fixture(scope="module")
def extended(backends, texts) -> dict[str, learn.Extension]:
    return {fam: learn.extend(backends[fam], texts, N_NEW) for fam in FAMILIES}


# --- extend -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_extend_keeps_every_source_id_and_appends_n_pieces_after_them(family, source_tokenizers, extended):
    source = AutoTokenizer.from_pretrained(str(source_tokenizers[family]))
    ext = extended[family]
    target_vocab = ext.tokenizer.get_vocab(with_added_tokens=True)
    source_vocab = source.get_vocab()
    assert len(source_vocab) == len(source)
    for token, token_id in source_vocab.items():
        assert target_vocab[token] == token_id, token
    for role in ("bos", "eos", "unk", "sep", "pad", "cls", "mask"):
        token = getattr(source, f"{role}_token")
        if token is not None:
            assert ext.tokenizer.token_to_id(token) == getattr(source, f"{role}_token_id")
    assert ext.shortfall is None
    assert len(ext.new_pieces) == N_NEW == len(set(ext.new_pieces))
    assert len(target_vocab) == len(source) + N_NEW
    assert [ext.tokenizer.id_to_token(len(source) + k) for k in range(N_NEW)] == ext.new_pieces
    assert not set(ext.new_pieces) & set(source_vocab)


def test_xlmr_mask_keeps_its_last_source_id_and_new_pieces_follow_it(source_tokenizers, extended):
    # XLM-R keeps <mask> last; Glot500 moved it to the very end, which changes a source id. Here it stays.
    source = AutoTokenizer.from_pretrained(str(source_tokenizers["xlmr"]))
    assert source.mask_token_id == len(source) - 1
    target = extended["xlmr"].tokenizer
    assert target.token_to_id("<mask>") == source.mask_token_id
    assert target.id_to_token(len(source)) == extended["xlmr"].new_pieces[0]
    assert target.encode("<mask>", add_special_tokens=False).ids == [source.mask_token_id]


def test_unigram_pieces_are_appended_by_learned_score(backends, extended):
    source_size = backends["xlmr"].get_vocab_size(with_added_tokens=True)
    model = json.loads(extended["xlmr"].tokenizer.to_str())["model"]
    scores = [score for _, score in model["vocab"][source_size:]]
    assert len(scores) == N_NEW
    assert scores == sorted(scores, reverse=True)
    assert all(score < 0 for score in scores)  # learned log-probabilities, not placeholders


def test_bpe_appends_source_merges_unchanged_then_merges_that_build_every_new_token(backends, extended):
    source_merges = json.loads(backends["roberta"].to_str())["model"]["merges"]
    target = extended["roberta"].tokenizer
    model = json.loads(target.to_str())["model"]
    assert model["merges"][: len(source_merges)] == source_merges
    appended = model["merges"][len(source_merges) :]
    assert len(appended) == extended["roberta"].new_merges >= N_NEW
    vocab = model["vocab"]
    built = {}
    for a, b in appended:
        # Both parts exist before the merge that joins them: every appended token is reachable.
        assert vocab[a] < vocab[a + b] and vocab[b] < vocab[a + b]
        built.setdefault(a + b, (a, b))
    assert set(extended["roberta"].new_pieces) <= set(built)


def test_bpe_target_never_splits_a_word_into_more_pieces_than_the_source(backends, extended, sample):
    # New merges rank after all source merges: the target segmentation coarsens the source one, word by word.
    source, target = backends["roberta"], extended["roberta"].tokenizer
    for lang, lines in sample.items():
        s = fertility.pieces_per_word(source, lines, None)
        t = fertility.pieces_per_word(target, lines, None)
        assert len(s) == len(t) > 0
        assert (t <= s).all(), lang
    assert fertility.fertility(source, target, sample[SOURCE_LANG]).share_fewer_source == 0.0


def test_wordpiece_appends_new_characters_first_then_learned_pieces(backends, extended):
    new = extended["bert"].new_pieces
    is_char = [len(p.removeprefix("##")) == 1 for p in new]
    assert any(is_char) and not all(is_char)
    first_piece = is_char.index(False)
    assert all(is_char[:first_piece]) and not any(is_char[first_piece:])
    assert any(p.startswith("##") and len(p) > 3 for p in new)  # continuation pieces
    assert any(not p.startswith("##") and len(p) > 1 for p in new)  # word-initial pieces
    assert any(p in {"б", "##б", "α", "##α"} for p in new)  # characters of the new scripts


@pytest.mark.parametrize("family", FAMILIES)
def test_extend_lowers_fertility_on_new_languages_and_keeps_source_language_text(family, backends, extended, sample):
    source, target = backends[family], extended[family].tokenizer
    for lang, lines in sample.items():
        report = fertility.fertility(source, target, lines)
        if lang == SOURCE_LANG:
            # What holds on the source language: the same text comes back, at no worse fertility.
            assert report.fertility_target <= report.fertility_source
            assert report.unk_rate_source == report.unk_rate_target == 0.0
            for line in lines:
                assert target.decode(target.encode(line).ids) == source.decode(source.encode(line).ids)
        else:
            assert report.fertility_target < report.fertility_source, lang
            assert report.share_fewer_target > report.share_fewer_source, lang
            assert report.unk_rate_target <= report.unk_rate_source


@pytest.mark.parametrize("family", FAMILIES)
def test_extend_is_deterministic(family, backends, texts, extended):
    again = learn.extend(backends[family], texts, N_NEW)
    assert again.tokenizer.to_str() == extended[family].tokenizer.to_str()


@pytest.mark.parametrize("family", FAMILIES)
def test_extend_appends_fewer_with_a_reason_when_the_corpus_cannot_supply_n(family, backends, sample):
    source = backends[family]
    ext = learn.extend(source, sample["qad_Grek"][:5], 5000)
    assert 0 < len(ext.new_pieces) < 5000
    assert ext.shortfall and f"only {len(ext.new_pieces)} new pieces" in ext.shortfall
    assert ext.tokenizer.get_vocab_size(with_added_tokens=True) == source.get_vocab_size(True) + len(ext.new_pieces)


def test_unknown_text_counts_one_piece_per_character_it_replaced(backends):
    bert = backends["bert"]  # trained on Latin script only: a Cyrillic word is one [UNK]
    unk = bert.token_to_id("[UNK]")
    assert bert.encode("жжжж", add_special_tokens=False).ids == [unk]
    assert fertility.pieces_per_word(bert, ["жжжж"], unk).tolist() == [4]
    assert fertility.pieces_per_word(bert, ["жжжж"], None).tolist() == [1]


# --- train --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family,model_type", [("xlmr", "unigram"), ("bert", "unigram"), ("roberta", "bpe"), ("bert", "bpe")]
)
def test_train_puts_source_special_tokens_first_with_their_roles(
    family, model_type, source_tokenizers, backends, texts
):
    source = AutoTokenizer.from_pretrained(str(source_tokenizers[family]))
    target = learn.train(backends[family], texts, model_type, 300, unk_token=source.unk_token)
    specials = sorted(source.all_special_tokens, key=source.convert_tokens_to_ids)
    assert [target.id_to_token(i) for i in range(len(specials))] == specials
    assert 0 < target.get_vocab_size(with_added_tokens=True) <= 300
    assert json.loads(target.to_str())["model"]["type"].lower() == model_type
    enc = target.encode("foo bar")
    assert enc.ids[0] == target.token_to_id(source.cls_token) == specials.index(source.cls_token)
    assert enc.ids[-1] == target.token_to_id(source.sep_token) == specials.index(source.sep_token)
    assert target.encode(source.mask_token, add_special_tokens=False).ids == [specials.index(source.mask_token)]
    assert target.encode(texts[-1], add_special_tokens=False).ids
    assert source.unk_token not in target.encode(" ".join(texts[:20]), add_special_tokens=False).tokens


def test_train_is_deterministic(backends, texts):
    a = learn.train(backends["xlmr"], texts, "unigram", 300, unk_token="<unk>")
    b = learn.train(backends["xlmr"], texts, "unigram", 300, unk_token="<unk>")
    assert a.to_str() == b.to_str()


# --- the stage ------------------------------------------------------------------------------------------------


def stage_args(run_dir: Path, corpus: Path, tokenizer: Path, *extra: str) -> list[str]:
    return [
        "tokenizer",
        f"run.dir={run_dir}",
        f"corpus.path={corpus}",
        f"source.tokenizer={tokenizer}",
        f"tokenizer.new_tokens={N_NEW}",
        f"tokenizer.sentences_per_language={PER_LANG}",
        "tokenizer.fertility_sentences=100",
        *extra,
    ]


def snapshot(directory: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("family", FAMILIES)
def test_stage_extend_saves_a_tokenizer_that_autotokenizer_reproduces(
    family, tmp_path, small_corpus, source_tokenizers, sample
):
    run_dir = tmp_path / "run"
    assert cli_main(stage_args(run_dir, small_corpus, source_tokenizers[family], "tracking.enabled=false")) == 0
    out = run_dir / "tokenizer"
    manifest = json.loads((out / "manifest.json").read_text())
    source = AutoTokenizer.from_pretrained(str(source_tokenizers[family]))
    counts = manifest["counts"]
    assert counts["source_size"] == len(source)
    assert counts["new_pieces"] == N_NEW
    assert counts["target_size"] == len(source) + N_NEW
    assert counts["sample_sentences"] == {lang: len(lines) for lang, lines in sample.items()}
    assert counts["skipped_languages"] == []
    assert 0 < counts["new_pieces_used_in_sample"] <= N_NEW
    assert set(manifest["inputs"]["corpus_sample"]) == set(sample)
    assert manifest["inputs"]["source_tokenizer"]["tokenizer_json_sha256"]
    assert {o["path"] for o in manifest["outputs"]} == {"tokenizer.json", "tokenizer_config.json"}
    # no build debris; the stage's verified-hash cache (formats/rundir.py) is the one hidden file it keeps
    assert [p.name for p in run_dir.iterdir() if p.name.startswith(".")] == [f".tokenizer{HASHES_SUFFIX}"]

    backend = Tokenizer.from_file(str(out / "tokenizer.json"))
    loaded = AutoTokenizer.from_pretrained(str(out))
    assert len(loaded) == counts["target_size"] == backend.get_vocab_size(with_added_tokens=True)
    assert loaded.get_vocab() == backend.get_vocab(with_added_tokens=True)
    for token, token_id in source.get_vocab().items():
        assert loaded.convert_tokens_to_ids(token) == token_id
    assert loaded.mask_token_id == source.mask_token_id and loaded.pad_token_id == source.pad_token_id
    lines = [line for lang in sorted(sample) for line in sample[lang][-20:]]
    assert loaded(lines)["input_ids"] == [e.ids for e in backend.encode_batch(lines)]
    plain = backend.encode_batch(lines, add_special_tokens=False)
    assert [loaded.tokenize(line) for line in lines] == [e.tokens for e in plain]

    for lang, report in manifest["fertility"].items():
        if lang != SOURCE_LANG:
            assert report["fertility_target"] < report["fertility_source"]


def test_stage_rerun_is_a_no_op_and_changed_inputs_rebuild(tmp_path, small_corpus, source_tokenizers):
    run_dir = tmp_path / "run"
    args = stage_args(run_dir, small_corpus, source_tokenizers["xlmr"], "tracking.enabled=false")
    assert cli_main(args) == 0
    before = snapshot(run_dir / "tokenizer")
    assert cli_main(args) == 0
    assert snapshot(run_dir / "tokenizer") == before

    # A second build elsewhere gives the same bytes; other inputs give another tokenizer and manifest.
    other = tmp_path / "other"
    assert cli_main(stage_args(other, small_corpus, source_tokenizers["xlmr"], "tracking.enabled=false")) == 0
    assert (other / "tokenizer" / "tokenizer.json").read_bytes() == before["tokenizer.json"][1]
    assert cli_main(args + ["tokenizer.new_tokens=60"]) == 0
    manifest = json.loads((run_dir / "tokenizer" / "manifest.json").read_text())
    assert manifest["counts"]["new_pieces"] == 60
    assert len(AutoTokenizer.from_pretrained(str(run_dir / "tokenizer"))) == manifest["counts"]["source_size"] + 60


def test_stage_train_mode_keeps_special_roles(tmp_path, small_corpus, source_tokenizers):
    run_dir = tmp_path / "run"
    args = stage_args(run_dir, small_corpus, source_tokenizers["xlmr"], "tracking.enabled=false",
                      "tokenizer.mode=train", "tokenizer.model_type=bpe", "tokenizer.vocab_size=350")
    assert cli_main(args) == 0
    loaded = AutoTokenizer.from_pretrained(str(run_dir / "tokenizer"))
    manifest = json.loads((run_dir / "tokenizer" / "manifest.json").read_text())
    assert len(loaded) == manifest["counts"]["target_size"] == 350
    # Same strings and roles, ids first in source order: <mask> moves from last (399) to 4.
    roles = [loaded.bos_token_id, loaded.pad_token_id, loaded.eos_token_id, loaded.unk_token_id, loaded.mask_token_id]
    assert roles == [0, 1, 2, 3, 4]
    assert manifest["special_tokens"]["mask"] == ["<mask>", 4]
    ids = loaded("Patak")["input_ids"]
    assert ids[0] == loaded.cls_token_id and ids[-1] == loaded.sep_token_id


def test_stage_skips_an_empty_language_and_counts_it(tmp_path, small_corpus, source_tokenizers, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for lang in ("qaa_Latn", "qad_Grek"):
        (corpus / f"{lang}.txt").write_bytes((small_corpus / f"{lang}.txt").read_bytes())
    (corpus / "qae_Latn.txt").write_bytes(b"")
    run_dir = tmp_path / "run"
    args = stage_args(run_dir, corpus, source_tokenizers["bert"], "tracking.enabled=false", "tokenizer.new_tokens=40")
    assert cli_main(args) == 0
    manifest = json.loads((run_dir / "tokenizer" / "manifest.json").read_text())
    assert manifest["counts"]["skipped_languages"] == ["qae_Latn"]
    assert set(manifest["counts"]["sample_sentences"]) == set(manifest["fertility"]) == {"qaa_Latn", "qad_Grek"}
    assert "skipped language qae_Latn (no sentences)" in capsys.readouterr().err


def test_stage_logs_counts_and_fertility_to_mlflow(tmp_path, small_corpus, source_tokenizers):
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    assert cli_main(stage_args(run_dir, small_corpus, source_tokenizers["bert"])) == 0
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("hyperofa")
    runs = client.search_runs([experiment.experiment_id], "tags.`hyperofa.stage` = 'tokenizer'")
    assert len(runs) == 1
    metrics = runs[0].data.metrics
    manifest = json.loads((run_dir / "tokenizer" / "manifest.json").read_text())
    assert metrics["target_size"] == manifest["counts"]["target_size"]
    assert metrics["new_pieces"] == N_NEW
    for lang, report in manifest["fertility"].items():
        assert metrics[f"fertility_target/{lang}"] == pytest.approx(report["fertility_target"])
        assert metrics[f"fertility_source/{lang}"] == pytest.approx(report["fertility_source"])
    assert runs[0].data.params["tokenizer.new_tokens"] == str(N_NEW)


# --- errors: one line, exit 2, no manifest ------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "hyperofa_dist.cli", *args], capture_output=True, text=True, env=env)


@pytest.fixture
def assert_one_line_failure(one_line_error):
    def check(out: subprocess.CompletedProcess, run_dir: Path, *needles: str) -> None:
        one_line_error(out, "tokenizer", *needles)
        assert not (run_dir / "tokenizer" / "manifest.json").exists()
        assert not (run_dir / "tokenizer").exists()

    return check


def test_missing_source_tokenizer_is_one_line(tmp_path, small_corpus, assert_one_line_failure):
    missing = tmp_path / "no_such_tokenizer"
    out = run_cli(*stage_args(tmp_path / "run", small_corpus, missing, "tracking.enabled=false"))
    assert_one_line_failure(out, tmp_path / "run", str(missing), "source.tokenizer")


def test_missing_corpus_is_one_line(tmp_path, source_tokenizers, assert_one_line_failure):
    missing = tmp_path / "no_such_corpus"
    out = run_cli(*stage_args(tmp_path / "run", missing, source_tokenizers["xlmr"], "tracking.enabled=false"))
    assert_one_line_failure(out, tmp_path / "run", str(missing))


def test_unreachable_hub_tokenizer_is_one_line(tmp_path, small_corpus, assert_one_line_failure):
    out = run_cli("tokenizer", f"run.dir={tmp_path / 'run'}", f"corpus.path={small_corpus}",
                  "source.model=no-such-org/no-such-model", "tracking.enabled=false")
    assert_one_line_failure(out, tmp_path / "run", "no-such-org/no-such-model", "source.model", "offline")
