"""Build a line-aligned multilingual corpus from the Universal Declaration of Human Rights (NLTK's `udhr2` corpus)
for the real-text check of docs/METHOD.md §3.11. Nothing here is downloaded: point it at an unpacked `udhr2/`
folder (the `packages/corpora/udhr2.zip` of the public nltk_data repository).

    python checks/udhr_corpus.py UDHR2_DIR OUT_DIR [--min-units 40]

Each translation is cut at its 30 article headings (a short line holding the article's number, found in order
1..30); a language whose headings are not all found is left out. The preamble and each article are then cut into
the English text's paragraphs: where a language has as many paragraphs in that part as English, line i of every
output file is paragraph i; where it has not, the part is one line followed by empty lines, so the files stay
aligned line for line (an empty line has no words and joins nothing). Output: `<iso>_<Script>.txt` per language,
the script being the most frequent Unicode script of its letters; `eng_Latn.txt` is among them. Prints one JSON
line: languages kept and left out, aligned units, and lines per file.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import unicodedata
from collections import Counter
from pathlib import Path

NUMBER = re.compile(r"\d{1,2}")
ISO = re.compile(r"[a-z]{3}")
ARTICLES = 30
SCRIPTS = {"LATIN": "Latn", "CYRILLIC": "Cyrl", "GREEK": "Grek", "ARABIC": "Arab", "HEBREW": "Hebr",
           "DEVANAGARI": "Deva", "BENGALI": "Beng", "GURMUKHI": "Guru", "GUJARATI": "Gujr", "ORIYA": "Orya",
           "TAMIL": "Taml", "TELUGU": "Telu", "KANNADA": "Knda", "MALAYALAM": "Mlym", "SINHALA": "Sinh",
           "THAI": "Thai", "LAO": "Laoo", "TIBETAN": "Tibt", "MYANMAR": "Mymr", "GEORGIAN": "Geor",
           "ARMENIAN": "Armn", "ETHIOPIC": "Ethi", "HANGUL": "Hang", "CJK": "Hani", "HIRAGANA": "Jpan",
           "KATAKANA": "Jpan", "KHMER": "Khmr", "MONGOLIAN": "Mong", "CHEROKEE": "Cher", "CANADIAN": "Cans",
           "VAI": "Vaii", "TIFINAGH": "Tfng", "SYRIAC": "Syrc", "THAANA": "Thaa", "YI": "Yiii"}


def script_of(text: str) -> str:
    counts = Counter(unicodedata.name(ch, "?").split()[0] for ch in text if ch.isalpha())
    for name, _ in counts.most_common():
        if name in SCRIPTS:
            return SCRIPTS[name]
    return "Zyyy"


def parts(path: Path) -> list[list[str]] | None:
    """[preamble, article 1, ..., article 30], each a list of non-empty paragraphs; None without all headings."""
    lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    heads, want = [], 1
    for i, line in enumerate(lines):
        numbers = NUMBER.findall(line)
        if 0 < len(line.split()) <= 4 and len(numbers) == 1 and int(numbers[0]) == want:
            heads.append(i)
            want += 1
    if want != ARTICLES + 1:
        return None
    spans = [(1, heads[0])] + list(zip([h + 1 for h in heads], heads[1:] + [len(lines)]))  # line 0: the title
    return [[p for p in lines[a:b] if p] for a, b in spans]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("udhr2", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--min-units", type=int, default=40, help="leave out languages with fewer non-empty lines")
    args = ap.parse_args(argv)
    found = {p.stem: parts(p) for p in sorted(args.udhr2.glob("*.txt")) if ISO.fullmatch(p.stem)}
    english = found.get("eng")
    if english is None:
        print(f"{args.udhr2}: no eng.txt with its 30 article headings", file=sys.stderr)
        return 2
    shape = [len(part) for part in english]
    args.out.mkdir(parents=True, exist_ok=True)
    kept, left_out = {}, sorted(iso for iso, p in found.items() if p is None)
    for iso, language in sorted(found.items()):
        if language is None:
            continue
        lines: list[str] = []
        for part, n in zip(language, shape):
            lines += part if len(part) == n else [" ".join(part)] + [""] * (n - 1)
        if sum(1 for line in lines if line) < args.min_units:
            left_out.append(iso)
            continue
        name = f"{iso}_{script_of(' '.join(lines))}.txt"
        (args.out / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
        kept[iso] = name
    print(json.dumps({"languages": len(kept), "left_out": sorted(left_out), "units": sum(shape),
                      "scripts": dict(Counter(n.split("_")[1][:4] for n in kept.values()))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
