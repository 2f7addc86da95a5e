"""Wall-clock timing per batch size with a budget: the one loop behind every latency table (R4T fan-outs, the
MO-DiT generator)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def time_by_batch_size(make_batch: Callable[[int], Any], run: Callable[[Any, int], dict[str, float] | None],
                       batch_sizes: list[int], repeats: int, budget_seconds: float, unit: str) -> dict[str, dict]:
    """Times `run(make_batch(size), repeat)` (the batch is made outside the clock) per repeat and batch size:
    {size: {median_seconds, runs, ms_per_<unit>, and the median of each number `run` returns}}, or
    {skipped: reason} for every size after one run over the budget."""
    results: dict[str, dict] = {}
    over_budget = False
    for size in batch_sizes:
        if over_budget:
            results[str(size)] = {"skipped": f"a smaller batch took over {budget_seconds:.0f} s on this machine"}
            continue
        batch, totals, parts = make_batch(size), [], {}
        for repeat in range(repeats):
            started = time.perf_counter()
            reported = run(batch, repeat) or {}
            totals.append(time.perf_counter() - started)
            for name, value in reported.items():
                parts.setdefault(name, []).append(value)
            if totals[-1] > budget_seconds:
                over_budget = True
                break
        results[str(size)] = {"median_seconds": statistics.median(totals), "runs": totals,
                              **{name: statistics.median(values) for name, values in parts.items()},
                              f"ms_per_{unit}": 1000 * statistics.median(totals) / size}
    return results
