"""`r4t expand`: more items like the seeds, in their pattern and with the task's attribute."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from r4t_pipeline.catalog import Catalog
from r4t_pipeline.diffusion.train import DiffusionRetrieverModel
from r4t_pipeline.embeddings import CatalogEmbeddings
from r4t_pipeline.modit.config import METHOD_LABELS, STAGE_OF_METHOD, ModitConfig
from r4t_pipeline.modit.evaluate import build_methods
from r4t_pipeline.modit.retrieval import ItemSearcher
from r4t_pipeline.modit.tasks import SeedSets, TaskData


@dataclass
class Expansion:
    task: str
    method: str
    pattern: int
    seeds: list[dict]
    items: list[dict]
    warnings: list[str] = field(default_factory=list)


def resolve_task(cfg: ModitConfig, domain: str, name: str) -> str:
    """A task by its name, by `<domain>_<name>`, or by its attribute column on `domain` when that is unique."""
    names = [t.name for t in cfg.tasks]
    for candidate in (name, f"{domain}_{name}"):
        if candidate in names:
            if cfg.task(candidate).domain != domain:
                raise ValueError(f"task {candidate!r} is on domain {cfg.task(candidate).domain!r}, not {domain!r}")
            return candidate
    by_column = [t.name for t in cfg.tasks if t.domain == domain and t.column == name]
    if len(by_column) == 1:
        return by_column[0]
    on_domain = [t.name for t in cfg.tasks if t.domain == domain]
    raise ValueError(f"unknown task {name!r} for domain {domain!r}; configured: {on_domain}")


def expand(seed_ids: list[str], data: TaskData, catalog: Catalog, embeddings: CatalogEmbeddings, cfg: ModitConfig,
           *, k: int = 20, method: str = "hppo", protocol: str = "item",
           checkpoints: dict[str, str] | None = None, interpolation_lambda: float | None = None) -> Expansion:
    """Retrieve k items for the seeds with `method`; each with its attribute value and whether it shares the
    seeds' pattern (their most common one: seeds from several patterns are allowed, with a warning)."""
    seed_ids = [s.strip() for s in seed_ids if s.strip()]
    if not seed_ids:
        raise ValueError("no seed ids given; pass --seeds ID,ID,... (item ids of the catalog)")
    if method not in METHOD_LABELS:
        raise ValueError(f"unknown method {method!r}; choose one of {list(METHOD_LABELS)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    position = {item_id: n for n, item_id in enumerate(embeddings.item_ids.tolist())}
    unknown = [s for s in seed_ids if s not in position]
    if unknown:
        raise ValueError(f"unknown item id(s) {unknown[:5]} in the {catalog.name} catalog")
    positions = np.array(list(dict.fromkeys(position[s] for s in seed_ids)))
    outside = [str(embeddings.item_ids[n]) for n in positions if not data.database[n]]
    if outside:
        raise ValueError(f"item(s) {outside[:5]} have no {data.task.column!r} value: not usable as seeds for task "
                         f"{data.name!r}")
    warnings = []
    counts = Counter(data.patterns[positions].tolist())
    pattern = min(counts, key=lambda p: (-counts[p], p))
    if len(counts) > 1:
        warnings.append(f"the seeds come from {len(counts)} patterns ({dict(counts)}); in-pattern means pattern "
                        f"{pattern}, the most common")
    if len(positions) > cfg.sequences.max_items:
        warnings.append(f"{len(positions)} seeds given; the generators read the {cfg.sequences.max_items} with the "
                        "highest predicted attribute")
        positions = positions[np.argsort(data.scores[protocol][positions])[-cfg.sequences.max_items:]]
    models = {}
    if method in STAGE_OF_METHOD:
        stage = STAGE_OF_METHOD[method]
        if not checkpoints or stage not in checkpoints:
            raise ValueError(f"method {method!r} needs the {stage!r} checkpoint of protocol {protocol!r}; "
                             "run the MO-DiT stages first")
        models[stage] = DiffusionRetrieverModel.load(checkpoints[stage])
    if method == "interpolation" and interpolation_lambda is None:
        raise ValueError("method 'interpolation' needs its lambda (run the MO-DiT evaluation, or pass --lambda)")
    vectors = embeddings.items
    searcher = ItemSearcher(vectors, data.database)
    methods = {m.name: m for m in build_methods(data, protocol, vectors, searcher, models, cfg,
                                                interpolation_lambda or 0.0)}
    seeds = SeedSets.from_lists([positions], [pattern], len(positions))
    retrieved = methods[method].retrieve(seeds, k)[0]
    retrieved = retrieved[retrieved >= 0]
    wanted = [str(embeddings.item_ids[n]) for n in [*positions, *retrieved]]
    items = {row["item_id"]: row for row in catalog.items.filter(pl.col("item_id").is_in(wanted))
             .select("item_id", "name", "category").iter_rows(named=True)}

    def describe(n: int) -> dict:
        item_id = str(embeddings.item_ids[n])
        value = data.values[n]
        return {"item_id": item_id, "name": items[item_id]["name"], "category": items[item_id]["category"],
                data.task.column: None if np.isnan(value) else float(value), "has_attribute": bool(data.positive[n]),
                "in_pattern": bool(data.patterns[n] == pattern)}

    return Expansion(data.name, method, int(pattern), [describe(n) for n in positions],
                     [describe(int(n)) for n in retrieved], warnings)



def format_expansion(result: Expansion, column: str) -> str:
    """Human-readable listing (warnings are the caller's to print, e.g. on stderr)."""
    lines = [f"{len(result.items)} items for {len(result.seeds)} seeds ({METHOD_LABELS[result.method]}, task "
             f"{result.task}, pattern {result.pattern})"]
    lines.append("seeds:")
    lines += [f"    {s['item_id']}  {s['name'] or s['category']}  [{column}={s[column]}]" for s in result.seeds]
    lines.append("retrieved (* = in the seeds' pattern, + = has the attribute):")
    for item in result.items:
        flags = ("*" if item["in_pattern"] else " ") + ("+" if item["has_attribute"] else " ")
        lines.append(f"  {flags} {item['item_id']}  {item['name'] or item['category']}  [{column}={item[column]}]")
    return "\n".join(lines)
