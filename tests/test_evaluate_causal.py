"""Evaluation of causal LMs: whole held-out lines rebuilt from blocks, bits per byte against the stock HF loss and
across tokenizers, fertility, retrieval pooling without BOS, and the tasks refused for each kind of model."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM

from hyperofa_dist import synthetic
from hyperofa_dist.cli import main
from hyperofa_dist.evaluate import causal as C
from hyperofa_dist.evaluate.retrieval import encode_sentences
from hyperofa_dist.formats.shards import build_shards, write_shard
from hyperofa_dist.formats.tokenizer import load_tokenizer
from hyperofa_dist.models.causal import Frame

pytestmark = pytest.mark.usefixtures("one_thread")
BLOCK = 32
POSITIONS = 256  # every held-out line fits, under the target and the (longer) source tokenization


@pytest.fixture(scope="module")
def causal_run(tmp_path_factory, small_corpus, world, pretrain_kit, prepare_format, causal_tokenizers):
    """A run directory: a target tokenizer over every language (<run>/tokenizer), an expanded-like causal model at
    init/random/model, held-out shards made with that tokenizer, retrieval data, and a source model whose
    tokenizer (trained on qaa_Latn only) is the run's source."""
    root = tmp_path_factory.mktemp("evalcausal")
    run = root / "run"
    tok = pretrain_kit.causal_tokenizer(root, small_corpus)
    shutil.copytree(tok, run / "tokenizer")
    synthetic.make_tiny_model("llama", tok, run / "init" / "random" / "model", max_position=POSITIONS)
    source = synthetic.make_tiny_model("llama", causal_tokenizers["llama3"], root / "source", max_position=POSITIONS)
    tokenizer = load_tokenizer(tok)
    lines = {lang: synthetic.read_lines(small_corpus / f"{lang}.txt", limit=40) for lang in ("qaa_Latn", "qac_Latn")}
    blocks = {lang: {"heldout": prepare_format.framed_blocks(tokenizer, text, BLOCK)} for lang, text in lines.items()}
    prepare_format.write(run / "prepare", blocks, tok, BLOCK, blocks_per_sample=3)
    data = root / "data"
    synthetic.write_retrieval_data(data / "srt", world, "qaa_Latn", ["qac_Latn"], n=30)
    return {"root": root, "run": run, "tok": tok, "lines": lines, "source": source}


def evaluate(causal_run, *extra):
    return main(["evaluate", "--data", str(causal_run["root"] / "data"), f"run.dir={causal_run['run']}",
                 f"source.model={causal_run['source']}", "evaluate.layer=-1", *extra])


# --- whole lines from blocks ---------------------------------------------------------------------------------------


def test_whole_lines_come_back_from_blocks_of_two_chunks(causal_run, tmp_path, prepare_format):
    tokenizer = load_tokenizer(causal_run["tok"])
    first, second = causal_run["lines"]["qaa_Latn"][:25], causal_run["lines"]["qaa_Latn"][25:]
    for chunk, text in enumerate((first, second)):
        blocks = prepare_format.framed_blocks(tokenizer, text, 16)
        for shard in build_shards(blocks, "qaa_Latn", chunk, 2, 2):
            write_shard(tmp_path / shard.name, shard.data, keep_existing=False)
    frame = Frame.of(tokenizer.bos_token_id, tokenizer.eos_token_id, None)
    got = C.heldout_lines(sorted(tmp_path.rglob("*.tar")), frame, 1000)
    want = [tokenizer(line, add_special_tokens=False)["input_ids"] for line in first + second]
    # Each chunk's stream loses its unfinished tail; everything before it comes back whole and in order.
    n_first = next(i for i, ids in enumerate(got) if ids.tolist() == want[25])
    assert [ids.tolist() for ids in got[:n_first]] == want[:n_first] and 20 <= n_first < 25
    rest = [ids.tolist() for ids in got[n_first:]]
    assert rest == want[25 : 25 + len(rest)] and len(rest) >= 10
    assert [ids.tolist() for ids in C.heldout_lines(sorted(tmp_path.rglob("*.tar")), frame, 3)] == want[:3]
    texts, lossy = C.decode_lines(tokenizer, got)
    assert texts == (first[:n_first] + second[: len(rest)]) and lossy == 0


