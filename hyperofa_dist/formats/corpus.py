"""Corpus readers: which languages a corpus holds, how to cut them into units of work, how to read a unit.

Three layouts, one interface:
- `dir`: one file per language, `<lang_Script>.txt` or `<lang_Script>.txt.gz`, one sentence per line;
- `glot500_local`: a local copy of Glot500-c, one folder per language holding parquet or jsonl files with a
  `text` column, read with `datasets`;
- `hub`: the HF dataset `cis-lmu/Glot500` (config names are the language codes), streamed with `datasets`.

A unit is a contiguous piece of one language (a byte range aligned to line starts for plain text, a line range
for gzip, a row range for parquet/jsonl, a whole language for the hub), so a huge language is split into many
units and a tiny one is a single small unit that callers may group with others. Units are planned
deterministically from the files alone.
"""

from __future__ import annotations

import gzip
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional

from ..config import LANG_CODE, CorpusConfig
from ..errors import HyperofaError
from .text import cr_line_ends, split_lines

TEXT_SUFFIXES = (".txt", ".txt.gz")
TABLE_SUFFIXES = (".parquet", ".jsonl", ".json", ".jsonl.gz", ".json.gz")


@dataclass(frozen=True)
class LanguageSource:
    lang: str
    format: str
    files: tuple[Path, ...] = field(default_factory=tuple)
    bytes: int = 0
    hub_name: str = ""


@dataclass(frozen=True)
class Unit:
    """A piece of one language: [start, end) in bytes (kind 'bytes'), lines ('lines') or rows ('rows')."""

    lang: str
    chunk: int
    path: str
    kind: str
    start: int
    end: int
    bytes: int
    hub_name: str = ""


@dataclass
class LineStats:
    lines: int = 0
    empty: int = 0
    invalid_utf8: int = 0
    cr_line_ends: int = 0  # lines of text files ended by `\r` or `\r\n` (formats/text.py)

    def add(self, other: "LineStats") -> None:
        self.lines += other.lines
        self.empty += other.empty
        self.invalid_utf8 += other.invalid_utf8
        self.cr_line_ends += other.cr_line_ends


def _lang_of(name: str, suffixes: Iterable[str]) -> Optional[str]:
    for suffix in sorted(suffixes, key=len, reverse=True):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def discover(corpus: CorpusConfig) -> list[LanguageSource]:
    """The corpus's languages, sorted; fatal errors name the offending path."""
    if corpus.format == "hub":
        return _discover_hub(corpus)
    if corpus.path is None:
        raise HyperofaError("config key corpus.path is not set (required for corpus.format dir/glot500_local)")
    root = Path(corpus.path)
    if not root.is_dir():
        raise HyperofaError(f"{root}: corpus directory not found")
    wanted = set(corpus.languages) if corpus.languages else None
    found: dict[str, LanguageSource] = {}
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if corpus.format == "dir":
            lang = _lang_of(entry.name, TEXT_SUFFIXES) if entry.is_file() else None
            expected = "<lang_Script>.txt or .txt.gz"
        else:
            lang = entry.name if entry.is_dir() else None
            expected = "a <lang_Script> folder"
        if lang is None or not LANG_CODE.match(lang):
            if wanted is not None:
                continue  # an explicit language list selects; other names are not ours to judge
            raise HyperofaError(f"{entry}: name is not a lang_Script code (expected {expected}, e.g. eng_Latn)")
        if wanted is not None and lang not in wanted:
            continue
        if lang in found:
            raise HyperofaError(f"{entry}: language {lang} appears twice in {root}")
        if corpus.format == "dir":
            files = (entry,)
        else:
            files = tuple(sorted(p for p in entry.iterdir() if p.is_file() and _lang_of(p.name, TABLE_SUFFIXES)))
            if not files:
                raise HyperofaError(f"{entry}: no parquet or jsonl files in language folder")
        found[lang] = LanguageSource(lang, corpus.format, files, sum(f.stat().st_size for f in files))
    if wanted is not None:
        missing = sorted(wanted - set(found))
        if missing:
            raise HyperofaError(f"{root}: requested language(s) not found: {', '.join(missing)}")
    if not found:
        raise HyperofaError(f"{root}: no language files found (expected {TEXT_SUFFIXES} files named lang_Script)")
    return [found[k] for k in sorted(found)]


def _discover_hub(corpus: CorpusConfig) -> list[LanguageSource]:
    import datasets

    langs = corpus.languages
    try:
        if langs is None:
            langs = [c for c in datasets.get_dataset_config_names(corpus.hub_name) if LANG_CODE.match(c)]
        # Touch the first language's builder now: an offline machine fails here, before any work starts.
        datasets.load_dataset_builder(corpus.hub_name, langs[0])
    except Exception as exc:  # datasets raises connection, offline-mode and not-found errors of many types
        reason = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0][:200]
        raise HyperofaError(
            f"{corpus.hub_name}: cannot reach the dataset on the HF hub ({reason}); download it and use "
            "corpus.format=glot500_local with corpus.path"
        ) from None
    return [LanguageSource(lang, "hub", (), 0, corpus.hub_name) for lang in sorted(langs)]


