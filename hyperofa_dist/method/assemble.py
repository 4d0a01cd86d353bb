"""Assembly of the target coordinate matrix F_t with a provenance for every row (docs/METHOD.md §1.9).

Order: copy (overlap and special tokens by role) -> predicted (HyperOFA, OFA, or the mean of the source pieces)
-> random. The reference marks
"not yet set" rows by being all zero and later overwrites every all-zero row; a legitimately zero row (e.g. a
zero-initialised padding embedding that was copied) would then be replaced. Here the provenance array is the only
record of what each row is, and every row is set exactly once by the first rule that applies.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np

from ..errors import HyperofaError
from ..formats.vectors import parse_key
from .random import random_rows

PROVENANCE_NAMES = ("copy", "hyperofa", "ofa", "random", "mean")
COPY, HYPEROFA, OFA, RANDOM, MEAN = range(5)
PREDICTED = {"hyperofa": HYPEROFA, "ofa": OFA, "mean": MEAN}
UNSET = np.uint8(255)
NO_WORDS = "no_words"

# Rows of F_t multiplied by P at once.
_PRODUCT_CHUNK = 1 << 15


@dataclass
class Assembly:
    coordinates: np.ndarray  # F_t, float32 [V_t, k]
    provenance: np.ndarray  # uint8 [V_t], index into PROVENANCE_NAMES
    predictions_overridden: int  # predictions dropped because the token is copied


def assemble_coordinates(
    vocab_size: int,
    source_coordinates: np.ndarray,
    copy_target_ids: np.ndarray,
    copy_source_ids: np.ndarray,
    predicted_ids: Optional[np.ndarray],
    predicted_rows: Optional[np.ndarray],
    predicted_kind: Optional[str],
    random_mean: np.ndarray,
    random_std: np.ndarray,
    seed: int,
) -> Assembly:
    """F_t: copied rows, then predicted rows for tokens not copied, then seeded random rows for the rest."""
    k = source_coordinates.shape[1]
    copy_target_ids = np.asarray(copy_target_ids, dtype=np.int64)
    copy_source_ids = np.asarray(copy_source_ids, dtype=np.int64)
    if copy_target_ids.shape != copy_source_ids.shape:
        raise HyperofaError("copy pairs: target_ids and source_ids differ in length")
    _check_ids(copy_target_ids, vocab_size, "copy target ids")
    _check_ids(copy_source_ids, len(source_coordinates), "copy source ids")
    if len(np.unique(copy_target_ids)) != len(copy_target_ids):
        raise HyperofaError("copy pairs: a target id is copied from two source tokens")

    coordinates = np.empty((vocab_size, k), dtype=np.float32)
    provenance = np.full(vocab_size, UNSET, dtype=np.uint8)
    order = np.argsort(copy_source_ids, kind="stable")  # sorted reads of a memory-mapped F_s
    coordinates[copy_target_ids[order]] = np.asarray(source_coordinates[copy_source_ids[order]], dtype=np.float32)
    provenance[copy_target_ids] = COPY

    overridden = 0
    if predicted_ids is not None and len(predicted_ids):
        if predicted_kind not in PREDICTED:
            raise ValueError(f"predicted_kind must be one of {sorted(PREDICTED)}, not {predicted_kind!r}")
        predicted_ids = np.asarray(predicted_ids, dtype=np.int64)
        check_predictions(predicted_ids, predicted_rows, vocab_size, k, "predictions")
        keep = provenance[predicted_ids] == UNSET
        overridden = int((~keep).sum())
        coordinates[predicted_ids[keep]] = predicted_rows[keep]
        provenance[predicted_ids[keep]] = PREDICTED[predicted_kind]

    rest = np.flatnonzero(provenance == UNSET)
    coordinates[rest] = random_rows(rest, random_mean, random_std, seed)
    provenance[rest] = RANDOM
    return Assembly(coordinates, provenance, overridden)


def blend(predicted_ids: np.ndarray, predicted_rows: np.ndarray, other_ids: np.ndarray, other_rows: np.ndarray,
          weight: float) -> np.ndarray:
    """`(1 - weight) * predicted + weight * other` for every predicted token (`init.ofa_blend`, docs/METHOD.md §1.15):
    the other method's row of the same token, matched by id. A predicted token the other method lacks is an error."""
    where = {int(t): i for i, t in enumerate(other_ids)}
    missing = [int(t) for t in predicted_ids if int(t) not in where]
    if missing:
        raise HyperofaError(f"init.ofa_blend: token {missing[0]} has a prediction but no OFA row to blend with")
    other = np.asarray(other_rows, dtype=np.float32)[[where[int(t)] for t in predicted_ids]]
    return ((1.0 - weight) * np.asarray(predicted_rows, dtype=np.float32) + weight * other).astype(np.float32)


def centre_on(rows: np.ndarray, other: np.ndarray) -> np.ndarray:
    """`rows` moved by one shared vector so that their mean is `other`'s mean (`init.ofa_centre`, docs/METHOD.md
    §1.16): each row's offset from the mean is kept."""
    rows = np.asarray(rows, dtype=np.float64)
    return (rows - rows.mean(0) + np.asarray(other, dtype=np.float64).mean(0)).astype(np.float32)


