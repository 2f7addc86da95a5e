"""Evaluation of pattern-preserving attribute retrieval (SPEC §8): every method on the test seed sets of every
task x protocol, Joint/Purity/Attr@K over the task's whole database (all splits; seeds excluded), mean ±
standard error over seed sets, paired significance of MO-DiT+HPPO against MO-DiT and against the best baseline,
and the purity-vs-attribute frontier plot.

Choices made on the validation seed sets only: the interpolation's lambda and which baseline is "best".
"""

from __future__ import annotations

import base64
import io
import json
import time
from pathlib import Path

import numpy as np
import polars as pl
from scipy.stats import wilcoxon

from r4t_pipeline.diffusion.train import DiffusionRetrieverModel
from r4t_pipeline.embeddings import CatalogEmbeddings
from r4t_pipeline.io import atomic_dir
from r4t_pipeline.modit.config import BASELINES, METHOD_LABELS, STAGE_OF_METHOD, ModitConfig
from r4t_pipeline.modit.data import raw_token, task_token
from r4t_pipeline.modit.methods import (
    ExpansionMethod,
    Generator,
    GlobalAttribute,
    Interpolation,
    SeedCentroid,
    seed_centroids,
)
from r4t_pipeline.modit.retrieval import ItemSearcher, expansion_metrics, oracle_joint
from r4t_pipeline.modit.tasks import SeedSets, TaskData
from r4t_pipeline.stats import mean_and_error
from r4t_pipeline.timing import time_by_batch_size


def paired_comparison(a: np.ndarray, b: np.ndarray, groups: np.ndarray, n_boot: int, seed: int) -> dict[str, float]:
    """a vs b on the same seed sets: mean difference, the two-sided Wilcoxon signed-rank p-value over seed sets
    (zero differences split between the ranks, 'zsplit', since ties at 0 are common for fractions of K; the
    normal approximation, as there are hundreds of seed sets and many ties), and a
    two-sided paired bootstrap p-value that resamples whole patterns (seed sets of one pattern are correlated)."""
    diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    out = {"mean_difference": float(diff.mean()), "n": len(diff)}
    out["p_wilcoxon"] = 1.0 if not diff.any() else float(wilcoxon(a, b, zero_method="zsplit", method="approx").pvalue)
    unique, inverse = np.unique(groups, return_inverse=True)
    sums, counts = np.bincount(inverse, diff, len(unique)), np.bincount(inverse, minlength=len(unique))
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(unique), size=(n_boot, len(unique)))
    boot = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    out["p_bootstrap_patterns"] = float(min(1.0, 2 * min((boot <= 0).mean(), (boot >= 0).mean())))
    out["ci95"] = [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]
    return out


def best_lambda(searcher: ItemSearcher, vectors: np.ndarray, direction: np.ndarray, seeds: SeedSets,
                data: TaskData, lambdas: list[float], k: int) -> tuple[float, dict[str, float]]:
    """The interpolation weight with the best mean Joint@k on `seeds` (validation), and the whole curve."""
    curve = {}
    for lam in lambdas:
        retrieved = Interpolation(searcher, vectors, direction, lam).retrieve(seeds, k)
        curve[f"{lam:g}"] = float(expansion_metrics(retrieved, seeds.pattern, data.patterns, data.positive,
                                                    [k])[f"joint@{k}"].mean())
    best = max(lambdas, key=lambda lam: curve[f"{lam:g}"])
    return best, curve


def predicted_positive(data: TaskData, protocol: str) -> np.ndarray:
    """Database items the protocol's predictor puts in the top fraction that is positive among known training
    items: global attribute retrieval without reading the true labels (a diagnostic of how much its lead comes
    from them)."""
    train = data.known & data.train_items(protocol)
    scores = data.scores[protocol]
    cutoff = np.quantile(scores[train], 1 - data.positive[train].mean())
    return data.database & (scores >= cutoff)


def build_methods(data: TaskData, protocol: str, vectors: np.ndarray, searcher: ItemSearcher,
                  models: dict[str, DiffusionRetrieverModel], cfg: ModitConfig, lam: float) -> list[ExpansionMethod]:
    """All methods for one task x protocol; generators for the stages whose checkpoint is in `models`."""
    global_attribute = GlobalAttribute(vectors, data.positive)
    methods: list[ExpansionMethod] = [SeedCentroid(searcher, vectors), global_attribute,
                                      GlobalAttribute(vectors, predicted_positive(data, protocol),
                                                      "predicted_attribute"),
                                      Interpolation(searcher, vectors, data.directions[protocol], lam)]
    for name, stage in STAGE_OF_METHOD.items():
        if stage in models:
            token = raw_token(data.task.domain) if stage == "raw" else task_token(data.name)
            methods.append(Generator(name, searcher, models[stage], token, vectors, data.scores[protocol],
                                     cfg.sampling, cfg.sequences))
    if "hppo" in models:
        # the generated query as the anchor of global attribute retrieval: is it a better anchor than the centroid?
        methods.append(Generator("hppo_positives_only", global_attribute.searcher, models["hppo"],
                                 task_token(data.name), vectors, data.scores[protocol], cfg.sampling, cfg.sequences))
    return methods


