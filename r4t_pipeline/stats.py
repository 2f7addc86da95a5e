"""Error bars: every reported mean comes with a bootstrap standard error (R4T and MO-DiT evaluations alike)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def mean_and_error(values: Sequence[float], n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Mean over queries and the bootstrap standard deviation of that mean."""
    values = np.asarray(values, np.float64)
    if len(values) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    boots = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(axis=1)
    return float(values.mean()), float(boots.std())


def defined_means(rows: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Per key, the mean of its finite values over the rows that have it; a key with none is left out (NaN marks a
    value undefined in its row, such as query specificity with one query in the batch)."""
    values: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            values.setdefault(key, [])
            if np.isfinite(value):
                values[key].append(value)
    return {key: float(np.mean(v)) for key, v in values.items() if v}
