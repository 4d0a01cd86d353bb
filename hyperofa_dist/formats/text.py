"""What a line of text is, for every reader of the user's text files (corpus, parallel and tagged evaluation
data, the parallel corpus of the vectors stage's preflight).

A line ends at `\\n`, at `\\r\\n`, or at a lone `\\r` (old Mac files, or files pasted together from several
systems). Without the last rule a file of `\\r`-ended lines is read as a few huge "sentences" and a mixed file
silently loses lines. Nothing else ends a line: Python's `str.splitlines` also splits at `\\v`, `\\f`, `\\x1c`-`\\x1e`,
`\\x85`, U+2028 and U+2029, which here are characters inside a sentence. Readers count the lines that ended in `\\r`
(`cr_line_ends`) and report the count, so a file from another system is visible, not silently repaired.
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path
from typing import Sequence, TypeVar

from ..errors import HyperofaError

Text = TypeVar("Text", str, bytes)

LINE_ENDS = "\\n, \\r\\n, \\r"  # the rule above, recorded in the prepare stage's inputs
_ENDS = {bytes: re.compile(rb"\r\n?|\n"), str: re.compile(r"\r\n?|\n")}


def split_lines(text: Text) -> list[Text]:
    """The lines of `text` without their ends; a last line without an end counts, an empty text has none."""
    lines = _ENDS[type(text)].split(text)
    if lines and not lines[-1]:
        lines.pop()
    return lines


def cr_line_ends(text: str | bytes) -> int:
    """Lines of `text` that end in `\\r` or `\\r\\n` (every `\\r` ends a line)."""
    return text.count(b"\r" if isinstance(text, bytes) else "\r")


def count_line_ends(blocks) -> tuple[int, int]:
    """(lines, lines ending in `\\r` or `\\r\\n`) of a text read as consecutive byte blocks: a `\\r\\n` cut between
    two blocks counts once, a last line without an end counts."""
    lines = cr = 0
    previous = b""
    for block in blocks:
        if not block:
            continue
        cr += block.count(b"\r")
        lines += block.count(b"\n") + block.count(b"\r") - block.count(b"\r\n")
        if previous == b"\r" and block[:1] == b"\n":
            lines -= 1
        previous = block[-1:]
    return lines + (previous not in (b"", b"\n", b"\r")), cr


# --- preflight: line counts ----------------------------------------------------------------------------------


def count_lines(path: Path) -> int:
    """Lines of a text file (`.gz` read through gzip), ended as formats/text.py says; a last line without an end
    counts."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            lines, _ = count_line_ends(iter(lambda: handle.read(1 << 20), b""))
    except (OSError, EOFError) as exc:
        raise HyperofaError(f"{path}: cannot read ({exc})") from None
    return lines


def parallel_corpus(files: Sequence[tuple[str, Path]], prefix_aligned: bool) -> dict[str, int]:
    """Line i of every file must be translations, so every file has the same number of lines (unless
    `vectors.train.prefix_aligned` says shorter files are translations of the first lines). Returns the counts."""
    counts = {path.name: count_lines(path) for _, path in files}
    if not prefix_aligned and len(set(counts.values())) > 1:
        short = min(counts, key=lambda n: (counts[n], n))
        long = max(counts, key=lambda n: (counts[n], n))
        directory = files[0][1].parent
        raise HyperofaError(
            f"{directory}: parallel corpus is misaligned: {short} has {counts[short]} lines, {long} has "
            f"{counts[long]} (line i of every file must be translations; set vectors.train.prefix_aligned=true if "
            "shorter files translate the first lines of the longer ones)"
        )
    return counts