def evaluate_cell(data: TaskData, protocol: str, vectors: np.ndarray, searcher: ItemSearcher,
                  models: dict[str, DiffusionRetrieverModel], cfg: ModitConfig) -> tuple[dict, pl.DataFrame]:
    """One task x protocol: summary (JSON-able) and the per-seed-set metrics of every method."""
    ev = cfg.evaluation
    ks, primary = sorted(ev.ks), f"joint@{min(ev.ks)}"
    val = data.seed_sets[protocol]["val"].sample(ev.max_seed_sets, ev.seed)
    test = data.seed_sets[protocol]["test"].sample(ev.max_seed_sets, ev.seed)
    if len(test) == 0 or len(val) == 0:
        raise ValueError(f"task {data.name!r}, protocol {protocol!r}: {len(val)} validation and {len(test)} test "
                         "seed sets; draw more (seed_sets.per_pattern) or hold out more")
    lam, curve = best_lambda(searcher, vectors, data.directions[protocol], val, data, ev.lambdas, min(ks))
    methods = build_methods(data, protocol, vectors, searcher, models, cfg, lam)
    per_set, seconds, val_primary = {}, {}, {}
    for method in methods:
        started = time.perf_counter()
        retrieved = method.retrieve(test, max(ks))
        seconds[method.name] = time.perf_counter() - started
        per_set[method.name] = expansion_metrics(retrieved, test.pattern, data.patterns, data.positive, ks)
        if method.name in BASELINES:
            val_primary[method.name] = float(expansion_metrics(method.retrieve(val, min(ks)), val.pattern,
                                                               data.patterns, data.positive, [min(ks)])[primary].mean())
    best_baseline = max(val_primary, key=val_primary.get)
    summary = {name: {metric: list(mean_and_error(values, seed=ev.seed)) for metric, values in metrics.items()}
               for name, metrics in per_set.items()}
    comparisons = {}
    for other in ("modit", best_baseline, "pretrained"):
        if "hppo" in per_set and other in per_set:
            comparisons[f"hppo_vs_{other}"] = {
                f"joint@{k}": paired_comparison(per_set["hppo"][f"joint@{k}"], per_set[other][f"joint@{k}"],
                                                test.pattern, ev.n_boot, ev.seed) for k in ks}
    if "modit" in per_set and "pretrained" in per_set:
        comparisons["modit_vs_pretrained"] = {
            f"joint@{k}": paired_comparison(per_set["modit"][f"joint@{k}"], per_set["pretrained"][f"joint@{k}"],
                                            test.pattern, ev.n_boot, ev.seed) for k in ks}
    oracle = oracle_joint(test.positions, test.pattern, data.patterns, data.positive, ks)
    centroid_distance = np.linalg.norm(seed_centroids(vectors, test) - data.tails[protocol][test.pattern], axis=1)
    cell = {"task": data.name, "protocol": protocol, "test_seed_sets": len(test), "val_seed_sets": len(val),
            "test_patterns": int(len(np.unique(test.pattern))), "lambda": lam, "lambda_curve_val": curve,
            "best_baseline": best_baseline, "baselines_val_primary": val_primary, "metrics": summary,
            "comparisons": comparisons, "oracle": {k: float(v.mean()) for k, v in oracle.items()},
            "seconds": {k: round(v, 3) for k, v in seconds.items()},
            "test_patterns_with_train_tail": float(data.has_tail[protocol][test.pattern].mean()),
            "seed_to_train_tail_distance": float(centroid_distance[data.has_tail[protocol][test.pattern]].mean())
            if data.has_tail[protocol][test.pattern].any() else None}
    frame = pl.concat([pl.DataFrame({"task": data.name, "protocol": protocol, "method": name,
                                     "seed_set": np.arange(len(test)), "pattern": test.pattern, **metrics})
                       for name, metrics in per_set.items()])
    return cell, frame


