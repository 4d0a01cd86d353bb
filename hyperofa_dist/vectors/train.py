"""Cross-lingual word vectors from a parallel corpus: SID-SGNS (Levy, Søgaard and Goldberg 2017) with gensim.

Line i of every language file are translations. Every word is trained to predict the id of each sentence it
occurs in, in whatever language, so translations, which share their sentence ids, land next to each other. The
result is gensim `KeyedVectors` with `iso:word` keys, the ColexNet+ key convention the mapping stage parses.
"""

from __future__ import annotations

import contextlib
import gzip
import re
import sys
import time
from pathlib import Path
from typing import IO, Any, Iterator, Optional

from ..errors import HyperofaError

CORPUS_FILE = re.compile(r"^(?P<iso>[a-z]{3})(?:_[A-Z][a-z]{3})?\.txt(?:\.gz)?$")
WORD = re.compile(r"\w+(?:['’-]\w+)*")


def corpus_languages(root: str | Path) -> list[tuple[str, Path]]:
    """(iso, file) of every `<iso>[_Script].txt[.gz]` in a parallel corpus directory, sorted by file name."""
    root = Path(root)
    if not root.is_dir():
        raise HyperofaError(f"{root}: parallel corpus directory not found (config key vectors.train.corpus)")
    found = []
    for path in sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")):
        match = CORPUS_FILE.match(path.name)
        if match is None:
            raise HyperofaError(
                f"{path}: not a parallel-corpus file name; expected <iso>.txt or <iso>_<Script>.txt[.gz] with a "
                "3-letter ISO 639-3 code (the vector keys are iso:word)"
            )
        found.append((match.group("iso"), path))
    if len(found) < 2:
        raise HyperofaError(f"{root}: a parallel corpus needs at least 2 language files, found {len(found)}")
    return found


def tokenize_line(line: str, lowercase: bool) -> list[str]:
    return WORD.findall(line.lower() if lowercase else line)


def _open_text(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, "rt", encoding="utf-8", errors="replace")


class SentenceIdCorpus:
    """Restartable stream of gensim sentences `[#i, w1, #i, w2, ...]`: with window 1 each word's only context is
    the id of its sentence, and line i of every language shares id #i. Reads the files in step, never whole."""

    def __init__(self, files: list[tuple[str, Path]], lowercase: bool = True):
        self.files = files
        self.lowercase = lowercase

    def __iter__(self) -> Iterator[list[str]]:
        with contextlib.ExitStack() as stack:
            handles = [(iso, stack.enter_context(_open_text(path))) for iso, path in self.files]
            line_no = 0
            while handles:
                sid = f"#{line_no}"  # no `iso:` prefix, so it can never be mistaken for a word key
                alive = []
                for iso, handle in handles:
                    line = handle.readline()
                    if not line:
                        continue  # vectors.train.prefix_aligned: a shorter file stops contributing
                    alive.append((iso, handle))
                    words = tokenize_line(line, self.lowercase)
                    if words:
                        sentence = []
                        for word in words:
                            sentence += (sid, f"{iso}:{word}")
                        sentence.append(sid)
                        yield sentence
                handles = alive
                line_no += 1


def epoch_progress(epochs: int, file: IO[str]) -> Any:
    """A gensim callback that drives a tqdm bar: one step per epoch, the epoch's words/s beside it.

    gensim logs its own progress at INFO only; a corpus of hundreds of languages trains for many minutes, and
    without this a run said nothing until it ended. Words are the corpus tokens gensim reads per epoch
    (`corpus_total_words`, sentence ids included)."""
    from gensim.models.callbacks import CallbackAny2Vec
    from tqdm import tqdm

    class EpochProgress(CallbackAny2Vec):
        def __init__(self) -> None:
            self.bar: Optional[Any] = None
            self.started = 0.0

        def on_train_begin(self, model: Any) -> None:
            self.bar = tqdm(total=epochs, desc="vectors train", unit="epoch", file=file, mininterval=0.0)

        def on_epoch_begin(self, model: Any) -> None:
            self.started = time.perf_counter()

        def on_epoch_end(self, model: Any) -> None:
            seconds = max(time.perf_counter() - self.started, 1e-9)
            self.bar.set_postfix_str(f"{model.corpus_total_words / seconds:,.0f} words/s", refresh=False)
            self.bar.update(1)

        def on_train_end(self, model: Any) -> None:
            self.bar.close()

    return EpochProgress()


def train_vectors(
    corpus_dir: str | Path,
    *,
    dim: int,
    epochs: int,
    min_count: int,
    negative: int,
    workers: int,
    seed: int,
    alpha: float = 0.1,
    sample: float = 0.0,
    lowercase: bool = True,
    progress: bool = True,
):
    """Train SID-SGNS vectors; returns gensim KeyedVectors holding only `iso:word` keys (frequency order).

    `progress`: an epoch bar on stderr; it never changes the vectors."""
    from gensim.models import Word2Vec

    files = corpus_languages(corpus_dir)
    corpus = SentenceIdCorpus(files, lowercase)
    model = Word2Vec(
        vector_size=dim,
        window=1,
        min_count=min_count,
        sg=1,
        negative=negative,
        workers=workers,
        seed=seed,
        epochs=epochs,
        alpha=alpha,
        min_alpha=alpha * 1e-3,
        sample=sample,
        shrink_windows=False,
    )
    model.build_vocab(corpus)
    words = [key for key in model.wv.index_to_key if not key.startswith("#")]
    if not words:
        raise HyperofaError(f"{corpus_dir}: no word occurs {min_count} times (config key vectors.train.min_count)")
    callbacks = [epoch_progress(model.epochs, sys.stderr)] if progress else []
    model.train(corpus, total_examples=model.corpus_count, epochs=model.epochs, callbacks=callbacks)
    kv = model.wv.vectors_for_all(words, allow_inference=False, copy_vecattrs=True)
    return kv
