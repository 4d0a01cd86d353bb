"""Stand-ins for Glot500-c as published, from generated text (tests, benchmarks, dry runs).

Both local layouts of the hub dataset, per language folder `<lang_Script>/<split>/`:
- `arrow`: the main branch, as `datasets.save_to_disk` writes it: `data-00000-of-000NN.arrow` (Arrow IPC streams
  of record batches) with `dataset_info.json` and `state.json` listing the files;
- `parquet`: the hub's parquet conversion, `0000.parquet, 0001.parquet, ...`; a language listed in `partial_train`
  gets `partial-train` instead of `train`, as the converter writes for a split too big to convert whole.
Rows carry the sentence in `text` and two extra columns (`source`, `id`), as a reader must ignore them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

from .world import World

LAYOUTS = ("arrow", "parquet")
EXTRA_COLUMNS = ("source", "id")


def standin_texts(
    world: World, sizes: dict[str, int], seed: int = 0, heldout: int = 0, heldout_languages: Iterable[str] = ()
) -> dict[str, dict[str, list[str]]]:
    """Per language, `train` sentences (sizes[lang]) and, for `heldout_languages`, `dev` and `test` sentences
    (`heldout` each, other concepts than the training ones)."""
    with_heldout = set(heldout_languages)
    texts: dict[str, dict[str, list[str]]] = {}
    for index, (lang, n) in enumerate(sorted(sizes.items())):
        concepts = world.concept_sentences(n + 2 * heldout, seed * 1000 + index)
        texts[lang] = {"train": world.render(lang, concepts[:n])}
        if lang in with_heldout and heldout:
            texts[lang]["dev"] = world.render(lang, concepts[n : n + heldout])
            texts[lang]["test"] = world.render(lang, concepts[n + heldout :])
    return texts


def _pieces(rows: Sequence[str], files: int) -> list[Sequence[str]]:
    files = max(1, min(files, len(rows)))
    cuts = [len(rows) * i // files for i in range(files + 1)]
    return [rows[a:b] for a, b in zip(cuts, cuts[1:])]


def _table(rows: Sequence[str], lang: str, first_id: int):
    import pyarrow as pa

    return pa.table(
        {
            "text": pa.array(list(rows), pa.string()),
            "source": pa.array([f"generated-{lang}"] * len(rows), pa.string()),
            "id": pa.array(range(first_id, first_id + len(rows)), pa.int64()),
        }
    )


def _write_arrow_split(folder: Path, rows: Sequence[str], lang: str, files: int, rows_per_group: int) -> None:
    import pyarrow as pa

    names, first = [], 0
    pieces = _pieces(rows, files)
    for index, piece in enumerate(pieces):
        name = f"data-{index:05d}-of-{len(pieces):05d}.arrow"
        table = _table(piece, lang, first)
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            for batch in table.to_batches(max_chunksize=rows_per_group):
                writer.write_batch(batch)
        names.append(name)
        first += len(piece)
    features = {
        "text": {"dtype": "string", "_type": "Value"},
        "source": {"dtype": "string", "_type": "Value"},
        "id": {"dtype": "int64", "_type": "Value"},
    }
    (folder / "dataset_info.json").write_text(
        json.dumps({"citation": "", "description": "generated stand-in", "features": features}, indent=2)
    )
    state = {
        "_data_files": [{"filename": n} for n in names],
        "_fingerprint": f"standin-{lang}-{len(rows)}",
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": folder.name,
    }
    (folder / "state.json").write_text(json.dumps(state, indent=2))


def _write_parquet_split(
    folder: Path, rows: Sequence[str], lang: str, files: int, rows_per_group: int, first_file: int = 0
) -> None:
    import pyarrow.parquet as pq

    first = 0
    for index, piece in enumerate(_pieces(rows, files), start=first_file):
        pq.write_table(_table(piece, lang, first), folder / f"{index:04d}.parquet", row_group_size=rows_per_group)
        first += len(piece)


def glot500_standin(
    root: str | Path,
    texts: dict[str, dict[str, list[str]]],
    layout: str = "parquet",
    files_per_split: int = 1,
    rows_per_group: int = 1000,
    partial_train: Iterable[str] = (),
    first_file: int = 0,
) -> Path:
    """Write `texts` ({lang: {split: sentences}}) under `root` in one published layout; returns root.

    `first_file` (parquet) numbers the files from there: a large split can be written piece by piece."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}")
    if first_file and layout != "parquet":
        raise ValueError("first_file is for the parquet layout (arrow file names carry the file count)")
    root = Path(root)
    partial = set(partial_train)
    for lang, splits in sorted(texts.items()):
        for split, rows in sorted(splits.items()):
            name = "partial-train" if split == "train" and lang in partial else split
            folder = root / lang / name
            folder.mkdir(parents=True, exist_ok=True)
            if layout == "parquet":
                _write_parquet_split(folder, rows, lang, files_per_split, rows_per_group, first_file)
            else:
                _write_arrow_split(folder, rows, lang, files_per_split, rows_per_group)
    return root


def write_split_txt(root: str | Path, texts: dict[str, dict[str, list[str]]], split: str = "train") -> Path:
    """The same text as a `dir` corpus: `<root>/<lang>.txt`, one sentence per line (the languages with `split`)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for lang, splits in sorted(texts.items()):
        if split in splits:
            (root / f"{lang}.txt").write_bytes(("\n".join(splits[split]) + "\n").encode("utf-8"))
    return root
