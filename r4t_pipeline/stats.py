"""Error bars: every reported mean comes with a bootstrap standard error (R4T and MO-DiT evaluations alike)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def mean_and_error(values: Sequence[float], n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Mean over queries and the bootstrap standard deviation of that mean."""
    values = np.asarray(values, np.float64)
    if len(values) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    boots = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(axis=1)
    return float(values.mean()), float(boots.std())
