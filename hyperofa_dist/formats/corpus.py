"""Corpus readers: which languages a corpus holds, how to cut them into units of work, how to read a unit.

Three layouts, one interface:
- `dir`: one file per language, `<lang_Script>.txt` or `<lang_Script>.txt.gz`, one sentence per line;
- `glot500_local`: a local copy of Glot500-c, one folder per language holding either split folders as published
  (`<split>/data-00000-of-000NN.arrow` with `dataset_info.json` and `state.json`, as `datasets.save_to_disk`
  writes the main branch: Arrow IPC streams; or `<split>/0000.parquet, 0001.parquet, ...`, the hub's parquet
  conversion) or, flat, parquet/jsonl files or one split saved to disk (`data-*.arrow`); one sentence per row in
  `corpus.text_column`, other columns ignored;
- `hub`: the HF dataset `corpus.hub_name` at the pinned `corpus.revision` (resolved to a commit once), its data
  files of `<lang_Script>/<split>/` read remotely the same way as local ones.

The hub's parquet converter publishes `partial-train` instead of `train` for a language too big to convert whole
(the first part of `train`): asked for `train`, such a language is read from `partial-train`, said on stderr and
recorded (`LanguageSource.split`). `corpus.heldout_split` (dev or test) adds a language's published held-out
split as units of role `heldout`.

A unit is a contiguous piece of one file: a byte range aligned to line starts (plain text, jsonl), a line range
(gzip), a range of parquet row groups or of Arrow record batches (grouped up to about `chunk_bytes` of text; one
large row group or batch is a unit of its own). A task therefore holds at most about one unit, never a language,
and a table unit knows its row count from the file's metadata (`Unit.rows`), so a sampling plan over it needs no
counting pass. Parquet is read by row group with pyarrow, Arrow streams memory-mapped by record batch; nothing is
copied into a cache. Units are planned deterministically from the files alone.
"""

from __future__ import annotations

import collections
import gzip
import json
import sys
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Optional

from ..langcodes import standard_code
from ..errors import HyperofaError
from .text import cr_line_ends, split_lines

if TYPE_CHECKING:  # Ray workers import this module to read units; the config's pydantic models are the driver's
    from ..config import CorpusConfig

TEXT_SUFFIXES = (".txt", ".txt.gz")
TABLE_SUFFIXES = (".parquet", ".jsonl", ".json", ".jsonl.gz", ".json.gz")
ARROW_SUFFIX = ".arrow"
PARQUET_SUFFIX = ".parquet"
# What `datasets.save_to_disk` writes beside the Arrow files of a split: metadata, not text.
SAVED_METADATA = ("dataset_info.json", "state.json")
PARTIAL_TRAIN = "partial-train"
TRAIN, HELDOUT = "train", "heldout"
HF_PREFIX = "hf://"


@dataclass(frozen=True)
class LanguageSource:
    lang: str
    format: str
    files: tuple[Path, ...] = field(default_factory=tuple)  # local data files of the training split, in order
    bytes: int = 0
    hub_name: str = ""
    split: str = ""  # the split folder read ("" for the flat layouts)
    heldout_files: tuple[Path, ...] = field(default_factory=tuple)  # files of corpus.heldout_split, if it has one
    text_column: str = "text"
    revision: str = ""  # hub: the commit every file is read at
    remote_files: tuple[str, ...] = ()  # hub: hf:// paths of the training split
    remote_heldout: tuple[str, ...] = ()  # hub: hf:// paths of the held-out split


@dataclass(frozen=True)
class Unit:
    """A piece of one file: [start, end) in bytes ('bytes', 'json_bytes'), lines ('lines', 'json_lines'), row
    groups ('row_groups') or record batches ('batches'; end -1: to the end of a stream not planned by batch)."""

    lang: str
    chunk: int
    path: str
    kind: str
    start: int
    end: int
    bytes: int
    rows: int = -1  # rows of the unit from the file's metadata; -1 when only reading tells (text, jsonl)
    column: str = "text"
    role: str = TRAIN  # HELDOUT: every sentence is held-out text (corpus.heldout_split)


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


