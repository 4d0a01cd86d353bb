"""`hyperofa vectors train`: the `vectors` stage, SID-SGNS vectors of the corpus into `<run.dir>/vectors/`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import HyperofaError
from ..formats.files import sha256_file
from ..formats.rundir import Stage
from ..formats.text import parallel_corpus
from ..formats.vectors import STAGE, save_word_vectors, trained_vectors_path
from ..runtime.stage import StageShell
from .train import corpus_languages, train_vectors



def run(config: Config, tracker: Any) -> int:
    settings = config.vectors.train
    corpus_dir = Path(settings.corpus or config.corpus.path or "")
    if not (settings.corpus or config.corpus.path):
        raise HyperofaError("vectors train: set vectors.train.corpus (or corpus.path) to a parallel corpus directory")
    files = corpus_languages(corpus_dir)
    lines = parallel_corpus(files, settings.prefix_aligned)
    inputs = {
        "corpus": {iso + ":" + path.name: sha256_file(path) for iso, path in files},
        "config": config.fingerprint("vectors.train", "run.seed"),
    }
    with StageShell.open(config, tracker, STAGE, Stage(config.run_dir, STAGE), inputs) as shell:
        if shell.up_to_date:
            return 0
        shell.begin()
        started = time.perf_counter()
        kv = train_vectors(
            corpus_dir,
            dim=settings.dim,
            epochs=settings.epochs,
            min_count=settings.min_count,
            negative=settings.negative,
            workers=settings.workers,
            seed=config.run.seed,
            alpha=settings.alpha,
            sample=settings.sample,
            lowercase=settings.lowercase,
        )
        path = trained_vectors_path(config.run_dir)
        written = save_word_vectors(path, list(kv.index_to_key), kv.vectors)
        per_lang: dict[str, int] = {}
        for word in kv.index_to_key:
            per_lang[word[:3]] = per_lang.get(word[:3], 0) + 1
        counts = {"words": len(kv.index_to_key), "dim": int(kv.vector_size), "languages": len(per_lang),
                  "lines": max(lines.values())}
        shell.run.log_metrics(
            {"train_s": time.perf_counter() - started, **counts} | {f"words.{k}": v for k, v in per_lang.items()}
        )
        shell.finish(
            outputs=[p.name for p in written],
            counts=counts | {"words_per_language": dict(sorted(per_lang.items())), "lines_per_file": lines},
        )
        shell.say(f"{counts['words']} words in {counts['languages']} languages -> {path}")
    return 0
