"""Attribute tasks (SPEC §8): labels, patterns, holdout splits, seed sets, tail centroids, and the saved
`TaskData` every later MO-DiT stage reads.

Items are addressed by their row position in the domain's `CatalogEmbeddings` (= the FAISS index order); arrays
cover every catalog item, and items outside the task's database have pattern -1. Split codes per protocol:
0 train, 1 val, 2 test, 3 excluded (held out by another task on the same catalog: one model trains on every
task, so an item held out anywhere is trained on nowhere).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import polars as pl

from r4t_pipeline.catalog import Catalog
from r4t_pipeline.embeddings import CatalogEmbeddings
from r4t_pipeline.encoders import l2_normalize
from r4t_pipeline.io import atomic_dir
from r4t_pipeline.modit.config import SPLITS, AttributeTask, ModitConfig, PatternRule, SeedSetConfig, SplitConfig
from r4t_pipeline.modit.predictor import attribute_scores

TRAIN, VAL, TEST, EXCLUDED = 0, 1, 2, 3
PROTOCOLS = ("item", "pattern")


def attribute_labels(catalog: Catalog, item_ids: np.ndarray, task: AttributeTask) -> dict[str, np.ndarray | float]:
    """values (NaN = unknown), known, positive (known and >= threshold) in `item_ids` order, and the threshold."""
    items = catalog.items
    if task.column not in items.columns:
        raise ValueError(f"task {task.name!r}: catalog {catalog.name!r} has no column {task.column!r} "
                         f"(columns: {list(items.columns)})")
    by_id = dict(zip(items["item_id"].to_list(), items[task.column].cast(pl.Float64, strict=False).to_list()))
    missing = np.setdiff1d(item_ids, np.array(list(by_id), dtype=str))
    if len(missing):
        raise ValueError(f"task {task.name!r}: {len(missing)} embedded item ids are not in catalog "
                         f"{catalog.name!r}, e.g. {missing[:3].tolist()}: embeddings and catalog disagree")
    values = np.array([np.nan if by_id[i] is None else by_id[i] for i in item_ids.tolist()], np.float64)
    known = np.isfinite(values)
    if known.sum() < 2:
        raise ValueError(f"task {task.name!r}: column {task.column!r} has {known.sum()} known values")
    rule = task.threshold
    candidates = [float(np.quantile(values[known], rule.quantile))] if rule.quantile is not None else []
    candidates += [rule.at_least] if rule.at_least is not None else []
    threshold = min(candidates)
    positive = known & (np.nan_to_num(values, nan=-np.inf) >= threshold)
    if positive.all() or not positive[known].any():
        raise ValueError(f"task {task.name!r}: threshold {threshold} leaves {positive.sum()} of {known.sum()} "
                         "known items positive; both classes are needed")
    return {"values": values, "known": known, "positive": positive, "threshold": threshold}


def fit_patterns(vectors: np.ndarray, rule: PatternRule) -> np.ndarray:
    """Pattern id per item: FAISS k-means (spherical: the embeddings are unit vectors) with
    n_items / target_size clusters; ids renumbered so that every id in 0..n_patterns-1 is used."""
    n_clusters = max(2, round(len(vectors) / rule.target_size))
    kmeans = faiss.Kmeans(vectors.shape[1], n_clusters, niter=rule.niter, seed=rule.seed, spherical=True)
    data = np.ascontiguousarray(vectors, dtype=np.float32)
    kmeans.train(data)
    _, assignment = kmeans.index.search(data, 1)
    _, labels = np.unique(assignment[:, 0], return_inverse=True)
    return labels.astype(np.int64)


def pattern_summary(patterns: np.ndarray) -> dict[str, float]:
    sizes = np.bincount(patterns)
    return {"patterns": int(len(sizes)), "size_mean": float(sizes.mean()), "size_min": int(sizes.min()),
            "size_p10": float(np.percentile(sizes, 10)), "size_median": float(np.median(sizes)),
            "size_p90": float(np.percentile(sizes, 90)), "size_max": int(sizes.max())}


def _assign(n: int, val_fraction: float, test_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Split codes for n units: a random test_fraction of them test, val_fraction val, the rest train."""
    order = rng.permutation(n)
    n_test, n_val = round(test_fraction * n), round(val_fraction * n)
    codes = np.full(n, TRAIN, np.int8)
    codes[order[:n_test]] = TEST
    codes[order[n_test:n_test + n_val]] = VAL
    return codes