def say(message: str) -> None:
    print(f"hyperofa corpus: {message}", file=sys.stderr, flush=True)


# --- discovery ------------------------------------------------------------------------------------------------


def discover(corpus: CorpusConfig) -> list[LanguageSource]:
    """The corpus's languages, sorted; fatal errors name the offending path."""
    from ..config import LANG_CODE

    if corpus.format == "hub":
        return _discover_hub(corpus)
    if corpus.path is None:
        raise HyperofaError("config key corpus.path is not set (required for corpus.format dir/glot500_local)")
    if corpus.format == "dir" and corpus.heldout_split is not None:
        raise HyperofaError(
            "config key corpus.heldout_split needs split folders (corpus.format glot500_local or hub); a dir corpus "
            "holds out prepare.heldout_fraction of its text"
        )
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
        lang = standard_code(lang) if lang is not None else None  # Glot500-c's jpn_Japn is jpn_Jpan
        if lang is None or not LANG_CODE.match(lang):
            if wanted is not None:
                continue  # an explicit language list selects; other names are not ours to judge
            raise HyperofaError(f"{entry}: name is not a lang_Script code (expected {expected}, e.g. eng_Latn)")
        if wanted is not None and lang not in wanted:
            continue
        if lang in found:
            raise HyperofaError(f"{entry}: language {lang} appears twice in {root}")
        if corpus.format == "dir":
            found[lang] = LanguageSource(lang, "dir", (entry,), entry.stat().st_size)
        else:
            found[lang] = _local_language(entry, lang, corpus)
    if wanted is not None:
        missing = sorted(wanted - set(found))
        if missing:
            raise HyperofaError(f"{root}: requested language(s) not found: {', '.join(missing)}")
    if not found:
        raise HyperofaError(f"{root}: no language files found (expected {TEXT_SUFFIXES} files named lang_Script)")
    return [found[k] for k in sorted(found)]


def _split_files(folder: Path) -> tuple[Path, ...]:
    """The data files of one split folder, in the dataset's order; one kind only (arrow or parquet)."""
    names = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    arrow = [p for p in names if p.name.endswith(ARROW_SUFFIX)]
    parquet = [p for p in names if p.name.endswith(PARQUET_SUFFIX)]
    if arrow and parquet:
        raise HyperofaError(f"{folder}: mixed layout, both .arrow and .parquet files in one split folder")
    if not arrow and not parquet:
        raise HyperofaError(f"{folder}: empty split, no .arrow or .parquet data files")
    if parquet:
        return tuple(sorted(parquet))
    state = folder / "state.json"
    if not state.is_file():
        return tuple(sorted(arrow))
    try:
        listed = [entry["filename"] for entry in json.loads(state.read_text(encoding="utf-8"))["_data_files"]]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise HyperofaError(f"{state}: not a datasets state.json ({exc.__class__.__name__})") from None
    files = tuple(folder / name for name in listed)
    for path in files:
        if not path.is_file():
            raise HyperofaError(f"{path}: listed in state.json but missing")
    extra = sorted(set(arrow) - set(files))
    if extra:
        raise HyperofaError(f"{extra[0]}: an .arrow file that state.json does not list")
    return files


