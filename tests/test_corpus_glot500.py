"""Glot500-c as published, read from generated stand-ins in both layouts (no Ray: the readers and the planner).

The stand-ins (`synthetic.glot500_standin`) have `partial-train` for the largest language, `dev`/`test` splits
for two languages, several files per split, several row groups / record batches per file and extra columns.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hyperofa_dist import synthetic
from hyperofa_dist.config import CorpusConfig
from hyperofa_dist.errors import HyperofaError
from hyperofa_dist.formats.corpus import (
    HELDOUT,
    TRAIN,
    discover,
    hub_sources,
    iter_sentences,
    plan_units,
    read_unit,
    read_unit_sentences,
    sample_text,
)

ROWS_PER_GROUP = 200


@pytest.fixture(scope="module")
def texts(world):
    codes = [lang.code for lang in world.languages[:3]]
    sizes = dict(zip(codes, (2400, 700, 90)))
    return synthetic.standin_texts(world, sizes, seed=1, heldout=60, heldout_languages=codes[:2])


@pytest.fixture(scope="module", params=synthetic.glot500.LAYOUTS)
def standin(request, tmp_path_factory, texts):
    root = tmp_path_factory.mktemp(f"glot500_{request.param}")
    largest = max(texts, key=lambda lang: len(texts[lang]["train"]))
    synthetic.glot500_standin(
        root, texts, request.param, files_per_split=2, rows_per_group=ROWS_PER_GROUP, partial_train=[largest]
    )
    return request.param, root, largest


def local(root, **keys) -> CorpusConfig:
    return CorpusConfig(path=str(root), format="glot500_local", **keys)


def test_both_layouts_read_back_the_text_in_order_by_row_group_or_batch(standin, texts, capfd):
    layout, root, largest = standin
    sources = discover(local(root, heldout_split="dev"))
    assert f"{largest}: no train split, reading partial-train" in capfd.readouterr().err
    assert {s.lang: s.split for s in sources} == {lang: "partial-train" if lang == largest else "train" for lang in texts}
    assert {s.lang: len(s.heldout_files) for s in sources} == {
        lang: 2 if "dev" in texts[lang] else 0 for lang in texts
    }
    units = plan_units(sources, chunk_bytes=1)  # every row group / batch a unit of its own
    kind = {"arrow": "batches", "parquet": "row_groups"}[layout]
    assert {u.kind for u in units} == {kind}
    for lang in texts:
        mine = [u for u in units if u.lang == lang]
        assert [u.chunk for u in mine] == list(range(len(mine)))
        train = [u for u in mine if u.role == TRAIN]
        assert [x for u in train for x in read_unit(u)] == texts[lang]["train"]  # extra columns ignored
        assert all(u.rows <= ROWS_PER_GROUP and u.end - u.start == 1 for u in mine)
        assert sum(u.rows for u in train) == len(texts[lang]["train"])  # rows from metadata, nothing read
        held = [u for u in mine if u.role == HELDOUT]
        assert [x for u in held for x in read_unit(u)] == texts[lang].get("dev", [])
        assert max(u.chunk for u in train) < min((u.chunk for u in held), default=10**9)
    # Grouped units: consecutive row groups up to chunk_bytes, never across files, still every row once.
    grouped = plan_units(sources, chunk_bytes=30_000, heldout=False)
    big = [u for u in grouped if u.lang == largest]
    assert 2 <= len(big) < len([u for u in units if u.lang == largest and u.role == TRAIN])
    assert max(u.end - u.start for u in big) > 1
    assert [x for u in big for x in read_unit(u)] == texts[largest]["train"]
    assert list(iter_sentences(sources[0], limit=5)) == texts[sources[0].lang]["train"][:5]


def test_split_and_text_column_keys(standin, texts):
    _, root, largest = standin
    small = min(texts, key=lambda lang: len(texts[lang]["train"]))
    with_test = sorted(lang for lang in texts if "test" in texts[lang])
    sources = discover(local(root, split="test", languages=with_test))
    units = plan_units(sources, 1 << 30)
    got = {lang: [x for u in units if u.lang == lang for x in read_unit(u)] for lang in with_test}
    assert got == {lang: texts[lang]["test"] for lang in with_test}
    with pytest.raises(HyperofaError, match=rf"{small}: no split 'test' \(splits: train\)"):
        discover(local(root, split="test"))
    [source] = discover(local(root, text_column="source", languages=[small]))
    assert {x for u in plan_units([source], 1 << 30) for x in read_unit(u)} == {f"generated-{small}"}
    with pytest.raises(HyperofaError, match=r"data-00000-of-00002.arrow|0000.parquet"):
        plan_units(discover(local(root, text_column="id", languages=[small])), 1 << 30)
    with pytest.raises(HyperofaError, match=r"no 'body' column \(columns: text, source, id"):
        plan_units(discover(local(root, text_column="body", languages=[small])), 1 << 30)


def test_sample_of_a_table_file_is_its_first_rows_and_estimates_the_whole(standin, texts):
    _, root, largest = standin
    [source] = discover(local(root, languages=[largest]))
    sample = sample_text(source.files[0], budget=4000)
    rows = texts[largest]["train"]
    assert sample.text.split("\n") == rows[: sample.lines] and sample.sample_bytes >= 4000
    whole = sum(len(r.encode()) + 1 for r in rows[: len(rows) // 2])
    assert 0.6 * whole < sample.total_bytes < 1.6 * whole


def test_empty_and_null_rows_keep_their_place_in_a_table_unit(tmp_path):
    (tmp_path / "eng_Latn" / "train").mkdir(parents=True)
    table = pa.table({"text": ["one", None, "  ", "caf\u0065\u0301", "two"], "n": [1, 2, 3, 4, 5]})
    pq.write_table(table, tmp_path / "eng_Latn" / "train" / "0000.parquet")
    [unit] = plan_units(discover(local(tmp_path)), 1 << 20)
    assert unit.rows == 5
    rows, stats = read_unit_sentences(unit, keep_empty=True)
    assert rows == ["one", "", "", "café", "two"] and (stats.lines, stats.empty) == (5, 2)
    assert read_unit_sentences(unit)[0] == ["one", "café", "two"]


def _arrow_stream(path, table):
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda d: (d / "train").mkdir(), r"eng_Latn/train: empty split, no \.arrow or \.parquet data files"),
        (
            lambda d: ((d / "train").mkdir(), pq.write_table(pa.table({"text": ["a"]}), d / "train" / "0000.parquet"),
                       _arrow_stream(d / "train" / "data-00000-of-00001.arrow", pa.table({"text": ["a"]}))),
            r"eng_Latn/train: mixed layout, both \.arrow and \.parquet",
        ),
        (
            lambda d: ((d / "train").mkdir(), pq.write_table(pa.table({"text": ["a"]}), d / "a.parquet")),
            r"eng_Latn: mixed layout, both split folders and data files \(a\.parquet\)",
        ),
        (
            lambda d: ((d / "train").mkdir(), pq.write_table(pa.table({"body": ["a"]}), d / "train" / "0000.parquet")),
            r"eng_Latn/train/0000\.parquet: no 'text' column \(columns: body",
        ),
        (
            lambda d: ((d / "train").mkdir(), _arrow_stream(d / "train" / "data-00000-of-00001.arrow",
                                                             pa.table({"content": ["a"]}))),
            r"data-00000-of-00001\.arrow: no 'text' column \(columns: content",
        ),
        (
            lambda d: ((d / "train").mkdir(), (d / "train" / "data-00000-of-00001.arrow").write_bytes(b"\x00" * 64)),
            r"data-00000-of-00001\.arrow: cannot read as an Arrow stream",
        ),
        (
            lambda d: ((d / "train").mkdir(), (d / "train" / "0000.parquet").write_bytes(b"PAR1 not really")),
            r"train/0000\.parquet: cannot read as parquet",
        ),
        (
            lambda d: ((d / "train").mkdir(), _arrow_stream(d / "train" / "data-00000-of-00002.arrow",
                                                             pa.table({"text": ["a"]})),
                       (d / "train" / "state.json").write_text(json.dumps({"_data_files": [
                           {"filename": "data-00000-of-00002.arrow"}, {"filename": "data-00001-of-00002.arrow"}]}))),
            r"data-00001-of-00002\.arrow: listed in state\.json but missing",
        ),
        (lambda d: (d / "notes.md").write_text("x"), r"eng_Latn: no split folders and no parquet or jsonl files"),
    ],
    ids=["empty-split", "mixed-split", "mixed-folder", "no-text-parquet", "no-text-arrow", "not-arrow",
         "not-parquet", "state-missing-file", "nothing"],
)
def test_bad_layouts_are_one_line_errors_naming_the_file(tmp_path, build, message):
    (tmp_path / "eng_Latn").mkdir()
    build(tmp_path / "eng_Latn")
    with pytest.raises(HyperofaError, match=message) as caught:
        plan_units(discover(local(tmp_path)), 1 << 20)
    assert "\n" not in str(caught.value)


def test_heldout_split_needs_split_folders(tmp_path):
    (tmp_path / "eng_Latn.txt").write_text("a\n")
    with pytest.raises(HyperofaError, match="corpus.heldout_split needs split folders"):
        discover(CorpusConfig(path=str(tmp_path), heldout_split="dev"))
    with pytest.raises(ValueError, match="is the training split"):
        CorpusConfig(split="dev", heldout_split="dev")


def test_hub_files_at_a_commit_make_the_same_sources_without_the_network(capfd):
    sha = "a" * 40
    paths = [
        "README.md", "eng_Latn/partial-train/0000.parquet", "eng_Latn/partial-train/0001.parquet",
        "eng_Latn/dev/0000.parquet", "fry_Latn/train/0000.parquet", "fry_Latn/test/0000.parquet",
        "kab_Latn/train/0000.parquet", "kab_Latn/train/data-00000-of-00001.arrow",
    ]
    corpus = CorpusConfig(format="hub", revision="refs/convert/parquet", heldout_split="dev",
                          languages=["fry_Latn", "eng_Latn"])
    eng, fry = hub_sources(corpus, sha, paths)
    assert "eng_Latn: no train split, reading partial-train" in capfd.readouterr().err
    base = f"hf://datasets/cis-lmu/Glot500@{sha}"
    assert eng.split == "partial-train" and eng.revision == sha
    assert eng.remote_files == (f"{base}/eng_Latn/partial-train/0000.parquet", f"{base}/eng_Latn/partial-train/0001.parquet")
    assert eng.remote_heldout == (f"{base}/eng_Latn/dev/0000.parquet",) and fry.remote_heldout == ()
    with pytest.raises(HyperofaError, match="kab_Latn/train: mixed layout"):
        hub_sources(corpus.model_copy(update={"languages": ["kab_Latn"]}), sha, paths)
    with pytest.raises(HyperofaError, match="no data files for language deu_Latn"):
        hub_sources(corpus.model_copy(update={"languages": ["deu_Latn"]}), sha, paths)


def test_one_split_saved_to_disk_straight_into_the_language_folder(tmp_path, texts):
    lang = sorted(texts)[1]
    nested, root = tmp_path / "nested", tmp_path / "corpus"
    synthetic.glot500_standin(nested, {lang: {"train": texts[lang]["train"]}}, "arrow", files_per_split=2,
                              rows_per_group=ROWS_PER_GROUP)
    root.mkdir()
    (nested / lang / "train").rename(root / lang)  # <lang>/data-*.arrow, state.json, dataset_info.json
    [source] = discover(local(root))
    assert [f.name for f in source.files] == ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]
    assert [x for u in plan_units([source], 1 << 20) for x in read_unit(u)] == texts[lang]["train"]
    pq.write_table(pa.table({"text": ["a"]}), root / lang / "extra.parquet")
    with pytest.raises(HyperofaError, match=r"mixed layout, both \.arrow and other data files \(extra\.parquet\)"):
        discover(local(root))
