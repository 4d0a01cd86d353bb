"""What the rows of the expanded embedding E = F_t P look like, by how they were made (docs/METHOD.md §1.13).

A method can be close to the true coordinates by cosine and still hurt the model at the new tokens' positions when
its rows share one direction: a hypernetwork that regresses toward its mean prediction gives every new row a large
common component, unlike the copied rows. These statistics show that without training anything:

    rows                  how many rows the group has
    norm_mean, norm_sd    mean and population standard deviation of the rows' L2 norms
    mean_norm             the L2 norm of the group's mean row
    mean_share            ||mean row||^2 / mean ||row||^2: the share of the rows' energy in their common direction
                          (0 for rows spread around the origin, 1 for identical rows)
    cosine_to_copy_mean   cosine between the group's mean row and the copied rows' mean row (not for `copy`)

Groups: `copy`, `new` (every row that is not copied), and each other provenance kind present (`hyperofa`, `ofa`,
`mean`, `random`). Rows are computed in chunks, so the full V x D matrix is never held twice.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..method.assemble import COPY, PROVENANCE_NAMES

COPY_GROUP, NEW_GROUP = "copy", "new"
STATS = ("rows", "norm_mean", "norm_sd", "mean_norm", "mean_share", "cosine_to_copy_mean")


class _Sums:
    def __init__(self, dim: int):
        self.n = 0
        self.norm = 0.0
        self.norm2 = 0.0
        self.row = np.zeros(dim, dtype=np.float64)

    def add(self, rows: np.ndarray, norms: np.ndarray) -> None:
        self.n += len(rows)
        self.norm += float(norms.sum())
        self.norm2 += float((norms**2).sum())
        self.row += rows.sum(axis=0)

    def stats(self) -> dict[str, Any]:
        mean_row = self.row / self.n
        norm_mean = self.norm / self.n
        energy = self.norm2 / self.n
        return {
            "rows": self.n,
            "norm_mean": norm_mean,
            "norm_sd": float(np.sqrt(max(energy - norm_mean**2, 0.0))),
            "mean_norm": float(np.linalg.norm(mean_row)),
            "mean_share": float(mean_row @ mean_row / energy) if energy > 0 else 0.0,
        }


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    den = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / den) if den > 0 else 0.0


def row_statistics(
    coordinates: np.ndarray, primitives: np.ndarray, provenance: np.ndarray, chunk: int = 65_536
) -> dict[str, dict[str, Any]]:
    """Statistics (module docstring) of the rows of F_t P per group; groups without rows are left out."""
    p = np.asarray(primitives, dtype=np.float64)
    sums: dict[str, _Sums] = {}
    for start in range(0, len(provenance), chunk):
        rows = np.asarray(coordinates[start : start + chunk], dtype=np.float64) @ p
        norms = np.linalg.norm(rows, axis=1)
        codes = provenance[start : start + chunk]
        for code in np.unique(codes):
            pick = codes == code
            groups = [PROVENANCE_NAMES[int(code)]] + ([NEW_GROUP] if code != COPY else [])
            for group in groups:
                sums.setdefault(group, _Sums(p.shape[1])).add(rows[pick], norms[pick])
    out = {group: s.stats() for group, s in sums.items()}
    if COPY_GROUP in sums:
        copy_mean = sums[COPY_GROUP].row / sums[COPY_GROUP].n
        for group, s in sums.items():
            if group != COPY_GROUP:
                out[group]["cosine_to_copy_mean"] = _cosine(s.row / s.n, copy_mean)
    order = [COPY_GROUP, NEW_GROUP, *PROVENANCE_NAMES]
    return {group: out[group] for group in order if group in out}


def row_metrics(stats: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The statistics as flat MLflow metric names, `rows/<group>/<stat>`."""
    return {f"rows/{group}/{name}": float(value) for group, values in stats.items() for name, value in values.items()}


def describe(stats: dict[str, dict[str, Any]]) -> str:
    """One phrase for the stage's closing line: the new rows against the copied rows."""
    new, copy = stats.get(NEW_GROUP), stats.get(COPY_GROUP)
    if new is None:
        return ""
    text = (f"new rows: norm {new['norm_mean']:.3g} ± {new['norm_sd']:.3g}, mean row norm {new['mean_norm']:.3g}")
    if copy is not None:
        text += (f", cosine to the copied mean {new['cosine_to_copy_mean']:.3g} (copied rows: norm "
                 f"{copy['norm_mean']:.3g} ± {copy['norm_sd']:.3g}, mean row norm {copy['mean_norm']:.3g})")
    return text
