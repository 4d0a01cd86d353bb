"""Word vectors, the mapping stage's input: ColexNet+ `.wv`, gensim `.kv`, word2vec `.vec`/`.bin`.

Keys follow the ColexNet+ convention the method parses (HyperOFA's `hyperofa/utils.py`, OFA's `ofa/utils.py`):
`iso:ngram` with `$` marking a word boundary (`otq:$ndöhi$`), or a bare English concept string. A key the method
would crash on or misparse (a colon elsewhere than after a 3-letter code, a non-ISO prefix, a second colon, an
empty word, a line break) is counted, logged with examples, and skipped; word index i is the i-th kept key, in
file order.

A gensim file is a pickle, and unpickling runs whatever the file names. `.kv`/`.wv` files (ColexNet+ is
distributed as one) are therefore read by a restricted unpickler that admits only the gensim and numpy names a
KeyedVectors (or a whole Word2Vec model) needs and builds those objects without running their constructors;
arrays gensim stored beside the pickle (`<file>.<attribute>.npy`) are read with `allow_pickle=False`. Any other
name is refused in one line before anything of it runs.

The project's own vectors (`hyperofa vectors train`: `<run.dir>/vectors/vectors.npy`) hold no pickle: a `.npy`
float32 matrix (memory-mapped when read) and, beside it, `<file>.keys.json`, the JSON list of its keys in row
order (`save_word_vectors`). `vectors.path` may name such a `.npy` too.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import HyperofaError
from .files import atomic_write_bytes, load_npy, npy_writer

log = logging.getLogger("hyperofa.vectors")

GENSIM_SUFFIXES = (".wv", ".kv")
WORD2VEC_SUFFIXES = {".vec": False, ".bin": True}
OWN_SUFFIX = ".npy"
KEYS_SUFFIX = ".keys.json"  # the keys of `<file>.npy` live in `<file>.npy.keys.json` (a companion, as gensim's)
ISO = re.compile(r"^[a-z]{3}$")
DEFAULT_LANG = "eng"
SKIP_EXAMPLES = 5
STAGE = "vectors"
TRAINED_NAME = "vectors.npy"


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


# --- gensim files, read without running code from them ---------------------------------------------------------

# module -> names a gensim KeyedVectors / Word2Vec pickle (gensim 3.x and 4.x, numpy 1.x and 2.x) refers to.
# Classes are built bare (`_bare`), never through their constructors; the functions are numpy's own array,
# dtype and RNG-state rebuilders and the plain builtins a Word2Vec model's counters use.
GENSIM_CLASSES = {
    "gensim.models.keyedvectors": {"KeyedVectors", "Word2VecKeyedVectors", "EuclideanKeyedVectors", "Vocab",
                                   "CompatVocab"},
    "gensim.models.word2vec": {"Word2Vec"},
}
PICKLE_FUNCTIONS = {
    "numpy": {"ndarray", "dtype"},
    "numpy.core.multiarray": {"_reconstruct", "scalar"},
    "numpy._core.multiarray": {"_reconstruct", "scalar"},
    "numpy.random._pickle": {"__randomstate_ctor", "__bit_generator_ctor"},
    "numpy.random._mt19937": {"MT19937"},
    "collections": {"defaultdict", "OrderedDict"},
    "builtins": {"int", "float", "str", "hash", "set", "frozenset", "list", "dict", "tuple"},
    "gensim.utils": {"call_on_class_only"},  # Word2Vec stores it as its instance's `load`: it only raises
}
ATTRIBUTE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


def _bare(cls: type) -> type:
    """A stand-in for `cls` that the unpickler may call or `__new__` with any arguments: it returns an empty
    `cls` instance (the pickle's state is then set on it), so no constructor runs on values from the file."""
    return type(cls.__name__, (), {"__new__": staticmethod(lambda _type, *args, **kwargs: cls.__new__(cls))})


class _GensimUnpickler(pickle.Unpickler):
    def __init__(self, handle, path: Path):
        super().__init__(handle, encoding="latin1")  # gensim's own setting, for pickles written by Python 2
        self.path = path

    def find_class(self, module: str, name: str):
        if name in GENSIM_CLASSES.get(module, ()):
            import importlib

            return _bare(getattr(importlib.import_module(module), name))
        if name in PICKLE_FUNCTIONS.get(module, ()):
            return super().find_class(module, name)
        raise HyperofaError(
            f"{self.path}: refused: the pickle names {module}.{name}, which no gensim KeyedVectors or Word2Vec file "
            "holds (a pickle can run code; only gensim's and numpy's own names are read)"
        )


def _load_arrays_beside(obj, path: Path) -> None:
    """Gensim's `_load_specials` without its pickles: the attributes it saved apart as `<path>.<attr>.npy`
    (memory-mapped), recursively for sub-objects; scipy matrices, which gensim pickles, are refused."""
    for attrib in getattr(obj, "__recursive_saveloads", None) or []:
        if not (isinstance(attrib, str) and ATTRIBUTE.match(attrib) and hasattr(obj, attrib)):
            raise HyperofaError(f"{path}: names a sub-object {attrib!r} it does not hold")
        _load_arrays_beside(getattr(obj, attrib), Path(f"{path}.{attrib}"))
    if getattr(obj, "__scipys", None):
        raise HyperofaError(f"{path}: holds scipy matrices stored apart, which gensim pickles; not read")
    for attrib in getattr(obj, "__numpys", None) or []:
        if not (isinstance(attrib, str) and ATTRIBUTE.match(attrib)):
            raise HyperofaError(f"{path}: names an array file for attribute {attrib!r}, not an attribute name")
        companion = Path(f"{path}.{attrib}.npy")
        setattr(obj, attrib, load_npy(companion, mmap=True, what=f"array {attrib} of {path.name}"))
    for attrib in getattr(obj, "__ignoreds", None) or []:
        if isinstance(attrib, str) and ATTRIBUTE.match(attrib):
            setattr(obj, attrib, None)
    for special in ("__recursive_saveloads", "__numpys", "__scipys", "__ignoreds"):
        setattr(obj, special, [])  # done: gensim's own `_load_specials` below only upgrades older layouts


def load_gensim(path: Path):
    """The KeyedVectors of a gensim `.kv`/`.wv` (a whole Word2Vec model's `.wv`), read by the restricted
    unpickler; a name outside the allowed set is one HyperofaError line and nothing of the file runs."""
    from gensim.models import KeyedVectors

    with open(path, "rb") as handle:
        obj = _GensimUnpickler(handle, path).load()
    if not hasattr(obj, "__dict__") or not hasattr(obj, "_load_specials"):
        raise HyperofaError(f"{path}: holds a {type(obj).__name__}, not gensim KeyedVectors")
    _load_arrays_beside(obj, path)
    obj._load_specials(str(path), "r", False, None)  # upgrades of gensim 3.x layouts (vocab, syn0, index2word)
    kv = getattr(obj, "wv", obj)  # a whole Word2Vec model saved as .wv carries its vectors in .wv
    if not isinstance(kv, KeyedVectors):
        raise HyperofaError(f"{path}: holds a {type(obj).__name__}, not gensim KeyedVectors")
    if kv is not obj:
        kv._load_specials(str(path), "r", False, None)
    return kv


# --- the project's own format: a .npy matrix and its keys as JSON --------------------------------------------


def keys_path(path: Path) -> Path:
    return path.with_name(path.name + KEYS_SUFFIX)


def save_word_vectors(path: Path, keys: list[str], matrix: np.ndarray) -> list[Path]:
    """`path` (.npy, float32 [len(keys), dim]) and its keys file, each written atomically, the keys first: the
    matrix is the file readers open. Equal vectors give equal bytes. Returns the files written."""
    matrix = np.asarray(matrix, dtype=np.float32)
    if matrix.ndim != 2 or matrix.shape[0] != len(keys):
        raise HyperofaError(f"{path}: {matrix.shape} vectors for {len(keys)} keys")
    names = keys_path(path)
    atomic_write_bytes(names, (json.dumps(list(keys), ensure_ascii=False) + "\n").encode("utf-8"))
    with npy_writer(path, np.float32, matrix.shape) as out:
        out[:] = matrix
    return [names, path]


def _load_own(path: Path):
    table = load_npy(path, mmap=True, what="word-vector matrix")
    names = keys_path(path)
    if not names.is_file():
        raise HyperofaError(f"{names}: keys of the word-vector matrix {path.name} not found")
    try:
        keys = json.loads(names.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise HyperofaError(f"{names}: not a JSON list of keys ({exc.__class__.__name__})") from None
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise HyperofaError(f"{names}: not a JSON list of keys")
    if not np.issubdtype(table.dtype, np.floating):
        raise HyperofaError(f"{path}: word-vector matrix of dtype {table.dtype}, expected floats")
    return table, keys


def _read_table(path: Path) -> tuple[np.ndarray, list]:
    """(matrix, keys) of a vector file in any accepted format."""
    suffix = path.suffix.lower()
    if suffix == OWN_SUFFIX:
        return _load_own(path)
    if suffix in GENSIM_SUFFIXES:
        kv = load_gensim(path)
        return kv.vectors, list(kv.index_to_key)
    if suffix in WORD2VEC_SUFFIXES:
        from gensim.models import KeyedVectors

        kv = KeyedVectors.load_word2vec_format(str(path), binary=WORD2VEC_SUFFIXES[suffix], unicode_errors="strict")
        return kv.vectors, list(kv.index_to_key)
    accepted = ", ".join((*GENSIM_SUFFIXES, *WORD2VEC_SUFFIXES, OWN_SUFFIX))
    raise HyperofaError(f"{path}: unknown word-vector format {suffix or '(no suffix)'}; expected one of {accepted}")


def load_word_vectors(path: str | Path, languages: Optional[list[str]] = None) -> WordVectors:
    """Load a vector file and parse its keys; `languages` (3-letter codes) keeps only words of those languages."""
    path = Path(path)
    if not path.is_file():
        raise HyperofaError(f"{path}: word-vector file not found (config key vectors.path)")
    try:
        table, keys = _read_table(path)
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