def test_block_content_drops_frame_and_padding():
    frame = Frame.of(1, 2, 0)
    assert C.block_content(np.array([1, 5, 2, 7, 2]), frame).tolist() == [5, 2, 7]
    assert C.block_content(np.array([1, 5, 2, 2, 0, 0]), frame).tolist() == [5, 2]
    assert C.block_content(np.array([1, 5, 0, 2]), Frame.of(1, 2, None)).tolist() == [5, 0]


@pytest.mark.parametrize("kind", ["llama3", "llama2"])
def test_causal_tokenizers_decode_lines_losslessly(causal_tokenizers, small_corpus, kind):
    tokenizer = load_tokenizer(causal_tokenizers[kind])
    lines = [line for path in sorted(small_corpus.iterdir()) for line in synthetic.read_lines(path, 20)]  # 3 scripts
    ids = [np.asarray(tokenizer(line, add_special_tokens=False)["input_ids"]) for line in lines]
    texts, lossy = C.decode_lines(tokenizer, ids)
    assert texts == lines and lossy == 0


# --- bits per byte ---------------------------------------------------------------------------------------------------


def test_bits_per_byte_is_the_stock_loss_over_bytes_whatever_the_batch(causal_run):
    model = AutoModelForCausalLM.from_pretrained(causal_run["run"] / "init" / "random" / "model").eval()
    tokenizer = load_tokenizer(causal_run["tok"])
    texts = causal_run["lines"]["qac_Latn"][:7] + ["ÿ", "日本 ሀለ"]  # multi-byte characters count in bytes
    total, n_bytes, tokens = 0.0, 0, 0
    for text in texts:
        ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
        total += loss * (len(ids) - 1)
        tokens += len(ids) - 1
        n_bytes += len(text.encode("utf-8"))
    one = C.bits_per_byte(model, tokenizer, texts, batch_size=1, chunk=7)
    four = C.bits_per_byte(model, tokenizer, texts, batch_size=4, chunk=0)
    assert one["bpb"] == pytest.approx(total / (math.log(2) * n_bytes), rel=1e-5)
    assert four["bpb"] == pytest.approx(one["bpb"], rel=1e-5)
    assert one["bytes"] == n_bytes and one["sentences"] == len(texts)
    assert one["tokens_per_byte"] == pytest.approx(tokens / n_bytes)
    assert one["loss"] == pytest.approx(total / tokens, rel=1e-5)
    long = C.bits_per_byte(model, tokenizer, texts + [" ".join(texts * 20)], batch_size=4)
    assert long["too_long"] == 1 and long["sentences"] == len(texts)  # longer than the model's positions


def test_stage_bpb_and_fertility_results_mlflow_and_comparable_bytes(causal_run, capsys):
    from mlflow.tracking import MlflowClient

    from hyperofa_dist.tracking import default_tracking_uri

    assert evaluate(causal_run, "--model", "init/random", "--tasks", "srt,bpb,fertility",
                    "evaluate.heldout_sentences=20") == 0
    stage = causal_run["run"] / "evaluate" / "init-random"
    results = json.loads((stage / "results.json").read_text())
    assert sorted(results) == ["bpb", "fertility", "srt"]
    assert sorted(results["bpb"]) == ["average", "qaa_Latn", "qac_Latn"]
    target = results["bpb"]["qac_Latn"]
    assert target["sentences"] == 20 and target["lossy"] == 0 and 0 < target["bpb"] < 20
    assert target["bytes"] == sum(len(t.encode()) for t in causal_run["lines"]["qac_Latn"][:20])
    fert = results["fertility"]["qac_Latn"]
    assert fert["fertility_target"] < fert["fertility_source"]  # the source tokenizer never saw qac_Latn
    assert fert["tokens_per_byte_target"] < fert["tokens_per_byte_source"]
    client = MlflowClient(default_tracking_uri(causal_run["run"]))
    (run,) = client.search_runs([client.get_experiment_by_name("hyperofa").experiment_id],
                                "tags.`evaluate.name` = 'init-random'")
    assert run.data.metrics["bpb.qac_Latn.bpb"] == pytest.approx(target["bpb"])
    assert run.data.metrics["fertility.average.fertility_target"] == pytest.approx(
        results["fertility"]["average"]["fertility_target"])
    # The source model reads the same held-out text through its own tokenizer (found as <run.dir>/tokenizer):
    # the same bytes, more tokens.
    assert evaluate(causal_run, "--model", str(causal_run["source"]), "--tasks", "bpb",
                    "evaluate.heldout_sentences=20", "evaluate.name=source") == 0
    source = json.loads((causal_run["run"] / "evaluate" / "source" / "results.json").read_text())["bpb"]
    for lang in ("qaa_Latn", "qac_Latn"):
        assert source[lang]["bytes"] == results["bpb"][lang]["bytes"]
    assert source["qac_Latn"]["tokens_per_byte"] > target["tokens_per_byte"]
    capsys.readouterr()
    assert evaluate(causal_run, "--model", "init/random", "--tasks", "srt,bpb,fertility",
                    "evaluate.heldout_sentences=20") == 0
    assert "up to date" in capsys.readouterr().err


