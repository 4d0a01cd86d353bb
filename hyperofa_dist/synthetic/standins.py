"""Stand-ins for the real inputs a packaged config names (configs/*-glot500.yaml), generated and small.

`build_standins(root, config, family)` writes, for the config's languages and settings:
- `corpus/`: one `<lang_Script>.txt` per language of `corpus.languages` (line-aligned; a script the generator
  has no alphabet for is written in Latin letters: the checks read codes and text, not scripts);
- `source_model/`: a tiny model of the source's family whose hidden size fits `mapping.num_primitives`;
- `target_tokenizer/` (when the config sets `tokenizer.path`): a tokenizer of the Glot500 tokenizer's kind
  (XLM-R Unigram) learned from every language, so it shares most of the source's pieces;
- `vectors.wv`: gensim KeyedVectors of `iso:word` keys, the kind of file ColexNet+ ships;
- `eval/`: `srt/`, `srb/` (retrieval pairs) and `pos/`, `ner/` (tagging files) for a few languages.
It returns the `key=value` overrides that point the config at them (paths only, and `corpus.format=dir`).

The corpus is the `.txt` layout; builders of the published Glot500-c layouts can replace `_write_corpus` alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .world import ALPHABETS, Language, World, make_tiny_model, read_lines, train_source_tokenizer
from .world import write_corpus, write_retrieval_data, write_tagging_data

SOURCE_TOKENIZER = {"xlmr": "xlmr", "roberta": "roberta", "bert": "bert", "llama": "llama3"}
ENGLISH = "eng_Latn"


def languages_of(config: Any) -> list[Language]:
    codes = config.corpus.languages or [ENGLISH, *(config.evaluate.languages or ["deu_Latn", "rus_Cyrl", "ell_Grek"])]
    return [Language(code, code.split("_")[1] if code.split("_")[1] in ALPHABETS else "Latn") for code in codes]


def _write_corpus(root: Path, world: World, codes: list[str], lines: int, seed: int) -> Path:
    write_corpus(root, world, {code: lines for code in codes}, seed=seed)
    return root


def build_standins(root: Path, config: Any, family: str, *, lines: int = 120, seed: int = 0) -> list[str]:
    """Generate the stand-ins under `root` and return the overrides that point `config` at them."""
    root = Path(root)
    langs = languages_of(config)
    codes = [lang.code for lang in langs]
    english = ENGLISH if ENGLISH in codes else codes[0]
    world = World(langs, n_concepts=300, seed=seed)
    corpus = _write_corpus(root / "corpus", world, codes, lines, seed)

    source_tok = train_source_tokenizer(SOURCE_TOKENIZER[family], read_lines(corpus / f"{english}.txt"), 400,
                                        root / "source_tokenizer")
    hidden = max(64, config.mapping.num_primitives)  # k must not exceed the source's hidden size
    heads = 4 if hidden % 4 == 0 else 1
    model = make_tiny_model(family, source_tok, root / "source_model", hidden_size=hidden, num_layers=1,
                            num_heads=heads, seed=seed, max_position=max(130, config.prepare.block_size))
    overrides = [f"source.model={model}", f"corpus.path={corpus}", "corpus.format=dir", f"run.dir={root / 'run'}"]

    if config.tokenizer.path is not None:
        texts = [line for code in codes for line in read_lines(corpus / f"{code}.txt")]
        target = train_source_tokenizer("xlmr", texts, 1200, root / "target_tokenizer")
        overrides.append(f"tokenizer.path={target}")
    if config.vectors.path is not None:
        overrides.append(f"vectors.path={write_vectors(root / 'vectors.wv', world, codes, seed)}")

    eval_dir = root / "eval"
    others = [c for c in codes if c != english][:3]
    for task in ("srt", "srb"):
        write_retrieval_data(eval_dir / task, world, english, others, 40, seed=seed + 1)
    for task in ("pos", "ner"):
        write_tagging_data(eval_dir / task, world, task, english, others, sizes=(40, 10, 10), seed=seed,
                           english=english)
    overrides.append(f"evaluate.data_dir={eval_dir}")
    return overrides


def write_vectors(path: Path, world: World, codes: list[str], seed: int, dim: int = 16) -> Path:
    """`iso:word` vectors for every language's words (random, seeded): a file of ColexNet+'s kind (gensim)."""
    from gensim.models import KeyedVectors

    keys = sorted({f"{code.split('_')[0]}:{word}" for code in codes for word in world.lexicon[code][:200]})
    kv = KeyedVectors(dim)
    kv.add_vectors(keys, np.random.default_rng(seed).standard_normal((len(keys), dim)).astype(np.float32))
    kv.save(str(path))
    return path
