"""Condition sequences and the training sets of stages 1-3.

Every condition is [token, item_1, ..., item_L] (L <= max_items), padded and masked, read by the R4T
`SetDenoiser` with learned token positions. The token says what to continue: `raw:<domain>` (stage 1, a real
curated sequence) or `task:<name>` (stages 2-4, towards that task's attribute). Items of an ordered sequence or
a seed set come ordered by the task's predicted attribute, low to high, so that the model continues upwards.
Targets are one row: a real next item (stage 1), the highest-predicted item of an ordered in-pattern sequence
(stage 2), the pattern's high-attribute tail centroid (stage 3); by default as an offset from the normalised
centroid of the condition's items (`SequenceConfig.target`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from r4t_pipeline.catalog import Catalog
from r4t_pipeline.embeddings import CatalogEmbeddings
from r4t_pipeline.encoders import l2_normalize
from r4t_pipeline.io import stable_hash
from r4t_pipeline.modit.config import SequenceConfig
from r4t_pipeline.modit.tasks import TRAIN, SeedSets, TaskData


def raw_token(domain: str) -> str:
    return f"raw:{domain}"


def task_token(task: str) -> str:
    return f"task:{task}"


def token_vector(name: str, dim: int) -> np.ndarray:
    """A fixed random unit vector per token name: an identifier the cross-attention learns to read (random
    128-d directions are near-orthogonal to each other and to the cone the item embeddings occupy)."""
    seed = int(stable_hash(name, length=8), 16)
    return l2_normalize(np.random.default_rng(seed).standard_normal(dim))


@dataclass
class StageDataset:
    conditions: np.ndarray  # (N, 1 + max_items, d)
    mask: np.ndarray        # (N, 1 + max_items) True where a token is present
    targets: np.ndarray     # (N, 1, d)
    source: np.ndarray      # (N,) which token (domain or task) each example continues

    def __len__(self) -> int:
        return len(self.targets)

    @classmethod
    def concat(cls, parts: list[StageDataset]) -> StageDataset:
        parts = [p for p in parts if len(p)]
        if not parts:
            raise ValueError("the stage dataset is empty: no task or domain produced a training example")
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("conditions", "mask", "targets",
                                                                            "source")))

    def counts(self) -> dict[str, int]:
        names, counts = np.unique(self.source, return_counts=True)
        return dict(zip(names.tolist(), counts.tolist()))


def condition_tensors(token: str, vectors: np.ndarray, positions: np.ndarray,
                      max_items: int) -> tuple[np.ndarray, np.ndarray]:
    """positions (m, <= max_items), -1 padded -> conditions (m, 1 + max_items, d) and their mask."""
    m, width = positions.shape
    if width > max_items:
        raise ValueError(f"sequences of {width} items exceed max_items = {max_items}")
    conditions = np.zeros((m, 1 + max_items, vectors.shape[1]), np.float32)
    mask = np.zeros((m, 1 + max_items), bool)
    conditions[:, 0] = token_vector(token, vectors.shape[1])
    mask[:, 0] = True
    present = positions >= 0
    conditions[:, 1:1 + width][present] = vectors[positions[present]]
    mask[:, 1:1 + width] = present
    return conditions, mask


def centroids(vectors: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """(m, d) normalised mean embedding of each row's items (positions (m, L), -1 padded, >= 1 item per row)."""
    present = positions >= 0
    sums = (vectors[np.maximum(positions, 0)] * present[..., None]).sum(axis=1)
    return l2_normalize(sums / np.maximum(present.sum(axis=1, keepdims=True), 1))


def encode_targets(queries: np.ndarray, centroid: np.ndarray, target: str) -> np.ndarray:
    """Query embeddings (m, d) -> the model's targets (m, 1, d): offsets from the condition centroid, or as is."""
    return (queries - centroid if target == "offset" else queries)[:, None].astype(np.float32)


def decode_queries(samples: np.ndarray, centroid: np.ndarray, target: str) -> np.ndarray:
    """The model's raw samples (m, R, d) -> unit query embeddings (m, R, d)."""
    return l2_normalize(samples + centroid[:, None] if target == "offset" else samples)


