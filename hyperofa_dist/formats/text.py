"""What a line of text is, for every reader of the user's text files (corpus, parallel and tagged evaluation
data, the parallel corpus of the vectors stage's preflight).

A line ends at `\\n`, at `\\r\\n`, or at a lone `\\r` (old Mac files, or files pasted together from several
systems). Without the last rule a file of `\\r`-ended lines is read as a few huge "sentences" and a mixed file
silently loses lines. Nothing else ends a line: Python's `str.splitlines` also splits at `\\v`, `\\f`, `\\x1c`-`\\x1e`,
`\\x85`, U+2028 and U+2029, which here are characters inside a sentence. Readers count the lines that ended in `\\r`
(`cr_line_ends`) and report the count, so a file from another system is visible, not silently repaired.
"""

from __future__ import annotations

import re
from typing import TypeVar

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
