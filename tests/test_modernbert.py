"""ModernBERT as a masked family (models/modernbert.py): both config shapes are read, and a tiny generated
ModernBERT (BERT-style WordPiece tokenizer trained on generated text) runs init with random, OFA and HyperOFA,
continued pretraining (DeepSpeed, factorised) and evaluation. tests/test_models.py holds it, like every masked
family, to its record (names, head, objective, factorised form, headless checkpoint, expansion)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from hyperofa_dist import synthetic
from hyperofa_dist.cli import main as cli_main
from hyperofa_dist.models import masked_family, position_offset, sep_token_extra


def _config(**keys):
    from transformers import ModernBertConfig

    sizes = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2)
    return ModernBertConfig(**sizes, **keys)


def test_both_config_shapes_are_read_and_their_special_ids_follow_their_tokens():
    """The English checkpoints' shape (cls/sep/bos/eos ids, BERT-style) and a multilingual one (Gemma-style
    bos/eos ids only, the older rotary keys): one family; every id key present moves with its token, and the
    attention pattern and rotary settings stay the source's."""
    english = _config(pad_token_id=0, cls_token_id=2, sep_token_id=3, bos_token_id=2, eos_token_id=3)
    multilingual = _config(pad_token_id=0, bos_token_id=2, eos_token_id=1, cls_token_id=None, sep_token_id=None,
                           global_rope_theta=160000.0, local_rope_theta=160000.0, global_attn_every_n_layers=3)
    id_map = {0: 10, 1: 11, 2: 12, 3: 13}
    for config, moved in ((english, {"cls_token_id": 12, "sep_token_id": 13, "bos_token_id": 12, "eos_token_id": 13}),
                          (multilingual, {"cls_token_id": None, "sep_token_id": None, "bos_token_id": 12,
                                          "eos_token_id": 11})):
        family = masked_family(config)
        assert family.name == "modernbert" and family is masked_family(config.to_dict())
        assert position_offset(config) == position_offset(config.to_dict()) == 0
        assert not sep_token_extra(config.model_type)
        expanded = copy.deepcopy(config)
        expanded.pad_token_id = 10  # the export sets the pad id itself
        assert family.expand_config(expanded, config, None, id_map) == 0
        assert {key: getattr(expanded, key) for key in moved} == moved
        assert expanded.layer_types == config.layer_types and expanded.rope_parameters == config.rope_parameters
    assert multilingual.rope_parameters["sliding_attention"]["rope_theta"] == 160000.0


@pytest.mark.slow
def test_a_tiny_modernbert_runs_init_pretrain_and_evaluate(init_worlds, prepare_format, small_corpus, world,
                                                           tmp_path, one_thread):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from hyperofa_dist.formats import init as init_format
    from hyperofa_dist.formats import pretrain as pretrain_format

    w = init_worlds.fresh_run(init_worlds.get("modernbert", k=8, tokenizer="bert"), tmp_path / "run")
    tok = AutoTokenizer.from_pretrained(str(w.target_tokenizer))
    langs = ("qaa_Latn", "qac_Latn", "qad_Grek")
    blocks = {}
    for lang in langs:
        part = prepare_format.framed_blocks(tok, synthetic.read_lines(small_corpus / f"{lang}.txt", 200), 32)
        blocks[lang] = {"heldout": part[:4], "train": part[4:]}
    prepare_format.write(w.run_dir / "prepare", blocks, w.target_tokenizer, 32)
    assert init_worlds.hyperofa_predictions(w.run_dir) > 50

    for method in ("random", "ofa", "hyperofa"):
        assert cli_main(["init", *w.overrides(f"init.method={method}", "init.heldout_blocks=4")]) == 0, method
        out = init_format.model_dir(w.run_dir, method)
        model = AutoModelForMaskedLM.from_pretrained(str(out))
        assert type(model).__name__ == "ModernBertForMaskedLM" and model.config.vocab_size == len(tok)
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
        loss = json.loads((out.parent / init_format.QUALITY).read_text())["new_token_mlm"]["loss"]
        # the source language's masked positions hold no new token: only the target languages are scored
        assert set(loss) == {"qac_Latn", "qad_Grek", "average"} and all(np.isfinite(v) for v in loss.values())

    # F_t P beside the model with k = 8 < 32: pretraining trains the factorised tok_embeddings and exports full rank
    assert cli_main(["pretrain", *w.overrides(
        "pretrain.method=hyperofa", "pretrain.steps=2", "pretrain.micro_batch_size=4", "pretrain.warmup_steps=0",
        "pretrain.eval_blocks=4", "pretrain.log_every=1", "pretrain.save_every=2", "pretrain.eval_every=2",
        "pretrain.ranks_per_node=1",
    )]) == 0
    trained_dir = pretrain_format.model_dir(w.run_dir, "hyperofa")
    log = [json.loads(line) for line in (trained_dir.parent / pretrain_format.TRAIN_LOG).read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2] and all(np.isfinite(row["loss"]) for row in log)
    trained = AutoModelForMaskedLM.from_pretrained(str(trained_dir))
    before = AutoModelForMaskedLM.from_pretrained(str(init_format.model_dir(w.run_dir, "hyperofa")))
    assert not torch.equal(trained.get_input_embeddings().weight, before.get_input_embeddings().weight)

    data = tmp_path / "data"
    synthetic.write_retrieval_data(data / "srt", world, "qaa_Latn", ["qac_Latn", "qad_Grek"], n=30)
    synthetic.write_tagging_data(data / "ner", world, "ner", "qaa_Latn", ["qac_Latn"], sizes=(30, 10, 10))
    output = tmp_path / "results.json"
    assert cli_main(["evaluate", "--model", "pretrain/hyperofa", "--data", str(data), "--tasks", "srt,ner,mlm",
                     "--output", str(output), f"run.dir={w.run_dir}", "tracking.enabled=false", "evaluate.layer=-1",
                     "evaluate.tagging.epochs=1", "evaluate.tagging.max_length=64", "evaluate.mlm_blocks=4"]) == 0
    results = json.loads(output.read_text())
    assert sorted(results["srt"]) == ["average", "qac_Latn", "qad_Grek"]
    assert sorted(results["mlm"]) == ["average", *langs]
    assert sorted(results["ner"]) == ["average", "eng_Latn", "qac_Latn"]
    assert all(np.isfinite(value) for langs_ in results.values() for metrics in langs_.values()
               for value in metrics.values())
