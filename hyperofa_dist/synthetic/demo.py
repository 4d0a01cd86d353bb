"""The demo's own small multilingual world: corpus, evaluation data, and a briefly pretrained source model.

One source language (`qaa_Latn`, which plays English in the evaluation files) and six target languages in
Latin, Cyrillic and Greek script share a concept lexicon, so line i of every corpus file are translations.
The source model is a tiny XLM-R-architecture masked LM with a SentencePiece-style tokenizer trained on the
source language only, pretrained for a few hundred steps on it so that its embeddings carry signal that OFA and
HyperOFA can transfer. Everything is generated from the seed; nothing is downloaded.

With a `CausalWorldSpec` the same world gets a causal source instead: a tiny Llama (untied) or Qwen2 (tied) with a
Llama-3, Llama-2 or Qwen2-style tokenizer, pretrained with the next-token loss.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..formats.files import digest
from ..formats.rundir import MANIFEST, Stage
from . import world as synthetic

log = logging.getLogger("hyperofa.demo")

STAGE = "world"
SOURCE_LANG = "qaa_Latn"
VERSION = 4  # bump when the generated world changes, so old run dirs rebuild it


@dataclass(frozen=True)
class WorldSpec:
    seed: int = 0
    n_concepts: int = 500
    zipf_exponent: float = 0.8
    topics: int = 25
    source_sentences: int = 6000
    target_sentences: int = 3000
    size_ratio: float = 0.75
    retrieval_pairs: int = 200
    source_vocab: int = 1000
    hidden_size: int = 64
    num_layers: int = 2
    pretrain_steps: int = 200
    block_size: int = 64


@dataclass(frozen=True)
class CausalWorldSpec(WorldSpec):
    """The world with a causal source model: `family` llama (untied) or qwen2 (tied, needs tokenizer qwen2),
    `tokenizer` llama3, llama2 or qwen2."""

    family: str = "llama"
    tokenizer: str = "llama3"
    source_vocab: int = 800


@dataclass(frozen=True)
class WorldPaths:
    root: Path

    @property
    def corpus(self) -> Path:
        return self.root / "corpus"

    @property
    def eval_data(self) -> Path:
        return self.root / "eval"

    @property
    def source_model(self) -> Path:
        return self.root / "source_model"


def languages() -> list[synthetic.Language]:
    return synthetic.default_languages(7)


def build_world(run_dir: Path, spec: WorldSpec, tracker=None) -> WorldPaths:
    """Create (or find up to date) `<run_dir>/world/`: corpus/, eval/srt/, source_model/."""
    stage = Stage(run_dir, STAGE)
    paths = WorldPaths(stage.path)
    inputs = {"spec": spec.__dict__, "version": VERSION}
    if stage.is_complete(digest(inputs)):
        log.info("world: %s is up to date", stage.path)
        return paths
    stage.begin(digest(inputs))
    langs = languages()
    world = synthetic.World(langs, n_concepts=spec.n_concepts, seed=spec.seed, zipf_exponent=spec.zipf_exponent,
                            topics=spec.topics)
    targets = [lang.code for lang in langs if lang.code != SOURCE_LANG]
    sizes = {SOURCE_LANG: spec.source_sentences}
    sizes.update({code: max(200, int(spec.target_sentences * spec.size_ratio**i)) for i, code in enumerate(targets)})
    synthetic.write_corpus(paths.corpus, world, sizes, seed=spec.seed)
    synthetic.write_retrieval_data(
        paths.eval_data / "srt", world, SOURCE_LANG, targets, spec.retrieval_pairs, seed=spec.seed + 1
    )
    source_texts = synthetic.read_lines(paths.corpus / f"{SOURCE_LANG}.txt")
    causal = isinstance(spec, CausalWorldSpec)
    family = spec.tokenizer if causal else "xlmr"
    tok_dir = synthetic.train_source_tokenizer(family, source_texts, spec.source_vocab, stage.path / "source_tokenizer")
    started = time.perf_counter()
    loss_first, loss_last = pretrain_source_model(tok_dir, source_texts, paths.source_model, spec)
    log.info("world: source model pretrained %d steps in %.1fs (%s loss %.3f -> %.3f)", spec.pretrain_steps,
             time.perf_counter() - started, "next-token" if causal else "MLM", loss_first, loss_last)
    outputs = [p.relative_to(stage.path) for p in sorted(stage.path.rglob("*")) if p.is_file() and p.name != MANIFEST]
    stage.write_manifest(
        config={"world": spec.__dict__},
        inputs=inputs,
        outputs=outputs,
        counts={"sentences": sizes, f"source_{'causal' if causal else 'mlm'}_loss_first": round(loss_first, 4),
                f"source_{'causal' if causal else 'mlm'}_loss_last": round(loss_last, 4)},
    )
    return paths


def pretrain_source_model(tokenizer_dir: Path, texts: list[str], out_dir: Path, spec: WorldSpec) -> tuple[float, float]:
    """A few hundred steps on the source language, seeded, one thread: the same weights on every run. The family is
    XLM-R, or the `CausalWorldSpec`'s; its kind picks the objective: masked (MLM on the tokenized sentences) or
    causal (next-token loss on sentences packed into blocks, each closed by EOS)."""
    import torch
    import transformers

    from ..formats.models import AUTO_CLASS, CAUSAL
    from ..models import family_named
    from ..models.mlm import mask_tokens, masked_lm_loss

    family = family_named(spec.family if isinstance(spec, CausalWorldSpec) else "xlmr")
    causal = family.kind == CAUSAL
    init_dir = out_dir.parent / "source_model_init"
    synthetic.make_tiny_model(
        family.name, tokenizer_dir, init_dir, hidden_size=spec.hidden_size, num_layers=spec.num_layers,
        num_heads=2, seed=spec.seed, max_position=spec.block_size + family.position_offset,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(spec.seed)
        tok = transformers.AutoTokenizer.from_pretrained(init_dir)
        model = getattr(transformers, AUTO_CLASS[family.kind]).from_pretrained(init_dir)
        closing = [tok.eos_token_id] if causal else []
        ids = np.concatenate([np.asarray(x + closing, dtype=np.int64) for x in tok(texts)["input_ids"]])
        n_blocks = len(ids) // spec.block_size
        blocks = torch.from_numpy(ids[: n_blocks * spec.block_size].reshape(n_blocks, spec.block_size))
        special = torch.tensor(tok.all_special_ids)
        gen = torch.Generator().manual_seed(spec.seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
        model.train()
        losses = []
        for _ in range(spec.pretrain_steps):
            batch = blocks[torch.randint(n_blocks, (32,), generator=gen)]
            if causal:
                loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            else:
                inputs, labels = mask_tokens(batch, special, tok.mask_token_id, len(tok), gen)
                loss, _ = masked_lm_loss(model, inputs, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        model.eval()
        model.save_pretrained(out_dir)
        if causal:
            for name in ("tokenizer.json", "tokenizer_config.json"):  # as written (save_pretrained renames the class)
                shutil.copyfile(init_dir / name, out_dir / name)
        else:
            tok.save_pretrained(out_dir)
    finally:
        torch.set_num_threads(threads)
    return float(np.mean(losses[:10])), float(np.mean(losses[-10:]))