def _local_language(folder: Path, lang: str, corpus: CorpusConfig) -> LanguageSource:
    splits = {p.name: p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")}
    flat = tuple(
        sorted(
            p for p in folder.iterdir()
            if p.is_file() and p.name not in SAVED_METADATA and _lang_of(p.name, (*TABLE_SUFFIXES, ARROW_SUFFIX))
        )
    )
    if splits and flat:
        raise HyperofaError(f"{folder}: mixed layout, both split folders and data files ({flat[0].name})")
    column = corpus.text_column
    if flat:
        if corpus.heldout_split is not None:
            raise HyperofaError(
                f"{folder}: corpus.heldout_split={corpus.heldout_split} but the language folder has no split folders"
            )
        arrow = [p for p in flat if p.name.endswith(ARROW_SUFFIX)]
        if arrow and len(arrow) < len(flat):
            other = next(p for p in flat if not p.name.endswith(ARROW_SUFFIX))
            raise HyperofaError(f"{folder}: mixed layout, both .arrow and other data files ({other.name})")
        if arrow:  # one split saved to disk straight into the language folder
            flat = _split_files(folder)
        return LanguageSource(lang, "glot500_local", flat, sum(f.stat().st_size for f in flat), text_column=column)
    if not splits:
        raise HyperofaError(f"{folder}: no split folders and no parquet or jsonl files in language folder")
    split = _pick_split(folder, lang, set(splits), corpus.split)
    files = _split_files(splits[split])
    heldout: tuple[Path, ...] = ()
    if corpus.heldout_split is not None and corpus.heldout_split in splits:
        heldout = _split_files(splits[corpus.heldout_split])
    return LanguageSource(
        lang, "glot500_local", files, sum(f.stat().st_size for f in files), split=split, heldout_files=heldout,
        text_column=column,
    )


def _pick_split(where: Any, lang: str, available: set[str], wanted: str) -> str:
    if wanted in available:
        return wanted
    if wanted == TRAIN and PARTIAL_TRAIN in available:
        say(f"{lang}: no {TRAIN} split, reading {PARTIAL_TRAIN} (the first part of {TRAIN} that the hub converted)")
        return PARTIAL_TRAIN
    raise HyperofaError(f"{where}: no split {wanted!r} (splits: {', '.join(sorted(available)) or 'none'})")


def _discover_hub(corpus: CorpusConfig) -> list[LanguageSource]:
    """Every language's data files at one commit: the pinned revision is resolved once and read throughout."""
    if corpus.revision is None:
        raise HyperofaError(
            f"config key corpus.revision is not set: pin the revision of {corpus.hub_name} to read (a commit sha, or "
            "a branch such as refs/convert/parquet, resolved to its commit and recorded), so a re-run reads the same data"
        )
    try:
        from huggingface_hub import HfApi

        api = HfApi()
        sha = api.dataset_info(corpus.hub_name, revision=corpus.revision).sha
        paths = [p for p in api.list_repo_files(corpus.hub_name, repo_type="dataset", revision=sha)]
    except Exception as exc:  # huggingface_hub raises connection, offline-mode and not-found errors of many types
        reason = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0][:200]
        raise HyperofaError(
            f"{corpus.hub_name}@{corpus.revision}: cannot reach the dataset on the HF hub ({reason}); download it and "
            "use corpus.format=glot500_local with corpus.path"
        ) from None
    say(f"{corpus.hub_name}: revision {corpus.revision} is commit {sha}")
    return hub_sources(corpus, sha, paths)


def hub_sources(corpus: CorpusConfig, sha: str, paths: Iterable[str]) -> list[LanguageSource]:
    """The languages of a hub dataset from its file list at commit `sha` (`<lang>/<split>/<file>`)."""
    from ..config import LANG_CODE

    by_lang: dict[str, dict[str, list[str]]] = {}
    folder_of: dict[str, str] = {}  # Glot500-c's own folder name (jpn_Japn) of a standard code (jpn_Jpan)
    for path in sorted(paths):
        parts = path.split("/")
        if len(parts) == 3 and LANG_CODE.match(parts[0]) and parts[2].endswith((ARROW_SUFFIX, PARQUET_SUFFIX)):
            lang = standard_code(parts[0])
            folder_of[lang] = parts[0]
            by_lang.setdefault(lang, {}).setdefault(parts[1], []).append(parts[2])
    langs = corpus.languages or sorted(by_lang)
    base = f"{HF_PREFIX}datasets/{corpus.hub_name}@{sha}"
    sources = []
    for lang in sorted(langs):
        splits = by_lang.get(lang)
        if not splits:
            raise HyperofaError(f"{corpus.hub_name}@{sha}: no data files for language {lang}")
        for split, names in splits.items():
            if any(n.endswith(ARROW_SUFFIX) for n in names) and any(n.endswith(PARQUET_SUFFIX) for n in names):
                raise HyperofaError(f"{base}/{lang}/{split}: mixed layout, both .arrow and .parquet files")
        split = _pick_split(f"{base}/{lang}", lang, set(splits), corpus.split)
        held = corpus.heldout_split
        sources.append(
            LanguageSource(
                lang, "hub", (), 0, corpus.hub_name, split=split, text_column=corpus.text_column, revision=sha,
                remote_files=tuple(f"{base}/{folder_of[lang]}/{split}/{n}" for n in splits[split]),
                remote_heldout=tuple(f"{base}/{folder_of[lang]}/{held}/{n}" for n in splits.get(held, [])) if held else (),
            )
        )
    return sources