def goal_summary(cells: list[dict], ks: list[int], alpha: float = 0.05) -> dict:
    """How many cells meet the paper's ordering on Joint@K: HPPO > MO-DiT > stage 1 and HPPO > every baseline,
    and in how many HPPO's gains are significant (Wilcoxon p < alpha, positive difference)."""
    out = {}
    for k in ks:
        key = f"joint@{k}"
        rows = []
        for cell in cells:
            m = {name: values[key][0] for name, values in cell["metrics"].items()}
            comparisons = cell["comparisons"]
            significant = {name: c[key]["mean_difference"] > 0 and c[key]["p_wilcoxon"] < alpha
                           for name, c in comparisons.items()}
            rows.append({"hppo>modit": m.get("hppo", -1) > m.get("modit", 1),
                         "modit>pretrained": m.get("modit", -1) > m.get("pretrained", 1),
                         "hppo>all_baselines": all(m.get("hppo", -1) > m[b] for b in BASELINES if b in m),
                         "hppo>modit_significant": significant.get("hppo_vs_modit", False),
                         "hppo>best_baseline_significant": significant.get(
                             f"hppo_vs_{cell['best_baseline']}", False)})
        out[key] = {name: int(sum(r[name] for r in rows)) for name in rows[0]} | {"cells": len(rows)}
    return out