def order_by_score(positions: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Each row's items (-1 padded) sorted by ascending score, padding last; ties keep their order."""
    keys = np.where(positions >= 0, scores[np.maximum(positions, 0)], np.inf)
    return np.take_along_axis(positions, np.argsort(keys, axis=1, kind="stable"), axis=1)


def seed_conditions(seeds: SeedSets, token: str, vectors: np.ndarray, scores: np.ndarray,
                    max_items: int) -> tuple[np.ndarray, np.ndarray]:
    """The model's condition for seed sets: the token, then the seeds by ascending predicted attribute."""
    return condition_tensors(token, vectors, order_by_score(seeds.positions, scores), max_items)


def collection_positions(catalog: Catalog, item_ids: np.ndarray) -> list[np.ndarray]:
    """Each collection's items as embedding row positions, in the collection's stored order."""
    position = {item_id: n for n, item_id in enumerate(item_ids.tolist())}
    return [np.array([position[i] for i in ids], np.int64) for ids in catalog.collections["item_ids"].to_list()]


def raw_examples(sequences: list[np.ndarray], allowed: np.ndarray, max_items: int, max_examples: int | None,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(prefix (m, max_items) -1 padded, next item (m,)) for every position of every real sequence, after dropping
    items not `allowed` (held out); prefixes keep the last max_items items before the target."""
    prefixes, targets = [], []
    for sequence in sequences:
        sequence = sequence[allowed[sequence]]
        for p in range(1, len(sequence)):
            prefix = sequence[max(0, p - max_items):p]
            prefixes.append(np.pad(prefix, (0, max_items - len(prefix)), constant_values=-1))
            targets.append(sequence[p])
    if not targets:
        return np.zeros((0, max_items), np.int64), np.zeros(0, np.int64)
    prefixes, targets = np.stack(prefixes), np.array(targets)
    if max_examples is not None and len(targets) > max_examples:
        keep = np.sort(rng.choice(len(targets), max_examples, replace=False))
        prefixes, targets = prefixes[keep], targets[keep]
    return prefixes, targets


def ordered_sequences(patterns: np.ndarray, scores: np.ndarray, eligible: np.ndarray, per_pattern: int,
                      min_items: int, max_items: int, rng: np.random.Generator) -> np.ndarray:
    """Metric-ordered in-pattern sequences, (m, max_items + 1) -1 padded: per pattern, `per_pattern` random
    subsets of its eligible items of length min_items + 1 .. max_items + 1, sorted by ascending predicted score.
    The last item of each row is the continuation target, the rest its prefix."""
    rows = []
    for p in range(int(patterns.max()) + 1):
        members = np.flatnonzero(eligible & (patterns == p))
        if len(members) < min_items + 1:
            continue
        for _ in range(per_pattern):
            length = int(rng.integers(min_items + 1, min(max_items + 1, len(members)) + 1))
            chosen = rng.choice(members, length, replace=False)
            chosen = chosen[np.argsort(scores[chosen], kind="stable")]
            rows.append(np.pad(chosen, (0, max_items + 1 - length), constant_values=-1))
    return np.stack(rows) if rows else np.zeros((0, max_items + 1), np.int64)


def split_continuations(sequences: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of -1 padded sequences -> (the prefix before each row's last item, -1 padded; that last item)."""
    rows, last = np.arange(len(sequences)), (sequences >= 0).sum(axis=1) - 1
    targets = sequences[rows, last]
    prefixes = sequences.copy()
    prefixes[rows, last] = -1
    return prefixes[:, :-1], targets


def domain_training_items(tasks: list[TaskData], domain: str, protocol: str, n_items: int) -> np.ndarray:
    """Items in the training split of every task on `domain` (what stage 1 may read of that catalog)."""
    allowed = np.ones(n_items, bool)
    for task in tasks:
        if task.task.domain == domain:
            allowed &= task.splits[protocol] == TRAIN
    return allowed


def raw_dataset(catalogs: dict[str, Catalog], embeddings: dict[str, CatalogEmbeddings], tasks: list[TaskData],
                protocol: str, cfg: SequenceConfig) -> StageDataset:
    """Stage 1: (real prefix -> its next item) on every catalog, training items only."""
    parts = []
    for n, (domain, catalog) in enumerate(sorted(catalogs.items())):
        emb = embeddings[domain]
        allowed = domain_training_items(tasks, domain, protocol, len(emb.item_ids))
        prefixes, targets = raw_examples(collection_positions(catalog, emb.item_ids), allowed, cfg.max_items,
                                         cfg.raw_max_examples, np.random.default_rng([cfg.seed, n]))
        conditions, mask = condition_tensors(raw_token(domain), emb.items, prefixes, cfg.max_items)
        goal = encode_targets(emb.items[targets], centroids(emb.items, prefixes), cfg.target)
        parts.append(StageDataset(conditions, mask, goal, np.full(len(targets), domain)))
    return StageDataset.concat(parts)


def ordered_dataset(tasks: list[TaskData], embeddings: dict[str, CatalogEmbeddings], protocol: str,
                    cfg: SequenceConfig) -> StageDataset:
    """Stage 2, all tasks in one set: known-valued training items of a pattern, ordered by the task's predicted
    attribute; continue with the highest."""
    parts = []
    for n, task in enumerate(tasks):
        vectors = embeddings[task.task.domain].items
        eligible = task.known & task.train_items(protocol)
        sequences = ordered_sequences(task.patterns, task.scores[protocol], eligible, cfg.ordered_per_pattern,
                                      cfg.ordered_min_items, cfg.max_items, np.random.default_rng([cfg.seed, 100 + n]))
        prefixes, targets = split_continuations(sequences)
        conditions, mask = condition_tensors(task_token(task.name), vectors, prefixes, cfg.max_items)
        goal = encode_targets(vectors[targets], centroids(vectors, prefixes), cfg.target)
        parts.append(StageDataset(conditions, mask, goal, np.full(len(targets), task.name)))
    return StageDataset.concat(parts)


def tail_dataset(tasks: list[TaskData], embeddings: dict[str, CatalogEmbeddings], protocol: str,
                 cfg: SequenceConfig) -> StageDataset:
    """Stage 3: training seed sets -> the tail centroid of their pattern (true attribute, training items)."""
    parts = []
    for task in tasks:
        seeds = task.seed_sets[protocol]["train"]
        seeds = seeds.subset(np.flatnonzero(task.has_tail[protocol][seeds.pattern]))
        vectors = embeddings[task.task.domain].items
        conditions, mask = seed_conditions(seeds, task_token(task.name), vectors, task.scores[protocol], cfg.max_items)
        goal = encode_targets(task.tails[protocol][seeds.pattern], centroids(vectors, seeds.positions), cfg.target)
        parts.append(StageDataset(conditions, mask, goal, np.full(len(seeds), task.name)))
    return StageDataset.concat(parts)
