"""One language identifier for the user, mapped to each benchmark's own codes.

`evaluate.languages` takes corpus codes (`deu_Latn`, what prepare, the held-out shards and Glot500-style benchmark
files use). Other benchmarks name languages their own way: XTREME/LASER Tatoeba files use the ISO 639-3 code alone
(`tatoeba.deu-eng.deu`). Each task resolves the requested codes against the codes its data has; results are
reported under the requested code, so `srt.deu_Latn.top10` and `mlm.deu_Latn.loss` line up. A benchmark's own
code is accepted too (`deu` finds `deu_Latn` shards when that is the only script of `deu`).
"""

from __future__ import annotations

from typing import Iterable, Sequence


def iso_of(code: str) -> str:
    """`deu_Latn` -> `deu`; a code without a script stays as it is."""
    return code.split("_", 1)[0]


def resolve(requested: Sequence[str], available: Iterable[str], missing: str) -> tuple[dict[str, str], dict[str, str]]:
    """({requested code: the data's code}, {requested code: why it has no data}), in the order requested.

    A code is found as written first; else `xxx_Scpt` finds the data's `xxx`, and `xxx` finds the data's one
    `xxx_Scpt` (several scripts are ambiguous: the user must name one). Two requested codes that find the same
    data (`deu` and `deu_Latn`) are evaluated once, under the first. `missing` is the reason for a code not found.
    """
    available = sorted(set(available))
    found: dict[str, str] = {}
    skipped: dict[str, str] = {}
    taken: dict[str, str] = {}
    for code in requested:
        if code in found or code in skipped:
            continue
        if code in available:
            match = code
        elif "_" in code and iso_of(code) in available:
            match = iso_of(code)
        else:
            scripts = [a for a in available if "_" in a and iso_of(a) == code]
            if len(scripts) > 1:
                skipped[code] = f"ambiguous: the data has {', '.join(scripts)}; name one"
                continue
            if not scripts:
                skipped[code] = missing
                continue
            match = scripts[0]
        if match in taken:
            skipped[code] = f"the same data as {taken[match]}"
            continue
        taken[match] = code
        found[code] = match
    return found, skipped