# --- planning -------------------------------------------------------------------------------------------


def plan_units(sources: Iterable[LanguageSource], chunk_bytes: int) -> list[Unit]:
    """Cut every language into units of about chunk_bytes raw text; an empty language gets no unit."""
    units: list[Unit] = []
    for source in sources:
        per_lang: list[tuple[str, str, int, int, int]] = []
        if source.format == "hub":
            per_lang.append(("", "hub", 0, -1, 0))
        for path in source.files:
            name = path.name
            if name.endswith(".txt"):
                per_lang.extend((str(path), "bytes", a, b, b - a) for a, b in _byte_ranges(path, chunk_bytes))
            elif name.endswith(".txt.gz"):
                per_lang.extend((str(path), "lines", a, b, n) for a, b, n in _gzip_line_ranges(path, chunk_bytes))
            else:
                per_lang.extend((str(path), "rows", a, b, n) for a, b, n in _row_ranges(path, chunk_bytes))
        units.extend(
            Unit(source.lang, i, p, kind, a, b, n, source.hub_name) for i, (p, kind, a, b, n) in enumerate(per_lang)
        )
    return units


def _byte_ranges(path: Path, chunk_bytes: int) -> list[tuple[int, int]]:
    size = path.stat().st_size
    if size == 0:
        return []
    cuts = [0]
    with open(path, "rb") as handle:
        target = chunk_bytes
        while target < size:
            handle.seek(target)
            rest = handle.readline()  # move to the start of the next line
            cut = target + len(rest)
            if cut >= size:
                break
            if cut > cuts[-1]:
                cuts.append(cut)
            target = cut + chunk_bytes
    cuts.append(size)
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def _gzip_line_ranges(path: Path, chunk_bytes: int) -> list[tuple[int, int, int]]:
    ranges, start, line, acc = [], 0, 0, 0
    try:
        with gzip.open(path, "rb") as handle:
            for raw in handle:
                acc += len(raw)
                line += 1
                if acc >= chunk_bytes:
                    ranges.append((start, line, acc))
                    start, acc = line, 0
    except (OSError, EOFError) as exc:
        raise HyperofaError(f"{path}: corrupt gzip file ({exc})") from None
    if line > start:
        ranges.append((start, line, acc))
    return ranges


def _table(path: Path):
    import datasets

    builder = "parquet" if path.name.endswith(".parquet") else "json"
    try:
        table = datasets.load_dataset(builder, data_files=[str(path)], split="train")
    except Exception as exc:  # pyarrow/datasets raise many types for a broken file
        raise HyperofaError(f"{path}: cannot read as {builder} ({exc.__class__.__name__})") from None
    if "text" not in table.column_names:
        raise HyperofaError(f"{path}: no 'text' column (columns: {', '.join(table.column_names)})")
    return table


