"""Fan-out latency benchmark (SPEC §7): wall-clock time per batch for every method, in one process on
one machine; warm-up excluded, median over repeats. The diffusion retriever runs with its configured sampler
(the evaluated one) and with the paper's SDE sampler (256 steps). A method skips a batch size whose time, projected
linearly from the size before it, exceeds `budget_seconds` on this machine, and the JSON says so."""

from __future__ import annotations

import platform
from importlib.metadata import version

import numpy as np
import torch

from r4t_pipeline.retrievers import Retriever
from r4t_pipeline.timing import time_by_batch_size


def machine() -> dict:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": torch.get_num_threads(),
            "device": gpu or "cpu", "torch": torch.__version__,
            "versions": {p: version(p) for p in ("transformers", "faiss-cpu", "dagster", "numpy")}}


def time_batches(retriever: Retriever, queries: list[str], batch_sizes: list[int], repeats: int, pool_size: int,
                 budget_seconds: float) -> dict[str, dict]:
    """{batch size: {median_seconds, runs, fanout_median_seconds, search_median_seconds, ms_per_query}} or
    {skipped: reason}."""
    retriever.retrieve(queries[:min(8, len(queries))], pool_size, seed=0)  # warm-up: lazy init, caches, kernels

    def run(batch: list[str], repeat: int) -> dict[str, float]:
        retrieved = retriever.retrieve(batch, pool_size, seed=repeat)
        return {"fanout_median_seconds": retrieved.fanout_seconds, "search_median_seconds": retrieved.search_seconds}

    return time_by_batch_size(lambda size: [queries[i % len(queries)] for i in range(size)], run, batch_sizes,
                              repeats, budget_seconds, "query")


def folm_diffusion_ratio(results: dict[str, dict], folm: str, diffusion: str) -> dict[str, float]:
    """How many times slower the autoregressive FOLM is than the diffusion retriever, per batch size."""
    ratios = {}
    for size, row in results.get(diffusion, {}).items():
        other = results.get(folm, {}).get(size, {})
        if "median_seconds" in row and "median_seconds" in other:
            ratios[size] = other["median_seconds"] / row["median_seconds"]
    return ratios


def format_table(results: dict[str, dict], batch_sizes: list[int]) -> str:
    header = "| method | " + " | ".join(f"batch {b}" for b in batch_sizes) + " |"
    lines = [header, "|---" * (len(batch_sizes) + 1) + "|"]
    for method, rows in results.items():
        cells = [f"{rows[str(b)]['median_seconds']:.3f} s" if "median_seconds" in rows.get(str(b), {}) else "n/a"
                 for b in batch_sizes]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sample_queries(texts: list[str], n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [texts[i] for i in rng.permutation(len(texts))[:n]]


def benchmark_queries(corpus_path: str, regime: str) -> list[str]:
    """The regime's test queries (its training queries where a catalog has no test split)."""
    from r4t_pipeline.queries import load_corpus

    return load_corpus(corpus_path, regime, "test")["query"].to_list() or \
        load_corpus(corpus_path, regime, "train")["query"].to_list()


def run_benchmark(settings, catalog: str, regime: str, corpus_path: str, artefacts, batch_sizes: list[int],
                  repeats: int, budget_seconds: float, methods: list[str] | None = None) -> dict:
    """Time every method (default: all, the diffusion retriever with its configured sampler and with the paper's
    SDE) on test queries. `artefacts`: the `stack.RetrieverArtefacts` of this catalog and regime."""
    from r4t_pipeline import stack
    from r4t_pipeline.diffusion.train import DEFAULT_SAMPLER_STEPS

    queries = benchmark_queries(corpus_path, regime)
    pool = settings.rewards.k if regime == "oar" else settings.rewards.k * settings.evaluation.per_direction
    sampler = settings.diffusion.sampler
    steps = settings.diffusion.sampler_steps or DEFAULT_SAMPLER_STEPS[sampler]
    variants = {"r4t_diffusion_sde256": ("r4t_diffusion", "sde", 256),
                f"r4t_diffusion_{sampler}{steps}": ("r4t_diffusion", sampler, steps)}
    names = [m for m in (methods or stack.METHODS) if m != "r4t_diffusion"]
    if methods is None or "r4t_diffusion" in methods:
        names += list(variants)
    results = {}
    for name in names:
        method, sampler, steps = variants.get(name, (name, None, None))
        # no embedding cache: every timed batch encodes its queries (and sub-queries), as a service does
        retriever = stack.build_retriever(settings, regime, method, artefacts, sampler=sampler, steps=steps,
                                          cached=False)
        results[name] = time_batches(retriever, queries, batch_sizes, repeats, pool, budget_seconds)
    return {"machine": machine(), "catalog": catalog, "regime": regime, "pool_size": pool,
            "config": {"batch_sizes": batch_sizes, "repeats": repeats, "budget_seconds": budget_seconds,
                       "k": settings.rewards.k, "profile": settings.profile,
                       "query_runtime": settings.query_runtime},
            "results": results,
            "folm_over_diffusion": {v: folm_diffusion_ratio(results, "r4t_folm", v) for v in variants}}