def test_shards_of_an_unknown_tokenizer_are_refused(causal_run, capsys, tmp_path, causal_tokenizers):
    code = evaluate(causal_run, "--model", "init/random", "--tasks", "bpb",
                    f"evaluate.heldout_tokenizer={causal_tokenizers['llama2']}", "evaluate.name=wrong")
    line = one_line_error(capsys, code)
    assert "held-out shards were made with a tokenizer" in line and "evaluate.heldout_tokenizer" in line
    assert not (causal_run["run"] / "evaluate" / "wrong").exists()


# --- retrieval ---------------------------------------------------------------------------------------------------------


def test_causal_retrieval_pools_text_tokens_only(causal_run):
    model = AutoModel.from_pretrained(causal_run["run"] / "init" / "random" / "model").eval()
    tokenizer = load_tokenizer(causal_run["tok"])
    lines = causal_run["lines"]["qac_Latn"][:5]
    pooled = encode_sentences(model, tokenizer, lines, -1, batch_size=5, max_length=POSITIONS, device="cpu",
                              pool_special=False)
    for i, line in enumerate(lines):
        ids = tokenizer(line)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id
        with torch.no_grad():
            hidden = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
        assert torch.allclose(pooled[i], hidden[1:].mean(0), atol=1e-5)  # BOS left out, padding never pooled
    with_bos = encode_sentences(model, tokenizer, lines, -1, batch_size=5, max_length=POSITIONS, device="cpu")
    assert not torch.allclose(with_bos, pooled, atol=1e-3)


# --- what each kind of model is refused -------------------------------------------------------------------------------


def one_line_error(capsys, code):
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("hyperofa")]
    assert code == 2 and len(err) == 1 and err[0].startswith("hyperofa evaluate: error: ")
    return err[0]


@pytest.mark.parametrize("tasks, message", [
    ("srt,pos", "pos is for masked LMs (MLM-only)"),
    ("ner,mlm", "ner, mlm are for masked LMs (MLM-only)"),
])
def test_masked_lm_tasks_on_a_causal_lm_are_one_line(causal_run, capsys, tasks, message):
    code = evaluate(causal_run, "--model", "init/random", "--tasks", tasks, "evaluate.name=refused")
    line = one_line_error(capsys, code)
    assert message in line and "is a causal LM" in line
    assert not (causal_run["run"] / "evaluate" / "refused").exists()


def test_bpb_on_a_masked_lm_is_one_line(causal_run, capsys, source_tokenizers, tmp_path):
    model = synthetic.make_tiny_model("xlmr", source_tokenizers["xlmr"], tmp_path / "mlm")
    code = evaluate(causal_run, "--model", str(model), "--tasks", "bpb", "evaluate.name=mlm-bpb")
    assert "bpb needs a causal LM" in one_line_error(capsys, code)
    assert not (causal_run["run"] / "evaluate" / "mlm-bpb").exists()