# --- planning -------------------------------------------------------------------------------------------


def plan_units(sources: Iterable[LanguageSource], chunk_bytes: int, heldout: bool = True) -> list[Unit]:
    """Cut every language into units of about chunk_bytes raw text; an empty language gets no unit.

    A language's units are numbered in file order, its held-out split's units (with `heldout`) after them."""
    units: list[Unit] = []
    for source in sources:
        per_lang: list[tuple[str, str, int, int, int, int, str]] = []
        roles = [(TRAIN, source.files or source.remote_files)]
        if heldout:
            roles.append((HELDOUT, source.heldout_files or source.remote_heldout))
        for role, paths in roles:
            for path in paths:
                per_lang.extend((*piece, role) for piece in _file_units(path, chunk_bytes, source.text_column))
        units.extend(
            Unit(source.lang, i, p, kind, a, b, n, rows, source.text_column, role)
            for i, (p, kind, a, b, n, rows, role) in enumerate(per_lang)
        )
    return units


def _file_units(path: Path | str, chunk_bytes: int, column: str) -> list[tuple[str, str, int, int, int, int]]:
    """(path, kind, start, end, bytes, rows) pieces of one data file."""
    name, where = (path, path) if isinstance(path, str) else (path.name, str(path))
    if name.endswith(".txt"):
        return [(where, "bytes", a, b, b - a, -1) for a, b in _byte_ranges(Path(path), chunk_bytes)]
    if name.endswith(".txt.gz"):
        return [(where, "lines", a, b, n, -1) for a, b, n in _gzip_line_ranges(Path(path), chunk_bytes)]
    if name.endswith((".jsonl", ".json")):
        _check_json_column(Path(path), column)
        return [(where, "json_bytes", a, b, b - a, -1) for a, b in _byte_ranges(Path(path), chunk_bytes)]
    if name.endswith((".jsonl.gz", ".json.gz")):
        _check_json_column(Path(path), column)
        return [(where, "json_lines", a, b, n, -1) for a, b, n in _gzip_line_ranges(Path(path), chunk_bytes)]
    if name.endswith(PARQUET_SUFFIX):
        pieces = _group_pieces(_parquet_pieces(where, column), chunk_bytes)
        return [(where, "row_groups", a, b, n, rows) for a, b, n, rows in pieces]
    if name.endswith(ARROW_SUFFIX):
        if where.startswith(HF_PREFIX):  # a remote stream has no index: planning it by batch would read it all
            return [(where, "batches", 0, -1, 0, -1)]
        pieces = _group_pieces(_arrow_pieces(where, column), chunk_bytes)
        return [(where, "batches", a, b, n, rows) for a, b, n, rows in pieces]
    raise HyperofaError(f"{where}: not a corpus data file (expected .txt, .txt.gz, .jsonl, .parquet or .arrow)")