def _row_ranges(path: Path, chunk_bytes: int) -> list[tuple[int, int, int]]:
    rows = _table(path).num_rows
    if rows == 0:
        return []
    size = path.stat().st_size
    per_chunk = max(1, int(rows * chunk_bytes / max(size, 1)))
    return [(a, min(a + per_chunk, rows), size * (min(a + per_chunk, rows) - a) // rows) for a in range(0, rows, per_chunk)]


# --- reading --------------------------------------------------------------------------------------------


def read_unit(unit: Unit, stats: Optional[LineStats] = None) -> Iterator[bytes | str]:
    """The raw lines of one unit, without their ends (bytes for text files, str for tables and the hub); text
    lines end as formats/text.py says, and those ended by `\r` are counted into `stats`."""
    if unit.kind == "bytes":
        with open(unit.path, "rb") as handle:
            handle.seek(unit.start)
            data = handle.read(unit.end - unit.start)
        if stats is not None:
            stats.cr_line_ends += cr_line_ends(data)
        yield from split_lines(data)
    elif unit.kind == "lines":
        try:
            with gzip.open(unit.path, "rb") as handle:
                for i, raw in enumerate(handle):
                    if i >= unit.end:
                        break
                    if i >= unit.start:
                        if stats is not None:
                            stats.cr_line_ends += cr_line_ends(raw)
                        yield from split_lines(raw)
        except (OSError, EOFError) as exc:
            raise HyperofaError(f"{unit.path}: corrupt gzip file ({exc})") from None
    elif unit.kind == "rows":
        table = _table(Path(unit.path))
        step = 10_000
        for a in range(unit.start, unit.end, step):
            for text in table[a : min(a + step, unit.end)]["text"]:
                yield text if text is not None else ""
    elif unit.kind == "hub":
        import datasets

        try:
            stream = datasets.load_dataset(unit.hub_name, unit.lang, split="train", streaming=True)
            for row in stream:
                yield row.get("text") or ""
        except HyperofaError:
            raise
        except Exception as exc:  # network errors surface mid-stream as well
            raise HyperofaError(f"{unit.hub_name}/{unit.lang}: streaming failed ({exc.__class__.__name__})") from None
    else:
        raise ValueError(f"unknown unit kind {unit.kind!r}")


def normalize_line(raw: bytes | str, form: str = "NFC") -> tuple[str, bool]:
    """(normalised sentence, whether invalid UTF-8 was replaced); '' means the line is dropped as empty."""
    invalid = False
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text, invalid = raw.decode("utf-8", errors="replace"), True
    else:
        text = raw
    text = text.strip()
    if text and form != "none" and not text.isascii() and not unicodedata.is_normalized(form, text):
        text = unicodedata.normalize(form, text)
    return text, invalid


def read_unit_sentences(unit: Unit, form: str = "NFC") -> tuple[list[str], LineStats]:
    """Normalised non-empty sentences of a unit, in order, with counts of what was dropped or repaired."""
    stats = LineStats()
    out: list[str] = []
    for raw in read_unit(unit, stats):
        stats.lines += 1
        text, invalid = normalize_line(raw, form)
        stats.invalid_utf8 += invalid
        if text:
            out.append(text)
        else:
            stats.empty += 1
    return out, stats


def iter_sentences(source: LanguageSource, normalization: str = "NFC", limit: Optional[int] = None) -> Iterator[str]:
    """Normalised non-empty sentences of one language in file order (e.g. to learn tokenizer pieces)."""
    if limit is not None and limit <= 0:
        return
    count = 0
    for unit in plan_units([source], chunk_bytes=1 << 62):
        for raw in read_unit(unit):
            text, _ = normalize_line(raw, normalization)
            if text:
                yield text
                count += 1
                if limit is not None and count >= limit:
                    return


# --- samples for the preflight checks -------------------------------------------------------------------------


@dataclass(frozen=True)
class TextSample:
    """Raw text spread over one corpus file, for checks and estimates that must not read the whole file."""

    path: Path
    text: str  # decoded with invalid UTF-8 replaced by U+FFFD, one replacement per bad sequence
    lines: int  # lines the sample holds
    sample_bytes: int  # uncompressed bytes the sample holds
    total_bytes: int  # uncompressed bytes of the whole file (estimated for gzip and tables)


SAMPLE_BYTES = 1 << 18
SAMPLE_WINDOWS = 16


def sample_text(path: str | Path, budget: int = SAMPLE_BYTES) -> TextSample:
    """About `budget` bytes of a corpus file: all of a small plain-text file, else `SAMPLE_WINDOWS` whole-line
    windows spread over it (a file that is text only at its start is still caught); the first `budget`
    uncompressed bytes of a gzip file; the first rows of a parquet/jsonl file."""
    path = Path(path)
    if path.name.endswith(".txt"):
        size = path.stat().st_size
        with open(path, "rb") as handle:
            if size <= budget:
                data = handle.read()
            else:
                window, parts = budget // SAMPLE_WINDOWS, []
                for i in range(SAMPLE_WINDOWS):
                    start = (size - window) * i // (SAMPLE_WINDOWS - 1)
                    handle.seek(start)
                    piece = handle.read(window)
                    if start > 0:
                        piece = piece.partition(b"\n")[2]  # from the first whole line on
                    parts.append(piece.rpartition(b"\n")[0] if b"\n" in piece else piece)
                data = b"\n".join(parts)
        return TextSample(path, data.decode("utf-8", errors="replace"), len(split_lines(data)), len(data), size)
    if path.name.endswith(".txt.gz"):
        try:
            with open(path, "rb") as raw, gzip.open(raw, "rb") as handle:
                data = handle.read(budget)
                whole = not handle.read(1)
                consumed = raw.tell()
        except (OSError, EOFError) as exc:
            raise HyperofaError(f"{path}: corrupt gzip file ({exc})") from None
        total = len(data) if whole else int(len(data) * path.stat().st_size / max(consumed, 1))
        return TextSample(path, data.decode("utf-8", errors="replace"), len(split_lines(data)), len(data), total)
    table = _table(path)
    texts, used = [], 0
    for start in range(0, table.num_rows, 1000):
        for text in table[start : start + 1000]["text"]:
            texts.append(text or "")
            used += len(texts[-1].encode("utf-8")) + 1
        if used >= budget:
            break
    total = int(used * table.num_rows / max(len(texts), 1))
    return TextSample(path, "\n".join(texts), len(texts), used, total)
