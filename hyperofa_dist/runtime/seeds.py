"""Seeds: every random stream of the system is derived from `run.seed` and named parts, through one mixer.

A stream is named by what it is for and where it runs (`mix_seed(seed, "dropout", rank, step)`), so streams are
independent, a resumed run can rebuild any of them from its parts alone, and the same name gives the same stream
in every stage: the held-out masks of `evaluate` are those of the pretraining job's evaluations.

One derivation is older than this module and kept as it is: prepare's sentence selection per chunk
(`data_prep.prepare.sampling.chunk_rng`), so that corpora prepared by earlier versions keep their held-out split.
"""

from __future__ import annotations

import zlib

import numpy as np

HELDOUT = "heldout"  # the masks of held-out MLM evaluation (pretraining job and evaluate alike)


def mix_seed(*parts: int | str) -> int:
    """A 63-bit seed from mixed ints and strings (strings through crc32, stable across processes and runs).

    Streams named by different parts are independent, and a stream does not move when another one is added."""
    ints = [p if isinstance(p, int) else zlib.crc32(p.encode("utf-8")) for p in parts]
    return int(np.random.SeedSequence(ints).generate_state(2, np.uint32).astype(np.uint64) @ [1 << 31, 1]) & (
        (1 << 63) - 1
    )


def generator(*parts: int | str) -> np.random.Generator:
    """A numpy generator for the stream named by `parts`."""
    return np.random.default_rng(mix_seed(*parts))
