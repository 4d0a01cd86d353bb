"""Seeds: every random stream of the system is derived from `run.seed` and named parts, through one mixer."""

from __future__ import annotations

import zlib

import numpy as np


def mix_seed(*parts: int | str) -> int:
    """A 63-bit seed from mixed ints and strings (strings through crc32, stable across processes and runs).

    Streams named by different parts are independent, and a stream does not move when another one is added."""
    ints = [p if isinstance(p, int) else zlib.crc32(p.encode("utf-8")) for p in parts]
    return int(np.random.SeedSequence(ints).generate_state(2, np.uint32).astype(np.uint64) @ [1 << 31, 1]) & (
        (1 << 63) - 1
    )