def _group_pieces(pieces: list[tuple[int, int]], chunk_bytes: int) -> list[tuple[int, int, int, int]]:
    """Consecutive (bytes, rows) pieces (row groups, batches) grouped into [start, end) ranges of about
    chunk_bytes; pieces without rows are skipped over inside a range."""
    ranges, start, acc, rows = [], 0, 0, 0
    for index, (size, n) in enumerate(pieces):
        acc += size
        rows += n
        if acc >= chunk_bytes:
            ranges.append((start, index + 1, acc, rows))
            start, acc, rows = index + 1, 0, 0
    if start < len(pieces) and rows:
        ranges.append((start, len(pieces), acc, rows))
    return [r for r in ranges if r[3]]


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


# --- tables: parquet by row group, Arrow streams by record batch ------------------------------------------------


def _open_binary(path: str):
    """A local path, or an hf:// path read through the hub's filesystem (range requests, nothing cached whole)."""
    if path.startswith(HF_PREFIX):
        from huggingface_hub import HfFileSystem

        return HfFileSystem().open(path[len(HF_PREFIX) :], "rb")
    return open(path, "rb")


def _column_index(schema: Any, column: str, path: str) -> int:
    import pyarrow as pa

    if column not in schema.names:
        raise HyperofaError(f"{path}: no {column!r} column (columns: {', '.join(schema.names)}; corpus.text_column)")
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise HyperofaError(f"{path}: column {column!r} holds {kind}, not text")
    return schema.names.index(column)


def _parquet_file(path: str, handle: Any):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(handle)
    except Exception as exc:  # pyarrow raises several types for a file that is not parquet
        raise HyperofaError(f"{path}: cannot read as parquet ({exc.__class__.__name__}: {str(exc)[:120]})") from None


def _parquet_pieces(path: str, column: str) -> list[tuple[int, int]]:
    with _open_binary(path) as handle:
        meta = _parquet_file(path, handle).metadata
        index = _column_index(meta.schema.to_arrow_schema(), column, path)
        return [
            (meta.row_group(i).column(index).total_uncompressed_size, meta.row_group(i).num_rows)
            for i in range(meta.num_row_groups)
        ]


ARROW_FILE_MAGIC = b"ARROW1"


def _arrow_reader(path: str, source: Any):
    """A reader of an Arrow IPC stream (what `save_to_disk` writes) or IPC file, over a memory map."""
    import pyarrow as pa

    try:
        if source.read(len(ARROW_FILE_MAGIC)) == ARROW_FILE_MAGIC:
            source.seek(0)
            reader = pa.ipc.open_file(source)
            return reader.schema, (reader.get_batch(i) for i in range(reader.num_record_batches))
        source.seek(0)
        reader = pa.ipc.open_stream(source)
        return reader.schema, iter(reader)
    except pa.ArrowInvalid as exc:
        raise HyperofaError(f"{path}: cannot read as an Arrow stream ({str(exc)[:120]})") from None


def _arrow_batches(path: str, column: str) -> Iterator[Any]:
    """The record batches of an Arrow file, zero-copy from a memory map (remote: read as a stream)."""
    import pyarrow as pa

    source = pa.memory_map(path) if not path.startswith(HF_PREFIX) else pa.PythonFile(_open_binary(path), mode="r")
    with source:
        schema, batches = _arrow_reader(path, source)
        index = _column_index(schema, column, path)
        try:
            for batch in batches:
                yield batch.column(index)
        except pa.ArrowInvalid as exc:
            raise HyperofaError(f"{path}: truncated or corrupt Arrow stream ({str(exc)[:120]})") from None


def _arrow_pieces(path: str, column: str) -> list[tuple[int, int]]:
    # Only the batches' headers are read: their bodies stay untouched pages of the map.
    return [(array.nbytes, len(array)) for array in _arrow_batches(path, column)]


