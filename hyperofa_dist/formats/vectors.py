"""Word vectors, the mapping stage's input: ColexNet+ `.wv`, gensim `.kv`, word2vec `.vec`/`.bin`.

Keys follow the ColexNet+ convention the method parses (HyperOFA's `hyperofa/utils.py`, OFA's `ofa/utils.py`):
`iso:ngram` with `$` marking a word boundary (`otq:$ndöhi$`), or a bare English concept string. A key the method
would crash on or misparse (a colon elsewhere than after a 3-letter code, a non-ISO prefix, a second colon, an
empty word, a line break) is counted, logged with examples, and skipped; word index i is the i-th kept key, in
file order. `hyperofa vectors train` writes `<run.dir>/vectors/vectors.kv` in gensim's format (`save_keyed_vectors`).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import HyperofaError

log = logging.getLogger("hyperofa.vectors")

GENSIM_SUFFIXES = (".wv", ".kv")
WORD2VEC_SUFFIXES = {".vec": False, ".bin": True}
ISO = re.compile(r"^[a-z]{3}$")
DEFAULT_LANG = "eng"
SKIP_EXAMPLES = 5
STAGE = "vectors"
TRAINED_NAME = "vectors.kv"


# --- key parsing (the method's rules, with its crashes and misparses turned into counted skips) -----------------


def parse_key(key: str) -> Optional[tuple[str, str, bool]]:
    """(language, word, starts_at_boundary) of a vector key, or None when the key is in an unexpected format.

    `word` has `$` boundaries replaced by spaces as the method does; `starts_at_boundary` tells whether the
    original word began with `$`, which selects the third spelling variant (docs/METHOD.md §1.5).
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
    return Path(run_dir) / STAGE / TRAINED_NAME


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


def configured_vectors_path(config) -> Optional[Path]:
    """The word-vector file the config names: vectors.path, or the vectors stage's output if it exists."""
    if config.vectors.path:
        return Path(config.vectors.path)
    default = trained_vectors_path(config.run_dir)
    return default if default.is_file() else None