def holdout_splits(n_items: int, patterns: np.ndarray, cfg: SplitConfig) -> dict[str, np.ndarray]:
    """Per protocol, a split code per item. The item split depends only on (n_items, seed), so tasks on one
    catalog share it; the pattern split assigns whole patterns (items outside the database, pattern -1, train:
    they hold no pattern and only ever appear in stage 1's raw sequences)."""
    item = _assign(n_items, cfg.item_val_fraction, cfg.item_test_fraction, np.random.default_rng([cfg.seed, 1]))
    by_pattern = _assign(int(patterns.max()) + 1, cfg.pattern_val_fraction, cfg.pattern_test_fraction,
                         np.random.default_rng([cfg.seed, 2]))
    return {"item": item, "pattern": np.where(patterns >= 0, by_pattern[np.maximum(patterns, 0)], TRAIN)
            .astype(np.int8)}


@dataclass
class SeedSets:
    """m seed sets: item positions (m, max_size), padded with -1, and the pattern each was drawn from."""

    positions: np.ndarray
    pattern: np.ndarray

    def __len__(self) -> int:
        return len(self.pattern)

    @property
    def mask(self) -> np.ndarray:
        return self.positions >= 0

    def members(self, row: int) -> np.ndarray:
        return self.positions[row][self.positions[row] >= 0]

    def subset(self, rows: np.ndarray) -> SeedSets:
        return SeedSets(self.positions[rows], self.pattern[rows])

    def sample(self, n: int | None, seed: int) -> SeedSets:
        """A fixed random subset of n seed sets (all when n is None or larger)."""
        if n is None or n >= len(self):
            return self
        return self.subset(np.sort(np.random.default_rng(seed).choice(len(self), n, replace=False)))

    @classmethod
    def from_lists(cls, sets: list[np.ndarray], pattern: list[int], max_size: int) -> SeedSets:
        positions = np.full((len(sets), max_size), -1, np.int64)
        for row, members in enumerate(sets):
            positions[row, :len(members)] = members
        return cls(positions, np.asarray(pattern, np.int64))


def draw_seed_sets(patterns: np.ndarray, eligible: np.ndarray, per_pattern: int, cfg: SeedSetConfig,
                   rng: np.random.Generator) -> SeedSets:
    """Up to `per_pattern` distinct seed sets per pattern, of size uniform in [min_size, max_size] (capped by what
    the pattern offers), drawn without replacement from the pattern's `eligible` items; patterns with fewer than
    min_size eligible items give none."""
    sets, origin = [], []
    order = np.argsort(patterns[eligible], kind="stable")
    members_all = np.flatnonzero(eligible)[order]
    bounds = np.searchsorted(patterns[members_all], np.arange(int(patterns.max()) + 2))
    for p in range(int(patterns.max()) + 1):
        members = members_all[bounds[p]:bounds[p + 1]]
        if len(members) < cfg.min_size:
            continue
        seen: set[tuple[int, ...]] = set()
        for _ in range(per_pattern):
            size = int(rng.integers(cfg.min_size, min(cfg.max_size, len(members)) + 1))
            chosen = tuple(sorted(rng.choice(members, size, replace=False).tolist()))
            if chosen not in seen:
                seen.add(chosen)
                sets.append(np.array(chosen))
                origin.append(p)
    return SeedSets.from_lists(sets, origin, cfg.max_size)


