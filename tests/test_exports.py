"""Exported model folders any user can load: a tokenizer_config.json naming the stock `PreTrainedTokenizerFast` with
no machine-local keys, loaded by transformers 5.x (the project's) and 4.57 (the last 4.x, installed once into the
pytest cache next to the project's torch), and a model card with the run's real values."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hyperofa_dist import synthetic
from hyperofa_dist.cli import main
from hyperofa_dist.formats.rundir import Stage
from hyperofa_dist.formats.tokenizer import MACHINE_LOCAL_KEYS, load_tokenizer, save_tokenizer

# transformers 4.57 wants huggingface_hub < 1.0 and tokenizers <= 0.23.0; everything else it imports (torch,
# safetensors, numpy, regex, requests, ...) the project's venv already has.
TRANSFORMERS_4 = ("transformers==4.57.*", "huggingface_hub>=0.34,<1.0", "tokenizers>=0.22,<=0.23.0")

LOAD = r"""
import json, sys
import numpy as np, torch, transformers
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

texts_file, out, *folders = sys.argv[1:]
texts = json.loads(open(texts_file, encoding="utf-8").read())
report, arrays = [], {}
for n, (model_dir, kind) in enumerate(zip(folders[::2], folders[1::2])):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = (AutoModelForMaskedLM if kind == "masked" else AutoModelForCausalLM).from_pretrained(model_dir).eval()
    ids = [tokenizer(t)["input_ids"] for t in texts]
    with torch.no_grad():
        arrays.update({f"{n}_{i}": model(input_ids=torch.tensor([row])).logits[0].numpy() for i, row in enumerate(ids)})
    report.append({"tokenizer": type(tokenizer).__name__, "model": type(model).__name__, "ids": ids})
np.savez(out, **arrays)
print(json.dumps({"version": transformers.__version__, "models": report}))
"""


@pytest.fixture(scope="session")
def transformers_4(request, tmp_path_factory) -> Path:
    """A folder holding transformers 4.57 and the hub and tokenizers versions it accepts (`pip install --target`,
    no dependencies), made once per checkout in the pytest cache; put first on PYTHONPATH it shadows the venv's."""
    cache = getattr(request.config, "cache", None)  # absent under `-p no:cacheprovider`: install per session
    root = Path(cache.mkdir("transformers-4.57")) if cache is not None else tmp_path_factory.mktemp("transformers-4.57")
    site = root / "site"
    if not (site / "transformers" / "__init__.py").is_file():
        tmp = root / f"site.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        out = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                              "--no-deps", "--target", str(tmp), *TRANSFORMERS_4],
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, f"pip could not install {TRANSFORMERS_4} (PyPI needed): {out.stderr[-1500:]}"
        shutil.rmtree(site, ignore_errors=True)
        os.replace(tmp, site)
    return site


def test_saved_tokenizers_name_the_stock_class_and_no_machine_local_keys(source_tokenizers, causal_tokenizers,
                                                                       small_corpus, tmp_path):
    """Every family the project reads (XLM-R, RoBERTa, BERT; Llama 3, Llama 2, Qwen2 tokenizers), saved by the one
    writer, loads back with stock AutoTokenizer as the same tokenizer."""
    texts = synthetic.read_lines(small_corpus / "qad_Grek.txt", limit=20)
    for family, folder in {**source_tokenizers, **causal_tokenizers}.items():
        tokenizer = load_tokenizer(folder)
        save_tokenizer(tokenizer, tmp_path / family)
        config = json.loads((tmp_path / family / "tokenizer_config.json").read_text())
        assert config["tokenizer_class"] == "PreTrainedTokenizerFast", family
        assert not set(MACHINE_LOCAL_KEYS) & set(config) and not isinstance(config.get("extra_special_tokens"), list)
        again = load_tokenizer(tmp_path / family)
        assert again(texts)["input_ids"] == tokenizer(texts)["input_ids"], family
        assert again.all_special_tokens == tokenizer.all_special_tokens, family


def card_rows(model_dir: Path) -> dict[str, str]:
    """The model card's table, {row name: cell}; the front matter's keys as `front:<key>`."""
    text = (model_dir / "README.md").read_text(encoding="utf-8")
    _, front, body = text.split("---\n", 2)
    rows = {f"front:{line.split(':')[0]}": line.split(":", 1)[1].strip() for line in front.splitlines()
            if line and not line.startswith(("-", "#"))}
    for line in body.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 2 and cells[0]:
            rows[cells[0]] = rows[cells[0]] + "; " + cells[1] if cells[0] in rows else cells[1]
    rows["text"] = text
    return rows


