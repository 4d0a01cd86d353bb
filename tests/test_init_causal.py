"""`hyperofa init` from a causal LM: untied (Llama) and tied (Qwen2) sources, Llama-3 and Llama-2 style tokenizers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hyperofa_dist import synthetic
from hyperofa_dist.cli import main as cli_main
from hyperofa_dist.formats import init as init_format
from hyperofa_dist.formats.mapping import load_mapping
from hyperofa_dist.method import assemble as asm


def run_init(w, method, *extra):
    return cli_main(["init", *w.overrides(f"init.method={method}", *extra)])


@pytest.mark.parametrize("family, tokenizer, k", [("llama", "llama3", None), ("qwen2", "qwen2", None),
                                                 ("llama", "llama2", 16)])
def test_expanded_causal_lm_loads_stock_and_gives_the_source_logits_on_source_text(
    family, tokenizer, k, init_worlds, tmp_path, one_thread
):
    base = init_worlds.causal(family, tokenizer, k=k)
    w = init_worlds.fresh_run(base, tmp_path / "run")
    assert run_init(w, "random") == 0
    out = init_format.model_dir(w.run_dir, "random")
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()  # stock classes, no custom code
    tok = AutoTokenizer.from_pretrained(str(out))
    source = AutoModelForCausalLM.from_pretrained(str(w.source_model)).eval()
    source_tok = AutoTokenizer.from_pretrained(str(w.source_model))
    tied = synthetic.CAUSAL_FAMILIES[family]
    assert type(model) is type(source) and model.config.tie_word_embeddings is tied
    same = model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    assert same is tied
    v_s, v_t = len(source_tok), len(tok)
    assert model.config.vocab_size == v_t > v_s
    # Every source token keeps its id and is copied from itself: exactly, in both matrices, even with k < D.
    torch.testing.assert_close(model.get_input_embeddings().weight[:v_s], source.get_input_embeddings().weight,
                               rtol=0, atol=0)
    torch.testing.assert_close(model.get_output_embeddings().weight[:v_s], source.get_output_embeddings().weight,
                               rtol=0, atol=0)
    lines = synthetic.read_lines(init_worlds.corpus / "qaa_Latn.txt", 60)
    unchanged = [line for line in lines if tok(line)["input_ids"] == source_tok(line)["input_ids"]]
    assert len(unchanged) >= 10
    with torch.no_grad():
        for line in unchanged[:10]:
            ids = torch.tensor([tok(line)["input_ids"]])
            torch.testing.assert_close(model(ids).logits[..., :v_s], source(ids).logits, rtol=0, atol=1e-5)
    assert (model.config.bos_token_id, model.config.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)
    manifest = json.loads((out.parent / "manifest.json").read_text())
    assert manifest["kind"] == "causal" and manifest["tied"] is tied


def stage_rows(run_dir, method):
    out = init_format.model_dir(run_dir, method)
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    coordinates = np.load(out.parent / init_format.COORDINATES)
    provenance = np.load(out.parent / init_format.PROVENANCE)
    return model, coordinates, provenance


def test_untied_methods_give_both_matrices_from_one_coordinate_row_and_copies_stay_exact(init_worlds, tmp_path,
                                                                                       one_thread):
    from hyperofa_dist.method.hypernet.predict import tokens_to_predict

    base = init_worlds.causal("llama", "llama3", k=16)
    w = init_worlds.fresh_run(base, tmp_path / "run")
    mapping = load_mapping(w.run_dir)
    assert mapping.matrices == 2 and mapping.primitives.shape == (16, 64) and mapping.hidden_size == 32
    ids = tokens_to_predict(mapping.target_postings, mapping.overlap_target)
    rng = np.random.default_rng(0)
    init_worlds.write_hypernet(w.run_dir, ids, rng.standard_normal((len(ids), 16)).astype(np.float32) * 0.05)
    source = AutoModelForCausalLM.from_pretrained(str(w.source_model))
    source_in = source.get_input_embeddings().weight.detach().numpy()
    source_out = source.get_output_embeddings().weight.detach().numpy()
    p = mapping.primitives
    for method, code in (("ofa", asm.OFA), ("hyperofa", asm.HYPEROFA), ("mean", asm.MEAN)):
        assert run_init(w, method) == 0
        model, coordinates, provenance = stage_rows(w.run_dir, method)
        emb_in = model.get_input_embeddings().weight.detach().numpy()
        emb_out = model.get_output_embeddings().weight.detach().numpy()
        new = np.flatnonzero(provenance == code)
        assert len(new) > 50
        np.testing.assert_allclose(emb_in[new], coordinates[new] @ p[:, :32], atol=1e-5)
        np.testing.assert_allclose(emb_out[new], coordinates[new] @ p[:, 32:], atol=1e-5)
        copied = np.flatnonzero(provenance[: len(source_in)] == asm.COPY)  # (a new token may copy case-blind)
        assert len(copied) == len(source_in)
        np.testing.assert_array_equal(emb_in[copied], source_in[copied])  # extension: a source id copies itself
        np.testing.assert_array_equal(emb_out[copied], source_out[copied])
    # mean: every token that was not copied is the mean of its source pieces' coordinates (byte-level: always)
    model, coordinates, provenance = stage_rows(w.run_dir, "mean")
    assert set(np.unique(provenance)) == {asm.COPY, asm.MEAN}
    tok = AutoTokenizer.from_pretrained(str(w.target_tokenizer))
    splitter = AutoTokenizer.from_pretrained(str(w.source_model)).backend_tokenizer.model
    for token_id in np.flatnonzero(provenance == asm.MEAN)[::40]:
        pieces = [t.id for t in splitter.tokenize(tok.convert_ids_to_tokens(int(token_id)))]
        assert "".join(splitter.id_to_token(i) for i in pieces) == tok.convert_ids_to_tokens(int(token_id))
        np.testing.assert_allclose(coordinates[token_id], mapping.source_coordinates[pieces].mean(0), atol=1e-6)


def test_byte_fallback_mean_uses_the_byte_tokens_of_new_characters(init_worlds, tmp_path, one_thread):
    w = init_worlds.fresh_run(init_worlds.causal("llama", "llama2"), tmp_path / "run")
    assert run_init(w, "mean") == 0
    _, coordinates, provenance = stage_rows(w.run_dir, "mean")
    tok = AutoTokenizer.from_pretrained(str(w.target_tokenizer))
    source_tok = AutoTokenizer.from_pretrained(str(w.source_model))
    f_s = load_mapping(w.run_dir).source_coordinates
    char = next(i for i in range(len(source_tok), len(tok)) if len(tok.convert_ids_to_tokens(i)) == 1
                and ord(tok.convert_ids_to_tokens(i)) > 0x370)  # a new character outside Latin, e.g. Cyrillic
    text = tok.convert_ids_to_tokens(char)
    byte_ids = [source_tok.convert_tokens_to_ids(f"<0x{b:02X}>") for b in text.encode("utf-8")]
    assert provenance[char] == asm.MEAN
    np.testing.assert_allclose(coordinates[char], f_s[byte_ids].mean(0), atol=1e-6)


def test_next_token_loss_counts_positions_followed_by_a_new_token(init_worlds, prepare_format, small_corpus, tmp_path,
                                                                 one_thread, capsys):
    """With held-out shards of the target tokenizer, init reports the next-token loss over the positions whose next
    token was not copied, equal to the stock HF loss with every other label ignored; per method."""
    from hyperofa_dist.formats.rundir import Stage

    w = init_worlds.fresh_run(init_worlds.causal("llama", "llama3"), tmp_path / "run")
    tok = AutoTokenizer.from_pretrained(str(w.target_tokenizer))
    langs = ("qab_Cyrl", "qad_Grek")
    lines = {lang: synthetic.read_lines(small_corpus / f"{lang}.txt.gz" if lang == "qab_Cyrl" else
                                        small_corpus / f"{lang}.txt", 80) for lang in langs}
    blocks = {lang: {"heldout": prepare_format.framed_blocks(tok, lines[lang], 32)[:6]} for lang in langs}
    prepare_format.write(w.run_dir / "prepare", blocks, w.target_tokenizer, 32)
    losses = {}
    for method in ("random", "mean"):
        assert run_init(w, method, "init.heldout_blocks=5") == 0
        out = init_format.model_dir(w.run_dir, method)
        reported = json.loads((out.parent / "quality.json").read_text())["new_token_causal"]
        assert set(reported["loss"]) == {*langs, "average"}
        model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
        provenance = np.load(out.parent / init_format.PROVENANCE)
        for lang in langs:
            ids = torch.from_numpy(blocks[lang]["heldout"][:5].astype(np.int64))
            labels = ids.clone()
            labels[torch.from_numpy(provenance == asm.COPY)[ids]] = -100
            with torch.no_grad():
                expected = float(model(input_ids=ids, labels=labels).loss)  # HF shifts the labels itself
            assert reported["loss"][lang] == pytest.approx(expected, abs=1e-4)
            assert reported["positions"][lang] == int((labels[:, 1:] >= 0).sum()) > 0
        losses[method] = reported["loss"]["average"]
        assert Stage(w.run_dir, f"init/{method}").require()["new_token_causal_loss"] == reported["loss"]
        assert f"new-token next-token loss {losses[method]:.4f}" in capsys.readouterr().err
    assert losses["mean"] < losses["random"]


# --- bad input: one line, exit 2, nothing written ------------------------------------------------------------------


def one_line(capsys, command: str, code: int, *needles: str) -> str:
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if ": error: " in line]
    assert len(errors) == 1 and errors[0].startswith(f"hyperofa {command}: error: "), lines
    for needle in needles:
        assert needle in errors[0]
    return errors[0]


def test_a_causal_lm_without_a_resizable_embedding_is_one_line_and_writes_nothing(init_worlds, tmp_path, capsys,
                                                                                  monkeypatch):
    from transformers import LlamaForCausalLM

    w = init_worlds.fresh_run(init_worlds.causal("llama", "llama3"), tmp_path / "run")
    # As a model whose token table is not a plain nn.Embedding (a quantised or custom lookup) presents itself.
    monkeypatch.setattr(LlamaForCausalLM, "get_input_embeddings", lambda self: torch.nn.Identity())
    one_line(capsys, "init", run_init(w, "random"), str(w.source_model), "no resizable word embedding (",
             "Identity")
    assert not (w.run_dir / "init").exists()


def test_require_resizable_refuses_other_rows_per_token_and_a_head_of_another_shape(init_worlds):
    from hyperofa_dist.errors import HyperofaError
    from hyperofa_dist.formats.models import CAUSAL, require_resizable

    model = AutoModelForCausalLM.from_pretrained(str(init_worlds.causal("llama", "llama3").source_model))
    require_resizable(model, CAUSAL, "m")
    rows = model.get_input_embeddings().num_embeddings
    model.model.per_layer_tokens = torch.nn.Parameter(torch.zeros(rows, 4))  # as Gemma 3n's per-layer tables
    with pytest.raises(HyperofaError, match=r"other than the word embedding .* \(model.per_layer_tokens\)"):
        require_resizable(model, CAUSAL, "m")
    del model.model.per_layer_tokens
    model.lm_head = torch.nn.Linear(32, rows - 1, bias=False)
    with pytest.raises(HyperofaError, match=r"output projection is Linear \(415, 32\), not an nn.Linear"):
        require_resizable(model, CAUSAL, "m")


# evaluate refuses the task before it loads anything (evaluate/stage.py check_tasks), with its own wording.
@pytest.mark.parametrize("task, needle", [("mlm", "mlm is for masked LMs (MLM-only)"),
                                          ("pos", "pos is for masked LMs (MLM-only)")])
def test_a_causal_lm_given_to_a_masked_lm_only_evaluation_is_one_line(task, needle, init_worlds, prepare_format,
                                                                      small_corpus, world, tmp_path, capsys):
    model = init_worlds.causal("llama", "llama3").source_model
    tok = AutoTokenizer.from_pretrained(str(model))
    lines = synthetic.read_lines(small_corpus / "qaa_Latn.txt", 40)
    heldout = prepare_format.write(tmp_path / "prepare", {"qaa_Latn": {"heldout": prepare_format.framed_blocks(
        tok, lines, 32)[:2]}}, model, 32)
    synthetic.write_tagging_data(tmp_path / "data" / "pos", world, "pos", "qaa_Latn", ["qab_Cyrl"], sizes=(20, 5, 5))
    code = cli_main(["evaluate", "--model", str(model), "--tasks", task, "--data", str(tmp_path / "data"),
                     f"evaluate.heldout_dir={heldout}", f"run.dir={tmp_path / 'run'}", "tracking.enabled=false"])
    one_line(capsys, "evaluate", code, str(model), "is a causal LM", needle)
    # the tasks are checked against the model's config.json before the stage touches its directory
    assert not (tmp_path / "run" / "evaluate").exists()


def test_factorised_training_is_refused_for_a_causal_lm_and_auto_means_full(init_worlds, tmp_path, one_thread):
    from hyperofa_dist.errors import HyperofaError
    from hyperofa_dist.models.factorised import plan_factorised

    w = init_worlds.fresh_run(init_worlds.causal("llama", "llama3", k=16), tmp_path / "run")
    assert run_init(w, "random") == 0
    model_dir = init_format.model_dir(w.run_dir, "random")
    assert (model_dir.parent / init_format.PRIMITIVES).is_file()  # F_t.npy and P.npy [16, 2D] are written
    assert plan_factorised(model_dir, "auto", "pretrain.embeddings") is None
    with pytest.raises(HyperofaError, match="pretrain.embeddings=factorised .* this is a causal LM"):
        plan_factorised(model_dir, "factorised", "pretrain.embeddings")


def test_mean_for_a_unigram_masked_lm_averages_the_pieces_and_keeps_unknown_ones_random(init_worlds, tmp_path,
                                                                                        capsys):
    w = init_worlds.fresh_run(init_worlds.get("xlmr", k=8), tmp_path / "run")
    assert run_init(w, "mean") == 0
    out = init_format.model_dir(w.run_dir, "mean")
    coordinates = np.load(out.parent / init_format.COORDINATES)
    provenance = np.load(out.parent / init_format.PROVENANCE)
    tok = AutoTokenizer.from_pretrained(str(w.target_tokenizer))
    source_tok = AutoTokenizer.from_pretrained(str(w.source_model))
    model = source_tok.backend_tokenizer.model
    f_s = load_mapping(w.run_dir).source_coordinates
    means = np.flatnonzero(provenance == asm.MEAN)
    randoms = np.flatnonzero(provenance == asm.RANDOM)
    assert len(means) > 100 and len(randoms) > 0  # the Latin-only source has no Cyrillic or Greek letters
    for token_id in means[::50]:
        pieces = [t.id for t in model.tokenize(tok.convert_ids_to_tokens(int(token_id)))]
        assert source_tok.unk_token_id not in pieces
        np.testing.assert_allclose(coordinates[token_id], f_s[pieces].mean(0), atol=1e-6)
    for token_id in randoms[::20]:
        assert source_tok.unk_token_id in [t.id for t in model.tokenize(tok.convert_ids_to_tokens(int(token_id)))]
    assert f"{len(randoms)} new tokens split into the source's unknown token" in capsys.readouterr().err


def test_model_kind_reads_the_head_from_architectures_and_else_the_model_type():
    from hyperofa_dist.errors import HyperofaError
    from hyperofa_dist.formats.models import CAUSAL, MASKED, model_kind

    assert model_kind({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}) == CAUSAL
    assert model_kind({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}) == CAUSAL
    assert model_kind({"architectures": ["RobertaForCausalLM"], "model_type": "roberta"}) == CAUSAL
    assert model_kind({"architectures": ["XLMRobertaForMaskedLM"], "model_type": "xlm-roberta"}) == MASKED
    assert model_kind({"architectures": ["XLMRobertaModel"], "model_type": "xlm-roberta"}) == MASKED  # headless
    assert model_kind({"model_type": "qwen2"}) == CAUSAL
    with pytest.raises(HyperofaError, match="model_type 'vit' .* is neither a masked LM nor a causal LM"):
        model_kind({"architectures": ["ViTModel"], "model_type": "vit"}, "m")


def test_next_token_loss_skips_a_language_without_new_tokens_and_refuses_foreign_ids(init_worlds):
    from hyperofa_dist.errors import HyperofaError
    from hyperofa_dist.models.nexttoken import next_token_loss_per_language

    model = AutoModelForCausalLM.from_pretrained(str(init_worlds.causal("llama", "llama3").source_model)).eval()
    rows = model.get_input_embeddings().num_embeddings
    blocks = {"qaa_Latn": np.arange(3, 35, dtype=np.uint32).reshape(2, 16)}
    scored = np.zeros(rows, dtype=bool)
    out, skipped = next_token_loss_per_language(model, blocks, scored)
    assert out == {} and "no position of its 2 held-out blocks" in skipped["qaa_Latn"]
    scored[[10, 20]] = True  # labels 10 and 20 each follow one position
    out, _ = next_token_loss_per_language(model, blocks, scored, batch_size=1)
    assert out["qaa_Latn"]["positions"] == 2
    with pytest.raises(HyperofaError, match=f"contain token id {rows} but the model has {rows} embedding rows"):
        next_token_loss_per_language(model, {"x": np.array([[1, rows]], dtype=np.uint32)}, np.ones(rows + 1, bool))