def frontier_figure(cells: list[dict], k: int) -> str:
    """Purity@k vs Attr@k, one panel per task x protocol, one point per method (mean ± s.e.), as base64 PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    protocols = list(dict.fromkeys(c["protocol"] for c in cells))
    tasks = list(dict.fromkeys(c["task"] for c in cells))
    markers = dict(zip(METHOD_LABELS, "osdD^vPX*"))
    fig, axes = plt.subplots(len(tasks), len(protocols), squeeze=False, dpi=100,
                             figsize=(4.2 * len(protocols), 3.3 * len(tasks) + 0.6))
    for cell in cells:
        panel = axes[tasks.index(cell["task"])][protocols.index(cell["protocol"])]
        for name, values in cell["metrics"].items():
            (px, ex), (py, ey) = values[f"purity@{k}"], values[f"attr@{k}"]
            panel.errorbar(px, py, xerr=ex, yerr=ey, marker=markers.get(name, "o"), linestyle="none",
                           label=METHOD_LABELS.get(name, name), markersize=7, capsize=2)
        panel.set(title=f"{cell['task']} / {cell['protocol']}-holdout", xlabel=f"Purity@{k}", ylabel=f"Attr@{k}",
                  xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
        panel.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.6 / fig.get_figheight(), 1, 1))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def evaluation_table(result: dict) -> str:
    """Markdown: per task x protocol and method, Joint/Purity/Attr at each K (mean ± s.e.), and the p-values of
    HPPO against each compared method."""
    ks = result["ks"]
    columns = [f"{m}@{k}" for k in ks for m in ("joint", "purity", "attr")]
    header = f" | HPPO − method, joint@{ks[0]} | p (Wilcoxon) | p (pattern bootstrap) |"
    lines = ["| task | protocol | method | " + " | ".join(columns) + header, "|---" * (len(columns) + 6) + "|"]
    for cell in result["cells"]:
        for name in METHOD_LABELS:
            if name not in cell["metrics"]:
                continue
            values = cell["metrics"][name]
            label = METHOD_LABELS[name] + (f" (λ={cell['lambda']:g})" if name == "interpolation" else "") + (
                " [best baseline]" if name == cell["best_baseline"] else "")
            comparison = cell["comparisons"].get(f"hppo_vs_{name}", {}).get(f"joint@{ks[0]}")
            extra = (f"{comparison['mean_difference']:+.3f} | {comparison['p_wilcoxon']:.2g} | "
                     f"{comparison['p_bootstrap_patterns']:.2g}") if comparison else " | | "
            lines.append(f"| {cell['task']} | {cell['protocol']} | {label} | "
                         + " | ".join(f"{values[c][0]:.3f} ± {values[c][1]:.3f}" for c in columns) + f" | {extra} |")
        oracle = " | ".join(f"{cell['oracle'][f'joint@{k}']:.3f} | | " for k in ks)
        lines.append(f"| {cell['task']} | {cell['protocol']} | (oracle Joint ceiling) | {oracle} | | | |")
    return "\n".join(lines)


def run_modit_evaluation(tasks: list[TaskData], embeddings: dict[str, CatalogEmbeddings],
                         checkpoints: dict[str, dict[str, str | Path]], cfg: ModitConfig,
                         out_dir: str | Path | None = None, device: str = "auto") -> dict:
    """Evaluate every method on every task x protocol.

    checkpoints: protocol -> stage (raw, ordered, tail, hppo) -> checkpoint folder; a missing stage drops its
    method. Returns a JSON-able dict: cells (per task x protocol: metrics as [mean, s.e.], comparisons with
    p-values, chosen lambda and best baseline, oracle ceiling), goal summary, Markdown table, frontier PNG
    (base64). With out_dir: evaluation.json, per_seed_set.parquet, frontier.png and table.md written there.
    """
    started = time.perf_counter()
    searchers = {data.name: ItemSearcher(embeddings[data.task.domain].items, data.database) for data in tasks}
    cells, frames = [], []
    for protocol in cfg.protocols:
        models = {stage: DiffusionRetrieverModel.load(path, device)
                  for stage, path in checkpoints.get(protocol, {}).items()}
        for data in tasks:
            vectors = embeddings[data.task.domain].items
            if len(vectors) != len(data.item_ids) or (embeddings[data.task.domain].item_ids != data.item_ids).any():
                raise ValueError(f"task {data.name!r} was built on other embeddings than the {data.task.domain!r} "
                                 "ones given: rebuild the task data")
            cell, frame = evaluate_cell(data, protocol, vectors, searchers[data.name], models, cfg)
            cells.append(cell)
            frames.append(frame)
    ks = sorted(cfg.evaluation.ks)
    result = {"ks": ks, "cells": cells, "goal": goal_summary(cells, ks), "seconds": 0.0}
    result["table_markdown"] = evaluation_table(result)
    result["frontier_png"] = frontier_figure(cells, ks[0])
    result["seconds"] = round(time.perf_counter() - started, 2)
    if out_dir is not None:
        with atomic_dir(out_dir) as tmp:
            (tmp / "evaluation.json").write_text(json.dumps(result, indent=2))
            (tmp / "table.md").write_text(result["table_markdown"] + "\n")
            (tmp / "frontier.png").write_bytes(base64.b64decode(result["frontier_png"]))
            pl.concat(frames).write_parquet(tmp / "per_seed_set.parquet")
    return result


def flat_metrics(result: dict) -> dict[str, float]:
    """The evaluation as MLflow metrics: <task>/<protocol>/<method>/<metric> means and the HPPO p-values."""
    flat = {}
    for cell in result["cells"]:
        prefix = f"{cell['task']}/{cell['protocol']}"
        for method, values in cell["metrics"].items():
            flat.update({f"{prefix}/{method}/{metric.replace('@', '_at_')}": v[0] for metric, v in values.items()})
        for name, comparison in cell["comparisons"].items():
            for metric, c in comparison.items():
                flat[f"{prefix}/{name}/{metric.replace('@', '_at_')}_p_wilcoxon"] = c["p_wilcoxon"]
    return flat


def modit_latency(data: TaskData, embeddings: CatalogEmbeddings, checkpoints: dict[str, str | Path],
                  cfg: ModitConfig, protocol: str, batch_sizes: list[int], repeats: int = 3, k: int = 10,
                  budget_seconds: float = 60.0, device: str = "auto") -> dict[str, dict]:
    """Seconds per batch of test seed sets for the MO-DiT+HPPO generator (and the seed centroid, for scale)."""
    models = {"hppo": DiffusionRetrieverModel.load(checkpoints["hppo"], device)}
    methods = {m.name: m for m in build_methods(data, protocol, embeddings.items,
                                                ItemSearcher(embeddings.items, data.database), models, cfg, 0.0)}
    seeds = data.seed_sets[protocol]["test"]
    name = f"modit_hppo_{cfg.sampling.sampler}{cfg.sampling.steps}"
    return {name: time_seed_expansion(methods["hppo"], seeds, batch_sizes, repeats, k, budget_seconds),
            "seed_centroid": time_seed_expansion(methods["seed_centroid"], seeds, batch_sizes, repeats, k,
                                                 budget_seconds)}


def time_seed_expansion(method, seeds, batch_sizes: list[int], repeats: int, k: int,
                        budget_seconds: float) -> dict[str, dict]:
    """MO-DiT+HPPO latency: seconds per batch of seed sets for an `ExpansionMethod` (query generation and
    top-k search), the batch cycling through `seeds`; same shape of result as `bench.time_batches`."""
    method.retrieve(seeds.subset(np.arange(min(8, len(seeds)))), k)  # warm-up

    def run(batch, repeat: int) -> None:
        method.retrieve(batch, k)

    return time_by_batch_size(lambda size: seeds.subset(np.arange(size) % len(seeds)), run, batch_sizes, repeats,
                              budget_seconds, "seed_set")
