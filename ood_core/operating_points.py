"""Operating points of a run, as a review reads them: each score's threshold at a chosen InD
acceptance and what it then rejects of each OoD set, in counts with intervals.

Conventions: a sample is **rejected** (flagged OoD) when its confidence is ``<= threshold``; the
threshold of a score is :func:`ood_core.metrics.threshold_for_acceptance` of its InD
confidences (the largest that accepts at least ``acceptance`` of them). Rates come with Wilson
score intervals (95 % by default: z = 1.96), which stay inside [0, 1] and are honest at 0 or n
successes. With ``held_out=True`` the threshold is set on a seeded random half of the InD test
samples and the InD acceptance is measured on the other half (the acceptance a deployment would
see), instead of on the very samples that set it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from ood_core.metrics import confusion, threshold_for_acceptance

COLUMNS = [
    "score",
    "threshold",
    "InD accepted",
    "InD accepted (%)",
    "OoD set",
    "OoD rejected",
    "OoD rejected (%)",
    "95% interval (%)",
]
"""Columns of :func:`operating_point_table` (one row per score and OoD set)."""


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion ``k / n`` (``(nan, nan)`` when ``n == 0``)."""
    if n <= 0:
        return math.nan, math.nan
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint halves of ``range(n)`` drawn with ``seed``: (sets the threshold, measures)."""
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[: n // 2]), np.sort(order[n // 2 :])


def operating_point_table(
    score_names: Sequence[str],
    confs_ind: Sequence[Any],
    confs_oods: Sequence[Sequence[Any]],
    ood_titles: Sequence[str],
    acceptance: float = 0.95,
    held_out: bool = False,
    seed: int = 0,
    z: float = 1.96,
) -> pd.DataFrame:
    """:data:`COLUMNS`, one row per (score, OoD set): ``confs_ind[i]`` are score ``i``'s InD
    confidences, ``confs_oods[j][i]`` its confidences on OoD set ``j``. Counts read ``"n of
    N"``; percentages are of the samples measured (the held-out half of InD when
    ``held_out``)."""
    if not 0.0 < acceptance <= 1.0:
        raise ValueError(f"acceptance must be in (0, 1], got {acceptance!r}")
    rows = []
    for i, name in enumerate(score_names):
        ind = np.asarray(confs_ind[i], dtype=np.float64).ravel()
        if held_out:
            if len(ind) < 2:  # noqa: PLR2004
                raise ValueError("held_out needs at least 2 InD samples to split")
            setting, measured = _split(len(ind), seed)
            threshold = threshold_for_acceptance(ind[setting], acceptance)
            ind = ind[measured]
        else:
            threshold = threshold_for_acceptance(ind, acceptance)
        for j, title in enumerate(ood_titles):
            c = confusion(ind, confs_oods[j][i], threshold)
            n_ind, n_ood = c.ind_accepted + c.ind_rejected, c.ood_accepted + c.ood_rejected
            lo, hi = wilson_interval(c.ood_rejected, n_ood, z)
            rows.append(
                {
                    "score": name,
                    "threshold": threshold,
                    "InD accepted": f"{c.ind_accepted:,} of {n_ind:,}",
                    "InD accepted (%)": 100 * c.ind_accepted / n_ind,
                    "OoD set": title,
                    "OoD rejected": f"{c.ood_rejected:,} of {n_ood:,}",
                    "OoD rejected (%)": 100 * c.ood_rejected / n_ood if n_ood else math.nan,
                    "95% interval (%)": f"{100 * lo:.1f} to {100 * hi:.1f}",
                }
            )
    return pd.DataFrame(rows, columns=COLUMNS)


def undetected(confs_ood: Any, threshold: float, k: int = 8) -> np.ndarray:
    """Indices of at most ``k`` OoD samples accepted as InD at ``threshold`` (confidence above
    it), the most confident first: the images that pass undetected."""
    c = np.asarray(confs_ood, dtype=np.float64).ravel()
    passing = np.flatnonzero(c > threshold)
    return passing[np.argsort(-c[passing], kind="stable")][:k]


__all__ = ["COLUMNS", "operating_point_table", "undetected", "wilson_interval"]