def _check_json_column(path: Path, column: str) -> None:
    """The first non-empty row of a JSON-lines file has the text column (a foreign file fails at planning)."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            for raw in handle:
                if raw.strip():
                    _json_text(raw, str(path), column)
                    return
    except (OSError, EOFError) as exc:
        raise HyperofaError(f"{path}: corrupt file ({exc})") from None


def _json_text(raw: bytes, path: str, column: str) -> str:
    try:
        row = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HyperofaError(f"{path}: a line is not JSON ({exc.__class__.__name__}); expected one object per line") from None
    if not isinstance(row, dict) or column not in row:
        keys = ", ".join(row) if isinstance(row, dict) else type(row).__name__
        raise HyperofaError(f"{path}: no {column!r} column (columns: {keys}; corpus.text_column)")
    text = row[column]
    return text if isinstance(text, str) else ""


# --- reading --------------------------------------------------------------------------------------------

ROWS_PER_READ = 8192  # rows decoded to Python at a time: bounds a task's transient memory inside a row group


def read_unit(unit: Unit, stats: Optional[LineStats] = None) -> Iterator[bytes | str]:
    """The raw lines of one unit, without their ends (bytes for text files, str for tables; a null row is '');
    text lines end as formats/text.py says, and those ended by `\r` are counted into `stats`."""
    if unit.kind in ("bytes", "json_bytes"):
        data = _range_bytes(unit)
        if unit.kind == "bytes":
            if stats is not None:
                stats.cr_line_ends += cr_line_ends(data)
            yield from split_lines(data)
        else:
            lines = data.split(b"\n")
            if lines and lines[-1] == b"":
                lines.pop()
            yield from (_json_text(line, unit.path, unit.column) if line.strip() else "" for line in lines)
    elif unit.kind in ("lines", "json_lines"):
        try:
            with gzip.open(unit.path, "rb") as handle:
                for i, raw in enumerate(handle):
                    if i >= unit.end:
                        break
                    if i >= unit.start:
                        if unit.kind == "lines":
                            if stats is not None:
                                stats.cr_line_ends += cr_line_ends(raw)
                            yield from split_lines(raw)
                        else:
                            line = raw.rstrip(b"\n")
                            yield _json_text(line, unit.path, unit.column) if line.strip() else ""
        except (OSError, EOFError) as exc:
            raise HyperofaError(f"{unit.path}: corrupt gzip file ({exc})") from None
    elif unit.kind == "row_groups":
        with _open_binary(unit.path) as handle:
            table = _parquet_file(unit.path, handle)
            _column_index(table.schema_arrow, unit.column, unit.path)
            batches = table.iter_batches(
                batch_size=ROWS_PER_READ, row_groups=range(unit.start, unit.end), columns=[unit.column]
            )
            for batch in batches:
                yield from (text or "" for text in batch.column(0).to_pylist())
    elif unit.kind == "batches":
        for i, array in enumerate(_arrow_batches(unit.path, unit.column)):
            if unit.end >= 0 and i >= unit.end:
                break
            if i >= unit.start:
                for offset in range(0, len(array), ROWS_PER_READ):
                    yield from (text or "" for text in array.slice(offset, ROWS_PER_READ).to_pylist())
    else:
        raise ValueError(f"unknown unit kind {unit.kind!r}")


def _range_bytes(unit: Unit) -> bytes:
    with open(unit.path, "rb") as handle:
        handle.seek(unit.start)
        return handle.read(unit.end - unit.start)


def _clean_text_lines(data: bytes, form: str) -> Optional[list[str]]:
    """The stripped lines of valid UTF-8 text already in normal form `form`, or None (then line by line).

    A newline never combines with its neighbours, so text in normal form has every line in normal form: one
    check of the whole range replaces one per line, the common case of a clean corpus."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if form != "none" and not text.isascii() and not unicodedata.is_normalized(form, text):
        return None
    if "\r" in text:
        lines = split_lines(text)
    else:  # the common case, without the regular expression
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
    return [line.strip() for line in lines]


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


