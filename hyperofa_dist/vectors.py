"""Multilingual word vectors: load them (ColexNet+ `.wv`, gensim `.kv`, word2vec `.vec`/`.bin`), or train them.

Keys follow the ColexNet+ convention the method parses (METHOD_REFERENCE §1.1): `iso:ngram` with `$` marking a
word boundary (`otq:$ndöhi$`), or a bare English concept string. A key the method would crash on or misparse
(a colon elsewhere than after a 3-letter code, a non-ISO prefix, a second colon, an empty word, a line break) is
counted, logged with examples, and skipped; word index i is the i-th kept key, in file order.

`hyperofa vectors train` learns cross-lingual vectors from a parallel corpus (line i of every language file are
translations) with sentence ids as shared contexts (SID-SGNS, Levy, Søgaard and Goldberg 2017): every word is
trained to predict the id of each sentence it occurs in, in whatever language, so translations, which share
their sentence ids, land next to each other. The output is a gensim `.kv` with `iso:word` keys.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from .errors import HyperofaError

log = logging.getLogger("hyperofa.vectors")

GENSIM_SUFFIXES = (".wv", ".kv")
WORD2VEC_SUFFIXES = {".vec": False, ".bin": True}
ISO = re.compile(r"^[a-z]{3}$")
CORPUS_FILE = re.compile(r"^(?P<iso>[a-z]{3})(?:_[A-Z][a-z]{3})?\.txt(?:\.gz)?$")
WORD = re.compile(r"\w+(?:['’-]\w+)*")
DEFAULT_LANG = "eng"
SKIP_EXAMPLES = 5
TRAINED_NAME = "vectors.kv"


# --- key parsing (the method's rules, with its crashes and misparses turned into counted skips) -----------------


def parse_key(key: str) -> Optional[tuple[str, str, bool]]:
    """(language, word, starts_at_boundary) of a vector key, or None when the key is in an unexpected format.

    `word` has `$` boundaries replaced by spaces as the method does; `starts_at_boundary` tells whether the
    original word began with `$`, which selects the third spelling variant (§1.5).
    """
    if "\n" in key or "\r" in key:
        return None
    if len(key) > 4 and key[3] == ":":
        lang, word_orig = key[:3], key[4:]
        if not ISO.match(lang) or ":" in word_orig:
            return None
    elif ":" in key:
        return None
    else:
        lang, word_orig = DEFAULT_LANG, key
    word = word_orig.replace("$", " ")
    if not word.strip() or (word_orig.startswith("$") and len(word) < 2):
        return None
    return lang, word, word_orig.startswith("$")


@dataclass
class WordVectors:
    """The usable words of a vector file: word index i is row `rows[i]` of `table` and key `keys[i]`."""

    path: Path
    keys: list[str]
    rows: np.ndarray  # int64 rows of `table` that were kept
    table: np.ndarray  # the file's whole [n_keys, dim] matrix (memory-mapped when gensim stored it apart)
    languages: list[str]  # sorted language codes
    lang_ids: np.ndarray  # int32 index into `languages`, per word
    n_keys: int
    skipped: int
    skipped_examples: list[str] = field(default_factory=list)

    @property
    def dim(self) -> int:
        return int(self.table.shape[1])

    def __len__(self) -> int:
        return len(self.keys)

    def matrix(self, start: int = 0, stop: Optional[int] = None) -> np.ndarray:
        """float32 rows of words [start, stop) (a copy; for the whole table call it in chunks)."""
        return np.asarray(self.table[self.rows[start:stop]], dtype=np.float32)


def _open_keyed_vectors(path: Path):
    from gensim.models import KeyedVectors
    from gensim.utils import SaveLoad

    suffix = path.suffix.lower()
    if suffix in GENSIM_SUFFIXES:
        obj = SaveLoad.load(str(path), mmap="r")
        kv = getattr(obj, "wv", obj)  # a whole Word2Vec/FastText model saved as .wv carries its vectors in .wv
        if not isinstance(kv, KeyedVectors):
            raise HyperofaError(f"{path}: holds a {type(obj).__name__}, not gensim KeyedVectors")
        return kv
    if suffix in WORD2VEC_SUFFIXES:
        return KeyedVectors.load_word2vec_format(str(path), binary=WORD2VEC_SUFFIXES[suffix], unicode_errors="strict")
    accepted = ", ".join(GENSIM_SUFFIXES + tuple(WORD2VEC_SUFFIXES))
    raise HyperofaError(f"{path}: unknown word-vector format {suffix or '(no suffix)'}; expected one of {accepted}")


def load_word_vectors(path: str | Path, languages: Optional[list[str]] = None) -> WordVectors:
    """Load a vector file and parse its keys; `languages` (3-letter codes) keeps only words of those languages."""
    path = Path(path)
    if not path.is_file():
        raise HyperofaError(f"{path}: word-vector file not found (config key vectors.path)")
    try:
        kv = _open_keyed_vectors(path)
        table = kv.vectors
        keys = list(kv.index_to_key)
    except HyperofaError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # unpickling, numpy and word2vec readers raise many types for a damaged file
        detail = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise HyperofaError(
            f"{path}: cannot read word vectors, the file is corrupt or truncated ({exc.__class__.__name__}: {detail})"
        ) from None
    if getattr(table, "ndim", 0) != 2 or table.shape[0] != len(keys):
        shape = getattr(table, "shape", None)
        raise HyperofaError(f"{path}: vector matrix of shape {shape} does not match its {len(keys)} keys")
    if not keys:
        raise HyperofaError(f"{path}: holds no word vectors")
    wanted = set(languages) if languages else None
    kept_rows: list[int] = []
    kept_keys: list[str] = []
    kept_langs: list[str] = []
    skipped: list[str] = []
    n_skipped = 0
    for row, key in enumerate(keys):
        parsed = parse_key(key) if isinstance(key, str) else None
        if parsed is None:
            n_skipped += 1
            if len(skipped) < SKIP_EXAMPLES:
                skipped.append(repr(key))
            continue
        if wanted is not None and parsed[0] not in wanted:
            continue
        kept_rows.append(row)
        kept_keys.append(key)
        kept_langs.append(parsed[0])
    if n_skipped:
        log.warning("%s: skipped %d of %d keys in an unexpected format, e.g. %s", path, n_skipped, len(keys), ", ".join(skipped))
    if not kept_keys:
        which = f" of languages {sorted(wanted)}" if wanted else ""
        raise HyperofaError(f"{path}: none of its {len(keys)} keys is a usable word{which} (e.g. {', '.join(skipped[:3])})")
    names = sorted(set(kept_langs))
    code = {name: i for i, name in enumerate(names)}
    return WordVectors(
        path=path,
        keys=kept_keys,
        rows=np.asarray(kept_rows, dtype=np.int64),
        table=table,
        languages=names,
        lang_ids=np.fromiter((code[x] for x in kept_langs), dtype=np.int32, count=len(kept_langs)),
        n_keys=len(keys),
        skipped=n_skipped,
        skipped_examples=skipped,
    )


def write_word_matrix(vectors: WordVectors, path: Path, chunk_rows: int = 65536) -> None:
    """Stream the kept rows into a float32 .npy (never the whole table in memory); non-finite values are an error."""
    from .artifacts import tmp_name

    tmp = tmp_name(path)
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(vectors), vectors.dim))
    try:
        for start in range(0, len(vectors), chunk_rows):
            block = vectors.matrix(start, start + chunk_rows)
            if not np.isfinite(block).all():
                bad = start + int(np.argmax(~np.isfinite(block).all(axis=1)))
                raise HyperofaError(f"{vectors.path}: vector of key {vectors.keys[bad]!r} is not finite")
            out[start : start + len(block)] = block
        out.flush()
        del out
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# --- cross-lingual training from a parallel corpus ----------------------------------------------------------


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
                        continue  # shorter files simply stop contributing; alignment is by line number
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
):
    """Train SID-SGNS vectors; returns gensim KeyedVectors holding only `iso:word` keys (frequency order)."""
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
    model.train(corpus, total_examples=model.corpus_count, epochs=model.epochs)
    kv = model.wv.vectors_for_all(words, allow_inference=False, copy_vecattrs=True)
    return kv


def save_keyed_vectors(kv, path: Path) -> list[Path]:
    """Save a gensim .kv atomically and reproducibly (no lifecycle timestamps); returns the files written."""
    kv.lifecycle_events = None  # gensim stamps date and platform into the pickle otherwise
    staging = path.parent / f".{path.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        kv.save(str(staging / path.name))
        written = sorted(staging.iterdir(), key=lambda p: (p.name == path.name, p.name))
        for old in path.parent.glob(path.name + ".*"):  # companions of an earlier, larger save
            old.unlink()
        for item in written:  # companions first, the main file last: it is the one loaders open
            os.replace(item, path.parent / item.name)
        return [path.parent / item.name for item in written]
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def trained_vectors_path(run_dir: Path) -> Path:
    return Path(run_dir) / "vectors" / TRAINED_NAME


def resolve_vectors_path(config) -> Path:
    """`vectors.path`, or the file `hyperofa vectors train` wrote into the run directory."""
    if config.vectors.path:
        path = Path(config.vectors.path).resolve()
        if not path.is_file():
            raise HyperofaError(f"{path}: word-vector file not found (config key vectors.path)")
        return path
    path = trained_vectors_path(config.run_dir)
    if not path.is_file():
        raise HyperofaError(
            f"{path}: no word vectors; set vectors.path (ColexNet+ .wv, .kv, .vec, .bin) or run `hyperofa vectors train`"
        )
    return path


def run_vectors_command(config, tracker, action: str = "train") -> int:
    """`hyperofa vectors train`: the `vectors` stage of the run directory."""
    if action != "train":
        raise HyperofaError(f"vectors: unknown action {action!r}; expected 'train'")
    return run_vectors_train(config, tracker)


def run_vectors_train(config, tracker) -> int:
    import time

    from .artifacts import Stage, digest, sha256_file

    settings = config.vectors.train
    corpus_dir = Path(settings.corpus or config.corpus.path or "")
    if not (settings.corpus or config.corpus.path):
        raise HyperofaError("vectors train: set vectors.train.corpus (or corpus.path) to a parallel corpus directory")
    files = corpus_languages(corpus_dir)
    stage = Stage(config.run_dir, "vectors")
    inputs = {
        "corpus": {iso + ":" + path.name: sha256_file(path) for iso, path in files},
        "train": config.section("vectors")["vectors"]["train"] | {"corpus": None},
        "seed": config.run.seed,
    }
    key = digest(inputs)
    with tracker.stage("vectors", config) as t:
        if stage.is_complete(key):
            log.info("vectors: %s is up to date", stage.path)
            return 0
        stage.begin(key)
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
        written = save_keyed_vectors(kv, path)
        per_lang: dict[str, int] = {}
        for word in kv.index_to_key:
            per_lang[word[:3]] = per_lang.get(word[:3], 0) + 1
        counts = {"words": len(kv.index_to_key), "dim": int(kv.vector_size), "languages": len(per_lang)}
        t.log_metrics({"train_s": time.perf_counter() - started, **counts} | {f"words.{k}": v for k, v in per_lang.items()})
        stage.write_manifest(
            config=config.effective(),
            inputs=inputs,
            outputs=[p.name for p in written],
            counts=counts | {"words_per_language": dict(sorted(per_lang.items()))},
        )
        log.info("vectors: %d words in %d languages -> %s", counts["words"], counts["languages"], path)
    return 0
