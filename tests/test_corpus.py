import gzip
import json

import pytest

from hyperofa_dist.config import CorpusConfig
from hyperofa_dist.formats.corpus import (
    discover,
    iter_sentences,
    normalize_line,
    plan_units,
    read_unit,
    read_unit_sentences,
    sample_text,
)
from hyperofa_dist.errors import HyperofaError


def lines_of(path):
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as handle:
        return handle.read().decode().split("\n")[:-1]


def test_discover_dir_layout(small_corpus):
    sources = discover(CorpusConfig(path=str(small_corpus)))
    assert [s.lang for s in sources] == sorted(s.lang for s in sources)
    assert len(sources) == 6 and {s.lang.split("_")[1] for s in sources} == {"Latn", "Cyrl", "Grek"}
    chosen = discover(CorpusConfig(path=str(small_corpus), languages=["qad_Grek", "qaa_Latn"]))
    assert [s.lang for s in chosen] == ["qaa_Latn", "qad_Grek"]


@pytest.mark.parametrize("chunk_bytes", [1024, 5000, 1 << 30])
def test_units_cover_every_line_once_in_order(small_corpus, chunk_bytes):
    sources = discover(CorpusConfig(path=str(small_corpus)))
    units = plan_units(sources, chunk_bytes)
    for source in sources:
        mine = [u for u in units if u.lang == source.lang]
        assert [u.chunk for u in mine] == list(range(len(mine)))
        got = [x.decode() if isinstance(x, bytes) else x for u in mine for x in read_unit(u)]
        assert got == lines_of(source.files[0])
    if chunk_bytes == 1024:
        big = [u for u in units if u.lang == "qaa_Latn"]
        assert len(big) > 10 and all(u.kind == "bytes" for u in big)
        assert {u.kind for u in units if u.lang == "qab_Cyrl"} == {"lines"}


def test_discover_errors(tmp_path):
    with pytest.raises(HyperofaError, match="corpus directory not found"):
        discover(CorpusConfig(path=str(tmp_path / "absent")))
    (tmp_path / "eng_Latn.txt").write_text("a\n")
    (tmp_path / "english.txt").write_text("b\n")
    with pytest.raises(HyperofaError, match=r"english.txt: name is not a lang_Script code"):
        discover(CorpusConfig(path=str(tmp_path)))
    assert [s.lang for s in discover(CorpusConfig(path=str(tmp_path), languages=["eng_Latn"]))] == ["eng_Latn"]
    with pytest.raises(HyperofaError, match="requested language.*deu_Latn"):
        discover(CorpusConfig(path=str(tmp_path), languages=["eng_Latn", "deu_Latn"]))
    (tmp_path / "english.txt").unlink()
    (tmp_path / "eng_Latn.txt.gz").write_bytes(gzip.compress(b"x\n"))
    with pytest.raises(HyperofaError, match="appears twice"):
        discover(CorpusConfig(path=str(tmp_path)))


def test_empty_language_has_no_units(tmp_path):
    (tmp_path / "eng_Latn.txt").write_text("")
    (tmp_path / "deu_Latn.txt.gz").write_bytes(gzip.compress(b""))
    assert plan_units(discover(CorpusConfig(path=str(tmp_path))), 1024) == []


def test_normalisation_and_invalid_utf8(tmp_path):
    assert normalize_line(b"  caf\xc3\xa9 \r") == ("café", False)
    assert normalize_line("cafe\u0301", "NFC") == ("café", False)
    assert normalize_line("cafe\u0301", "none") == ("cafe\u0301", False)
    assert normalize_line(b"ab\xffcd") == ("ab\ufffdcd", True)
    (tmp_path / "eng_Latn.txt").write_bytes(b"good line\n\xff\xfe bad\n   \n\nlast\n")
    [unit] = plan_units(discover(CorpusConfig(path=str(tmp_path))), 1 << 20)
    sentences, stats = read_unit_sentences(unit)
    assert sentences == ["good line", "\ufffd\ufffd bad", "last"]
    assert (stats.lines, stats.empty, stats.invalid_utf8) == (5, 2, 1)
    assert list(iter_sentences(discover(CorpusConfig(path=str(tmp_path)))[0], limit=2)) == ["good line", "\ufffd\ufffd bad"]