def hyperofa_rows(ids: np.ndarray, predicted: np.ndarray, ofa: Optional[np.ndarray], blend_weight: float,
                  ofa_centre: bool) -> np.ndarray:
    """HyperOFA's rows for the tokens `ids` from the hypernetwork's `predicted` rows: blended with OFA's row of the
    same token (`init.ofa_blend`, §1.15), then centred on OFA's mean (`init.ofa_centre`, §1.16); `ofa` holds OFA's
    rows for the same `ids` and is needed only when either is on."""
    if blend_weight <= 0 and not ofa_centre:
        return predicted
    if ofa is None:
        raise HyperofaError("hyperofa: init.ofa_blend or init.ofa_centre needs OFA's rows of the predicted tokens")
    rows = blend(ids, predicted, ids, ofa, blend_weight) if blend_weight > 0 else predicted
    return centre_on(rows, ofa) if ofa_centre else rows


def recentre(coordinates: np.ndarray, provenance: np.ndarray, kind: int) -> np.ndarray:
    """Shift the rows of provenance `kind` (in place, in coordinate space) so that their mean is the copied rows'
    mean (`init.recentre`, docs/METHOD.md §1.14); their spread around it is kept. Returns the shift applied."""
    rows, copied = provenance == kind, provenance == COPY
    if not rows.any() or not copied.any():
        return np.zeros(coordinates.shape[1], dtype=np.float32)
    shift = (np.asarray(coordinates[copied], dtype=np.float64).mean(0)
             - np.asarray(coordinates[rows], dtype=np.float64).mean(0)).astype(np.float32)
    coordinates[rows] += shift
    return shift


def method_coordinates(
    vocab_size: int,
    source_coordinates: np.ndarray,
    copy_t: np.ndarray,
    copy_s: np.ndarray,
    predicted_ids: np.ndarray,
    predicted_rows: Optional[np.ndarray],
    method: str,
    random_mean: np.ndarray,
    random_std: np.ndarray,
    seed: int,
    recentre_rows: bool,
) -> tuple[Assembly, Optional[np.ndarray]]:
    """F_t of one init method (`assemble_coordinates`, then `init.recentre` of the method's predicted rows) and the
    shift applied (None without re-centring): what the init stage writes and what `tune hypernet` scores."""
    assembly = assemble_coordinates(
        vocab_size, source_coordinates, copy_t, copy_s, predicted_ids, predicted_rows,
        method if method != "random" else None, random_mean, random_std, seed,
    )
    shift = None
    if recentre_rows and method in PREDICTED:
        shift = recentre(assembly.coordinates, assembly.provenance, PREDICTED[method])
    return assembly, shift


def _check_ids(ids: np.ndarray, size: int, what: str) -> None:
    if len(ids) and (ids.min() < 0 or ids.max() >= size):
        bad = int(ids[(ids < 0) | (ids >= size)][0])
        raise HyperofaError(f"{what}: id {bad} is out of range [0, {size})")


def check_predictions(ids: np.ndarray, rows: np.ndarray, vocab_size: int, k: int, what: str) -> None:
    """The validation the reference never did (docs/FIDELITY.md): shapes, k, id range, duplicates, finiteness."""
    if ids.ndim != 1 or rows is None or rows.ndim != 2 or len(rows) != len(ids):
        shape = None if rows is None else tuple(rows.shape)
        raise HyperofaError(f"{what}: expected ids [n] and rows [n, k], got {tuple(ids.shape)} and {shape}")
    if rows.shape[1] != k:
        raise HyperofaError(f"{what}: rows have dimension {rows.shape[1]} but the mapping's k is {k}")
    _check_ids(ids, vocab_size, f"{what}: token ids (target vocabulary)")
    if len(np.unique(ids)) != len(ids):
        raise HyperofaError(f"{what}: a token id appears twice")
    if not np.isfinite(rows).all():
        raise HyperofaError(f"{what}: rows contain NaN or infinity")


def is_identity(primitives: np.ndarray) -> bool:
    """P is the D x D identity exactly when the mapping did not factorise (k = D)."""
    k, d = primitives.shape
    return k == d and np.array_equal(primitives, np.eye(k, dtype=primitives.dtype))


def full_embeddings(coordinates: np.ndarray, primitives: np.ndarray) -> np.ndarray:
    """E_t = F_t P, or F_t itself when there is no factorisation (k = D and P the identity)."""
    k, d = primitives.shape
    if coordinates.shape[1] != k:
        raise HyperofaError(f"F_t has {coordinates.shape[1]} columns but P has {k} rows")
    if is_identity(primitives):
        return np.array(coordinates, dtype=np.float32, copy=True)
    out = np.empty((len(coordinates), d), dtype=np.float32)
    p = np.asarray(primitives, dtype=np.float32)
    for a in range(0, len(coordinates), _PRODUCT_CHUNK):
        out[a : a + _PRODUCT_CHUNK] = coordinates[a : a + _PRODUCT_CHUNK] @ p
    return out


