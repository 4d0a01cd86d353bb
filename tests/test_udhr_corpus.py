"""checks/udhr_corpus.py: the real-text check's corpus builder, on hand-made translations."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "checks" / "udhr_corpus.py"


def _module():
    spec = importlib.util.spec_from_file_location("udhr_corpus", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(path: Path, heading: str, paragraphs: dict[int, list[str]]) -> None:
    lines = ["Title", "Preamble", *paragraphs[0]]
    for n in range(1, 31):
        lines += ["", f"{heading} {n}", *paragraphs.get(n, [f"{heading.lower()} text {n}"])]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_translations_are_aligned_paragraph_by_paragraph(tmp_path, capsys):
    src, out = tmp_path / "udhr2", tmp_path / "out"
    src.mkdir()
    _write(src / "eng.txt", "Article", {0: ["whereas one", "whereas two"], 3: ["first", "second"]})
    _write(src / "rus.txt", "Статья", {0: ["во-первых", "во-вторых"], 3: ["только одно"]})  # article 3: 1 of 2
    (src / "xyz.txt").write_text("no headings at all\n", encoding="utf-8")
    (src / "eng_1.txt").write_text("not an ISO code\n", encoding="utf-8")
    assert _module().main([str(src), str(out), "--min-units", "5"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["languages"] == 2 and report["left_out"] == ["xyz"] and report["units"] == 3 + 2 + 29  # preamble heading + 2, article 3: 2, the rest 1
    assert sorted(p.name for p in out.iterdir()) == ["eng_Latn.txt", "rus_Cyrl.txt"]
    eng = (out / "eng_Latn.txt").read_text(encoding="utf-8").splitlines()
    rus = (out / "rus_Cyrl.txt").read_text(encoding="utf-8").splitlines()
    assert len(eng) == len(rus) == 34
    assert (eng[1], rus[1]) == ("whereas one", "во-первых")  # the preamble's paragraphs line up
    assert (eng[5], eng[6], rus[5], rus[6]) == ("first", "second", "только одно", "")  # unequal: one line, then empty
    assert (eng[-1], rus[-1]) == ("article text 30", "статья text 30")