def tail_centroids(vectors: np.ndarray, patterns: np.ndarray, members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pattern, the normalised centroid of its `members` (the high-attribute tail) and whether it has any."""
    n_patterns = int(patterns.max()) + 1
    sums = np.zeros((n_patterns, vectors.shape[1]), np.float64)
    np.add.at(sums, patterns[members], vectors[members])
    counts = np.bincount(patterns[members], minlength=n_patterns)
    return l2_normalize(sums), counts > 0


def attribute_direction(vectors: np.ndarray, known: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """Unit vector from the mean of known negatives to the mean of known positives (global, pattern-blind)."""
    return l2_normalize(vectors[known & positive].mean(axis=0) - vectors[known & ~positive].mean(axis=0))


@dataclass
class TaskData:
    """Everything one attribute task needs, per protocol (`item`, `pattern`)."""

    task: AttributeTask
    item_ids: np.ndarray
    values: np.ndarray
    known: np.ndarray
    positive: np.ndarray
    threshold: float
    database: np.ndarray                        # the items this task clusters and retrieves from
    patterns: np.ndarray
    splits: dict[str, np.ndarray]
    scores: dict[str, np.ndarray]               # predicted P(attribute) per item, predictor trained per protocol
    predictor_auc: dict[str, dict[str, float]]
    seed_sets: dict[str, dict[str, SeedSets]]   # protocol -> split -> seed sets
    tails: dict[str, np.ndarray]                # protocol -> (n_patterns, d) tail centroid of training positives
    has_tail: dict[str, np.ndarray]
    directions: dict[str, np.ndarray]           # protocol -> (d,) attribute direction from training items
    meta: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.task.name

    @property
    def n_patterns(self) -> int:
        return int(self.patterns.max()) + 1

    def train_items(self, protocol: str) -> np.ndarray:
        return self.splits[protocol] == TRAIN

    def save(self, path: str | Path) -> None:
        arrays = {name: getattr(self, name)
                  for name in ("item_ids", "values", "known", "positive", "database", "patterns")}
        for protocol in self.splits:
            arrays.update({f"{protocol}/split": self.splits[protocol], f"{protocol}/scores": self.scores[protocol],
                           f"{protocol}/tails": self.tails[protocol], f"{protocol}/has_tail": self.has_tail[protocol],
                           f"{protocol}/direction": self.directions[protocol]})
            for split, sets in self.seed_sets[protocol].items():
                arrays[f"{protocol}/{split}/seed_positions"] = sets.positions
                arrays[f"{protocol}/{split}/seed_pattern"] = sets.pattern
        with atomic_dir(path) as tmp:
            np.savez(tmp / "task_data.npz", **arrays)
            (tmp / "task.json").write_text(json.dumps({"task": self.task.model_dump(mode="json"),
                                                       "threshold": self.threshold,
                                                       "predictor_auc": self.predictor_auc, **self.meta}, indent=2))

    @classmethod
    def load(cls, path: str | Path) -> TaskData:
        path = Path(path)
        if not (path / "task.json").exists():
            raise FileNotFoundError(f"no MO-DiT task data at {path}; build it first (modit.build_task_data)")
        meta = json.loads((path / "task.json").read_text())
        task = AttributeTask.model_validate(meta.pop("task"))
        threshold, aucs = meta.pop("threshold"), meta.pop("predictor_auc")
        with np.load(path / "task_data.npz") as arrays:
            a = dict(arrays)
        protocols = sorted({k.split("/")[0] for k in a if "/" in k})
        return cls(task, a["item_ids"], a["values"], a["known"], a["positive"], threshold, a["database"],
                   a["patterns"],
                   splits={p: a[f"{p}/split"] for p in protocols}, scores={p: a[f"{p}/scores"] for p in protocols},
                   predictor_auc=aucs,
                   seed_sets={p: {s: SeedSets(a[f"{p}/{s}/seed_positions"], a[f"{p}/{s}/seed_pattern"])
                                  for s in SPLITS} for p in protocols},
                   tails={p: a[f"{p}/tails"] for p in protocols}, has_tail={p: a[f"{p}/has_tail"] for p in protocols},
                   directions={p: a[f"{p}/direction"] for p in protocols}, meta=meta)


def check_splits(data: TaskData) -> dict[str, int]:
    """Violations of the holdout contract per protocol (all must be 0): seed sets using items of another split,
    seed sets of one split sharing items with another's, patterns split across pattern-holdout splits, seeds
    that are positive or unknown, and seed sets spanning patterns."""
    problems: dict[str, int] = {}
    for protocol, split in data.splits.items():
        used = {}
        for code, name in enumerate(SPLITS):
            sets = data.seed_sets[protocol][name]
            members = sets.positions[sets.mask]
            problems[f"{protocol}/{name}/seeds_outside_split"] = int((split[members] != code).sum())
            problems[f"{protocol}/{name}/seeds_not_low_attribute"] = int((~data.known[members]
                                                                          | data.positive[members]).sum())
            rows = np.repeat(np.arange(len(sets)), sets.mask.sum(axis=1))
            problems[f"{protocol}/{name}/seeds_outside_pattern"] = int(
                (data.patterns[members] != sets.pattern[rows]).sum())
            used[name] = set(members.tolist())
        problems[f"{protocol}/seed_items_shared_across_splits"] = len(
            (used["train"] & (used["val"] | used["test"])) | (used["val"] & used["test"]))
        if protocol == "pattern":
            used_split = split != EXCLUDED
            splits_per_pattern = [len(np.unique(split[(data.patterns == p) & used_split]))
                                  for p in range(data.n_patterns)]
            problems["pattern/patterns_in_several_splits"] = int(sum(n > 1 for n in splits_per_pattern))
    return problems


def assert_splits_disjoint(data: TaskData) -> None:
    bad = {k: v for k, v in check_splits(data).items() if v}
    if bad:
        raise ValueError(f"task {data.name!r}: holdout splits overlap: {bad}")


def task_patterns_and_splits(task: AttributeTask, catalog: Catalog, embeddings: CatalogEmbeddings,
                             cfg: ModitConfig) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """The task's database mask, pattern per item (-1 outside the database) and split codes per protocol."""
    known = attribute_labels(catalog, embeddings.item_ids, task)["known"]
    database = known if task.database == "known" else np.ones(len(known), bool)
    patterns = np.full(len(known), -1, np.int64)
    patterns[database] = fit_patterns(embeddings.items[database], task.patterns)
    return database, patterns, holdout_splits(len(known), patterns, cfg.splits)


def build_task_data(task: AttributeTask, catalog: Catalog, embeddings: CatalogEmbeddings, cfg: ModitConfig,
                    out_dir: str | Path | None = None) -> TaskData:
    """Labels, patterns, both protocols' splits, predictors, seed sets and tail centroids of one task; saved to
    `out_dir` when given. Metadata: pattern count and size distribution, label counts, predictor AUCs, seed sets."""
    started = time.perf_counter()
    if catalog.name != task.domain:
        raise ValueError(f"task {task.name!r} is on domain {task.domain!r}, got the {catalog.name!r} catalog")
    vectors, item_ids = embeddings.items, embeddings.item_ids
    labels = attribute_labels(catalog, item_ids, task)
    known, positive = labels["known"], labels["positive"]
    database, patterns, splits = task_patterns_and_splits(task, catalog, embeddings, cfg)
    excluded = {protocol: 0 for protocol in splits}
    for sibling in cfg.tasks:
        if sibling.domain == task.domain and sibling.name != task.name:
            for protocol, held in task_patterns_and_splits(sibling, catalog, embeddings, cfg)[2].items():
                clash = (held != TRAIN) & (splits[protocol] == TRAIN)
                splits[protocol][clash] = EXCLUDED
                excluded[protocol] += int(clash.sum())
    scores, aucs, seed_sets, tails, has_tail, directions = {}, {}, {}, {}, {}, {}
    low_attribute = known & ~positive
    for n, protocol in enumerate(PROTOCOLS):
        split = splits[protocol]
        scores[protocol], aucs[protocol] = attribute_scores(vectors, known, positive, split, cfg.predictor)
        rng = np.random.default_rng([cfg.seed_sets.seed, n])
        seed_sets[protocol] = {name: draw_seed_sets(patterns, low_attribute & (split == code),
                                                    cfg.seed_sets.per_pattern[name], cfg.seed_sets, rng)
                               for code, name in enumerate(SPLITS)}
        train = split == TRAIN
        tails[protocol], has_tail[protocol] = tail_centroids(vectors, patterns, positive & train)
        directions[protocol] = attribute_direction(vectors, known & train, positive)
    meta = {
        "domain": task.domain, "items": len(item_ids), "database_items": int(database.sum()),
        "known": int(known.sum()), "positive": int(positive.sum()),
        "positive_rate_of_known": float(positive.sum() / known.sum()),
        "pattern_stats": pattern_summary(patterns[database]),
        "positives_per_pattern_median": float(np.median(np.bincount(patterns[positive], minlength=patterns.max() + 1))),
        "seed_sets": {p: {s: len(v) for s, v in sets.items()} for p, sets in seed_sets.items()},
        "patterns_with_train_tail": {p: int(v.sum()) for p, v in has_tail.items()},
        "train_items_held_out_by_sibling_tasks": excluded,
        "seconds": round(time.perf_counter() - started, 2),
    }
    data = TaskData(task, item_ids, labels["values"], known, positive, float(labels["threshold"]), database, patterns,
                    splits, scores, aucs, seed_sets, tails, has_tail, directions, meta)
    assert_splits_disjoint(data)
    if out_dir is not None:
        data.save(out_dir)
    return data