def read_unit_sentences(unit: Unit, form: str = "NFC", keep_empty: bool = False) -> tuple[list[str], LineStats]:
    """Normalised sentences of a unit, in order, with counts of what was dropped or repaired; with `keep_empty`
    an empty line or row stays as '' (one entry per row: a table unit's plan is over its rows)."""
    stats = LineStats()
    if unit.kind == "bytes":
        data = _range_bytes(unit)
        lines = _clean_text_lines(data, form)
        if lines is not None:
            stats.lines = len(lines)
            stats.cr_line_ends = cr_line_ends(data)
            out = lines if keep_empty else [line for line in lines if line]
            stats.empty = len(lines) - (len(out) if not keep_empty else sum(1 for line in lines if line))
            return out, stats
    out = []
    for raw in read_unit(unit, stats):
        stats.lines += 1
        text, invalid = normalize_line(raw, form)
        stats.invalid_utf8 += invalid
        if text:
            out.append(text)
        else:
            stats.empty += 1
            if keep_empty:
                out.append(text)
    return out, stats


def iter_sentences(source: LanguageSource, normalization: str = "NFC", limit: Optional[int] = None) -> Iterator[str]:
    """Normalised non-empty sentences of one language's training split in file order (e.g. to learn pieces)."""
    if limit is not None and limit <= 0:
        return
    count = 0
    for unit in plan_units([source], chunk_bytes=1 << 62, heldout=False):
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


def sample_text(path: str | Path, budget: int = SAMPLE_BYTES, column: str = "text") -> TextSample:
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
    return _table_sample(path, budget, column)


def _table_sample(path: Path, budget: int, column: str) -> TextSample:
    """The first rows of a table file (about `budget` bytes of text), read unit by unit; its total estimated from
    the rows' share of the file's units."""
    units = _file_units(path, max(budget, 1024), column)
    texts, used, unit_bytes = [], 0, 0
    for piece in units:
        unit = Unit("", 0, piece[0], piece[1], piece[2], piece[3], piece[4], piece[5], column)
        unit_bytes += piece[4]
        for raw in read_unit(unit):
            texts.append(raw if isinstance(raw, str) else raw.decode("utf-8", errors="replace"))
            used += len(texts[-1].encode("utf-8")) + 1
        if used >= budget:
            break
    all_bytes = sum(piece[4] for piece in units)
    total = int(used * all_bytes / max(unit_bytes, 1)) if unit_bytes else used
    return TextSample(path, "\n".join(texts), len(texts), used, total)


# --- preflight: the noise check -------------------------------------------------------------------------------


def noise_share(text: str) -> tuple[float, int]:
    """(share of non-whitespace characters that are not letters or combining marks, characters counted).

    Invalid UTF-8 (U+FFFD after decoding), control bytes, symbols, digits and punctuation all count as noise;
    real text in any script is mostly letters and marks (the generated worlds' 16 scripts: 1.5-3 %), random
    bytes are about 75 % noise."""
    noise = counted = 0
    for char, n in collections.Counter(text).items():
        if char.isspace():
            continue
        counted += n
        if unicodedata.category(char)[0] not in "LM":
            noise += n
    return (noise / counted if counted else 0.0), counted


MIN_JUDGED_CHARS = 64  # a file with less text than this is too small to call garbage


def checked_samples(sources: Iterable[LanguageSource], max_share: float) -> dict[str, list[TextSample]]:
    """A sample of every file of every language (hub languages are not sampled); refuses a file whose sample is
    more than `max_share` noise (`corpus.max_noise_share`). Returns the samples, for estimates."""
    samples: dict[str, list[TextSample]] = {}
    for source in sources:
        for path in source.files:
            sample = sample_text(path, column=source.text_column)
            samples.setdefault(source.lang, []).append(sample)
            share, counted = noise_share(sample.text)
            if max_share < 1.0 and counted >= MIN_JUDGED_CHARS and share > max_share:
                raise HyperofaError(
                    f"{path}: {share:.0%} of the sampled text of {source.lang} is invalid UTF-8 or not letters "
                    f"(limit corpus.max_noise_share={max_share:g}); a binary or non-text file? fix or remove it, or "
                    "raise corpus.max_noise_share"
                )
    return samples
