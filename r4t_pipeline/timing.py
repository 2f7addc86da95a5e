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
    {skipped: reason} for a size whose time, projected linearly from the size before it, exceeds the budget (and
    so every size after it). Linear in the batch size is what an autoregressive method pays; batched ones pay
    less, so the projection errs towards skipping."""
    results: dict[str, dict] = {}
    last: tuple[int, float] | None = None  # the size before: (size, its median seconds, or its projection if skipped)
    for size in sorted(batch_sizes):
        projected = last[1] * size / last[0] if last else 0.0
        if projected > budget_seconds:  # and so is every larger size, projected from this one
            results[str(size)] = {"skipped": f"projected {projected:.0f} s from batch {last[0]}, over the "
                                             f"{budget_seconds:.0f} s budget on this machine"}
            last = (size, projected)
            continue
        batch, totals, parts = make_batch(size), [], {}
        for repeat in range(repeats):
            started = time.perf_counter()
            reported = run(batch, repeat) or {}
            totals.append(time.perf_counter() - started)
            for name, value in reported.items():
                parts.setdefault(name, []).append(value)
            if totals[-1] > budget_seconds:
                break
        results[str(size)] = {"median_seconds": statistics.median(totals), "runs": totals,
                              **{name: statistics.median(values) for name, values in parts.items()},
                              f"ms_per_{unit}": 1000 * statistics.median(totals) / size}
        last = (size, statistics.median(totals))
    return results
