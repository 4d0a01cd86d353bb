"""Stand-ins for the real inputs a packaged config names (configs/*.yaml), generated, small, and laid out as the
real ones are published.

`build_standins(root, config, family, layout=...)` writes, for the config's languages and settings:
- `corpus/`: Glot500-c as published (`synthetic/glot500.py`), one folder per language under Glot500-c's own name
  (`jpn_Japn`): `layout="arrow"` the main branch saved to disk, `layout="parquet"` the hub's parquet conversion
  (English as `partial-train`, as the converter publishes its largest languages); a few languages also get `dev`
  and `test`; rows carry extra columns beside `text`. `layout="dir"`: one `<lang_Script>.txt` per language
  (line-aligned), the demo configs' own layout. A script the generator has no alphabet for is written in Latin
  letters: the checks read codes and text, not scripts;
- `source_model/`: a tiny model of the source's family whose hidden size fits `mapping.num_primitives` and whose
  layers reach `evaluate.layer`;
- `target_tokenizer/` (when the config sets `tokenizer.path`): a SentencePiece-only folder as `cis-lmu/glot500-base`
  publishes its tokenizer (`sentencepiece.bpe.model`, `tokenizer_config.json`, `special_tokens_map.json`, no
  `tokenizer.json`), learned from every language, so it shares most of the source's pieces;
- `vectors.wv`: gensim KeyedVectors of `iso:word` keys, the kind of file ColexNet+ ships;
- `eval/`: `srt/`, `srb/` (retrieval pairs) and `pos/`, `ner/` (tagging files) for a few languages.
It returns the `key=value` overrides that point the config at them (paths, and the local corpus format).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..langcodes import glot500_name
from .glot500 import glot500_standin, standin_texts
from .sentencepiece import train_sentencepiece_folder
from .world import ALPHABETS, Language, World, make_tiny_model, train_source_tokenizer
from .world import write_corpus, write_retrieval_data, write_tagging_data

SOURCE_TOKENIZER = {"xlmr": "xlmr", "roberta": "roberta", "bert": "bert", "llama": "llama3"}
ENGLISH = "eng_Latn"
LAYOUTS = ("dir", "arrow", "parquet")


def languages_of(config: Any) -> list[Language]:
    codes = config.corpus.languages or [ENGLISH, *(config.evaluate.languages or ["deu_Latn", "rus_Cyrl", "ell_Grek"])]
    return [Language(code, code.split("_")[1] if code.split("_")[1] in ALPHABETS else "Latn") for code in codes]


def layout_of(config: Any) -> str:
    """The layout the config reads: `dir`, or for Glot500-c the parquet conversion when its revision names it (the
    packaged configs' `refs/convert/parquet`), else the main branch's Arrow files."""
    if config.corpus.format == "dir":
        return "dir"
    return "parquet" if "parquet" in (config.corpus.revision or "") else "arrow"


def _write_corpus(root: Path, world: World, codes: list[str], english: str, lines: int, seed: int,
                  layout: str, split: str) -> dict[str, list[str]]:
    """The corpus in `layout`; returns each language's training sentences."""
    if layout == "dir":
        paths = write_corpus(root, world, {code: lines for code in codes}, seed=seed)
        return {code: path.read_text(encoding="utf-8").splitlines() for code, path in paths.items()}
    texts = standin_texts(world, {code: lines for code in codes}, seed=seed, heldout=max(10, lines // 10),
                          heldout_languages=codes[:3])
    if split != "train":  # a config reading another split finds its text there
        for splits in texts.values():
            splits[split] = splits.pop("train")
    glot500_standin(root, {glot500_name(code): splits for code, splits in texts.items()}, layout=layout,
                    files_per_split=2, rows_per_group=max(1, lines // 4),
                    partial_train=[glot500_name(english)] if layout == "parquet" and split == "train" else ())
    return {code: splits[split] for code, splits in texts.items()}


def build_standins(root: Path, config: Any, family: str, *, layout: Optional[str] = None, lines: int = 120,
                   seed: int = 0) -> list[str]:
    """Generate the stand-ins under `root` and return the overrides that point `config` at them."""
    root = Path(root)
    layout = layout or layout_of(config)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}")
    langs = languages_of(config)
    codes = [lang.code for lang in langs]
    english = ENGLISH if ENGLISH in codes else codes[0]
    world = World(langs, n_concepts=300, seed=seed)
    texts = _write_corpus(root / "corpus", world, codes, english, lines, seed, layout, config.corpus.split)

    source_tok = train_source_tokenizer(SOURCE_TOKENIZER[family], texts[english], 400, root / "source_tokenizer")
    hidden = max(64, config.mapping.num_primitives)  # k must not exceed the source's hidden size
    heads = 4 if hidden % 4 == 0 else 1
    layers = max(1, config.evaluate.layer)  # retrieval reads the output of evaluate.layer: the model must have it
    model = make_tiny_model(family, source_tok, root / "source_model", hidden_size=hidden, num_layers=layers,
                            num_heads=heads, seed=seed, max_position=max(130, config.prepare.block_size))
    overrides = [f"source.model={model}", f"corpus.path={root / 'corpus'}",
                 f"corpus.format={'dir' if layout == 'dir' else 'glot500_local'}", f"run.dir={root / 'run'}"]

    if config.tokenizer.path is not None:
        target = train_sentencepiece_folder([line for code in codes for line in texts[code]],
                                            root / "target_tokenizer", "unigram", vocab_size=1200, family="xlmr")
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