@pytest.mark.parametrize("chunk_bytes", [64, 1 << 20])
def test_cr_and_crlf_end_lines_in_every_text_reader_and_are_counted(tmp_path, chunk_bytes):
    """Issue 24: a file of `\r`-ended lines, or one mixing ends, was read as far fewer sentences, silently."""
    from hyperofa_dist.evaluate.retrieval import read_lines_exact
    from hyperofa_dist.formats.text import count_lines

    words = [f"sentence number {i}" for i in range(30)]
    ends = ["\n", "\r", "\r\n"]
    text = "".join(w + ends[i % 3] for i, w in enumerate(words)) + "no end at all"
    (tmp_path / "eng_Latn.txt").write_bytes(text.encode())
    (tmp_path / "deu_Latn.txt.gz").write_bytes(gzip.compress(text.encode()))
    expected = [*words, "no end at all"]
    for source in discover(CorpusConfig(path=str(tmp_path))):
        units = plan_units([source], chunk_bytes)
        read = [read_unit_sentences(u) for u in units]
        assert [s for sentences, _ in read for s in sentences] == expected, source.lang
        assert sum(stats.lines for _, stats in read) == 31
        assert sum(stats.cr_line_ends for _, stats in read) == 20  # 10 lone \r, 10 \r\n
        assert list(iter_sentences(source)) == expected
        assert count_lines(source.files[0]) == 31
    assert read_lines_exact(tmp_path / "eng_Latn.txt") == expected
    assert sample_text(tmp_path / "eng_Latn.txt").lines == 31


def test_line_ends_cut_between_blocks_count_once():
    from hyperofa_dist.formats.text import count_line_ends, split_lines

    assert count_line_ends([b"a\r", b"\nb\r", b"c"]) == (3, 2)
    assert count_line_ends([b"a\n", b"", b"b"]) == (2, 0)
    assert count_line_ends([b""]) == (0, 0)
    assert split_lines("a\u2028b\x0cc\r\n") == ["a\u2028b\x0cc"]  # only \n, \r\n and \r end a line


def test_glot500_local_layout_parquet_and_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "eng_Latn").mkdir()
    pq.write_table(
        pa.table({"text": [f"sentence {i}" for i in range(50)]}), tmp_path / "eng_Latn" / "a.parquet", row_group_size=10
    )
    (tmp_path / "rus_Cyrl").mkdir()
    (tmp_path / "rus_Cyrl" / "x.jsonl").write_text("".join(json.dumps({"text": f"строка {i}"}) + "\n" for i in range(30)))
    sources = discover(CorpusConfig(path=str(tmp_path), format="glot500_local"))
    assert [s.lang for s in sources] == ["eng_Latn", "rus_Cyrl"]
    units = plan_units(sources, 200)
    eng = [x for u in units if u.lang == "eng_Latn" for x in read_unit(u)]
    assert eng == [f"sentence {i}" for i in range(50)]
    assert [(u.kind, u.start, u.end, u.rows) for u in units if u.lang == "eng_Latn"][:2] == [
        ("row_groups", 0, 1, 10), ("row_groups", 1, 2, 10)
    ]  # a row group of 10 short rows already passes 200 bytes of text
    assert len([u for u in units if u.lang == "rus_Cyrl"]) > 1 and {u.kind for u in units if u.lang == "rus_Cyrl"} == {
        "json_bytes"
    }
    assert [x for u in units if u.lang == "rus_Cyrl" for x in read_unit(u)] == [f"строка {i}" for i in range(30)]
    assert list(iter_sentences(sources[1], limit=3)) == ["строка 0", "строка 1", "строка 2"]
    (tmp_path / "deu_Latn").mkdir()
    (tmp_path / "deu_Latn" / "y.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(HyperofaError, match="no 'text' column"):
        plan_units(discover(CorpusConfig(path=str(tmp_path), format="glot500_local", languages=["deu_Latn"])), 200)


def test_hub_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(HyperofaError, match="corpus.revision is not set"):
        discover(CorpusConfig(format="hub", languages=["eng_Latn"]))
    with pytest.raises(HyperofaError, match=r"cis-lmu/Glot500@refs/convert/parquet: cannot reach the dataset on the HF hub"):
        discover(CorpusConfig(format="hub", languages=["eng_Latn"], revision="refs/convert/parquet"))


def test_glot500_japanese_folder_is_read_as_jpn_jpan(tmp_path):
    from hyperofa_dist.config import load_config
    from hyperofa_dist.formats.corpus import discover

    (tmp_path / "jpn_Japn.txt").write_text("日本語の文です。\n", encoding="utf-8")  # Glot500-c's own name
    (tmp_path / "eng_Latn.txt").write_text("an English line\n", encoding="utf-8")
    for languages in (None, ["jpn_Jpan", "eng_Latn"]):
        corpus = load_config(None, [f"corpus.path={tmp_path}"] + ([f"corpus.languages=[{', '.join(languages)}]"]
                                                                   if languages else [])).corpus
        found = discover(corpus)
        assert [s.lang for s in found] == ["eng_Latn", "jpn_Jpan"] and found[1].files == (tmp_path / "jpn_Japn.txt",)