# --- provenance counts ------------------------------------------------------------------------------------


def provenance_counts(provenance: np.ndarray) -> dict[str, int]:
    counts = np.bincount(provenance, minlength=len(PROVENANCE_NAMES))
    if len(counts) > len(PROVENANCE_NAMES):
        raise ValueError(f"provenance has values outside {'/'.join(PROVENANCE_NAMES)}")
    return {name: int(c) for name, c in zip(PROVENANCE_NAMES, counts)}


_SCRIPT_NAMES = {
    "LATIN": "Latn", "CYRILLIC": "Cyrl", "GREEK": "Grek", "ARABIC": "Arab", "HEBREW": "Hebr",
    "DEVANAGARI": "Deva", "BENGALI": "Beng", "CJK": "Hani", "HIRAGANA": "Hira", "KATAKANA": "Kana",
    "HANGUL": "Hang", "THAI": "Thai", "ARMENIAN": "Armn", "GEORGIAN": "Geor", "ETHIOPIC": "Ethi",
    "TAMIL": "Taml", "TELUGU": "Telu", "KANNADA": "Knda", "MALAYALAM": "Mlym", "GUJARATI": "Gujr",
    "GURMUKHI": "Guru", "ORIYA": "Orya", "SINHALA": "Sinh", "KHMER": "Khmr", "LAO": "Laoo",
    "MYANMAR": "Mymr", "TIBETAN": "Tibt", "MONGOLIAN": "Mong", "SYRIAC": "Syrc", "THAANA": "Thaa",
}


def word_language(key: str) -> str:
    """The language of a word key as the mapping stage parses it (`iso:word`; bare keys are concepts, 'eng')."""
    parsed = parse_key(key)
    return parsed[0] if parsed else "und"


def word_script(key: str) -> str:
    """ISO 15924-style script of a word key, from the first letter of its word."""
    parsed = parse_key(key)
    word = parsed[1] if parsed else key
    for char in word:
        if char.isalpha():
            name = unicodedata.name(char, "")
            first = name.split(" ", 1)[0] if name else ""
            return _SCRIPT_NAMES.get(first, first.title()[:4] or "Zyyy")
    return "Zyyy"


def group_codes(labels: Iterable[str]) -> tuple[np.ndarray, list[str]]:
    """Labels -> (int32 code per label, sorted distinct names)."""
    labels = list(labels)
    names = sorted(set(labels))
    index = {name: i for i, name in enumerate(names)}
    return np.fromiter((index[label] for label in labels), dtype=np.int32, count=len(labels)), names


def provenance_by_group(
    provenance: np.ndarray,
    indptr: np.ndarray,
    indices: np.ndarray,
    word_groups: np.ndarray,
    group_names: Sequence[str],
    chunk: int = 1 << 16,
) -> dict[str, dict[str, int]]:
    """For each group (language or script): provenance counts of the target tokens having a word of that group.

    A token whose words span several groups counts once in each; tokens without words form `no_words`.
    """
    n_groups = len(group_names)
    n_kinds = len(PROVENANCE_NAMES)
    table = np.zeros((n_groups + 1, n_kinds), dtype=np.int64)
    vocab_size = len(provenance)
    for a in range(0, vocab_size, chunk):
        b = min(a + chunk, vocab_size)
        lengths = np.diff(np.asarray(indptr[a : b + 1], dtype=np.int64))
        tokens = np.repeat(np.arange(a, b, dtype=np.int64), lengths)
        groups = word_groups[np.asarray(indices[int(indptr[a]) : int(indptr[b])], dtype=np.int64)]
        pairs = np.unique(tokens * n_groups + groups)
        cells = (pairs % n_groups) * n_kinds + provenance[pairs // n_groups]
        table[:n_groups] += np.bincount(cells, minlength=n_groups * n_kinds).reshape(n_groups, n_kinds)
        empty = np.arange(a, b)[lengths == 0]
        table[n_groups] += np.bincount(provenance[empty], minlength=n_kinds)
    out = {}
    for g, name in enumerate(list(group_names) + [NO_WORDS]):
        if table[g].any():
            out[name] = {kind: int(c) for kind, c in zip(PROVENANCE_NAMES, table[g])}
    return out


def mean_cosine(estimates: np.ndarray, truth: np.ndarray) -> float:
    """Mean over rows of cos(estimate, true row); a zero row has cosine 0. The held-out quality of every method."""
    e = np.asarray(estimates, dtype=np.float64)
    t = np.asarray(truth, dtype=np.float64)
    if e.shape != t.shape or len(e) == 0:
        raise ValueError(f"mean_cosine needs two equal non-empty shapes, got {e.shape} and {t.shape}")
    norms = np.linalg.norm(e, axis=1) * np.linalg.norm(t, axis=1)
    dots = (e * t).sum(1)
    cos = np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)
    return float(cos.mean())