def check_card(model_dir: Path, *, method: str, stage: str, steps: int, kind: str, source_vocab, target_vocab: int,
               metric: str, values: dict[str, float]) -> None:
    """The card of an exported model names what item 3 of issue 21 asks for, with these values."""
    rows = card_rows(model_dir)
    assert rows["Method"].startswith(f"`{method}`") and rows["Stage"] == stage
    assert rows["Training steps"] == str(steps)
    assert rows["Source tokenizer"] == f"{source_vocab} tokens"
    assert rows["Target tokenizer"].startswith(f"{target_vocab} tokens")
    assert rows["Languages"] and rows["Data"].startswith("corpus: ")
    assert rows["front:pipeline_tag"] == ('"fill-mask"' if kind == "masked" else '"text-generation"')
    assert rows["front:license"].startswith("null") and "Left for the publisher to fill in" in rows["text"]
    auto = "AutoModelForMaskedLM" if kind == "masked" else "AutoModelForCausalLM"
    assert f"{auto}.from_pretrained" in rows["text"]
    header = next(line for line in rows["text"].splitlines() if line.startswith("| language |"))
    assert metric in header
    for lang, value in values.items():
        assert f"| {lang} | {value:.4f} |" in rows["text"], (lang, value)


@pytest.mark.slow
def test_exports_load_with_stock_classes_under_transformers_4_57_and_5(init_worlds, transformers_4, small_corpus,
                                                                      prepare_format, tmp_path, one_thread):
    """A masked (XLM-R) and a causal (Llama with a Llama 3 tokenizer) model exported by init: stock AutoTokenizer and
    AutoModelFor* under transformers 4.57 in a subprocess give the project's token ids and the model's logits."""
    import torch
    from transformers import AutoTokenizer

    from hyperofa_dist.formats.models import AUTO_CLASS, load_model

    texts = [line for lang in ("qaa_Latn", "qad_Grek", "qaf_Cyrl")
             for line in synthetic.read_lines(small_corpus / f"{lang}.txt", limit=3)]
    (tmp_path / "texts.json").write_text(json.dumps(texts, ensure_ascii=False), encoding="utf-8")
    masked = init_worlds.fresh_run(init_worlds.get("xlmr", k=8), tmp_path / "masked")
    causal = init_worlds.fresh_run(init_worlds.causal("llama", "llama3"), tmp_path / "causal")
    langs = ("qac_Latn", "qad_Grek")
    target = load_tokenizer(masked.target_tokenizer)
    blocks = {lang: {"heldout": prepare_format.framed_blocks(
        target, synthetic.read_lines(small_corpus / f"{lang}.txt", 80), 32)[:6]} for lang in langs}
    prepare_format.write(masked.run_dir / "prepare", blocks, masked.target_tokenizer, 32)
    corpus = [f"corpus.path={small_corpus}", f"corpus.languages=[{','.join(langs)}]"]
    assert main(["init", *masked.overrides("init.method=ofa", "init.heldout_blocks=5", *corpus)]) == 0
    assert main(["init", *causal.overrides("init.method=random", *corpus)]) == 0

    env = {**os.environ, "PYTHONPATH": str(transformers_4), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    exported = [(masked, "ofa", "masked"), (causal, "random", "causal")]
    folders = [str(part) for w, method, kind in exported for part in (w.run_dir / "init" / method / "model", kind)]
    out = subprocess.run([sys.executable, "-c", LOAD, str(tmp_path / "texts.json"), str(tmp_path / "logits.npz"),
                          *folders], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded["version"].startswith("4.57.")
    logits4 = dict(np.load(tmp_path / "logits.npz"))
    for n, (w, method, kind) in enumerate(exported):
        model_dir = w.run_dir / "init" / method / "model"
        config = json.loads((model_dir / "tokenizer_config.json").read_text())
        assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and not set(MACHINE_LOCAL_KEYS) & set(config)
        ours = load_tokenizer(model_dir)
        ids = [ours(t)["input_ids"] for t in texts]
        assert [AutoTokenizer.from_pretrained(str(model_dir))(t)["input_ids"] for t in texts] == ids  # stock 5.x
        model = load_model(model_dir, AUTO_CLASS[kind])
        assert loaded["models"][n] == {"tokenizer": "PreTrainedTokenizerFast", "model": type(model).__name__,
                                       "ids": ids}
        with torch.no_grad():
            for i, row in enumerate(ids):
                expected = model(input_ids=torch.tensor([row])).logits[0].numpy()
                np.testing.assert_allclose(logits4[f"{n}_{i}"], expected, atol=1e-4)

        manifest = Stage(w.run_dir, f"init/{method}").require()
        loss = manifest.get("new_token_mlm_loss") or manifest.get("new_token_causal_loss") or {}
        check_card(model_dir, method=method, stage="init", steps=0, kind=kind, source_vocab=manifest["counts"]["V_s"],
                   target_vocab=len(ours), metric="loss, step 0", values=loss)
        if kind == "masked":
            assert loss and set(loss) == {*langs, "average"}  # real held-out values, not an empty table
            assert card_rows(model_dir)["Languages"] == f"2: {', '.join(langs)}"
