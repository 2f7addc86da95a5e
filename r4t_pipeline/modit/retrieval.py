"""Top-K search for seed-set expansion (seeds excluded, several queries per seed set interleaved) and the
pattern-preserving attribute metrics Joint@K, Purity@K and Attr@K."""

from __future__ import annotations

import numpy as np

from r4t_pipeline.index import VectorIndex


class ItemSearcher:
    """Exact inner-product search over `vectors[allowed]` (all items when allowed is None), answering with row
    positions into `vectors`: the full database for evaluation, the training items for HPPO's online labels,
    the attribute-positive items for the global attribute baseline."""

    def __init__(self, vectors: np.ndarray, allowed: np.ndarray | None = None):
        self.positions = np.arange(len(vectors)) if allowed is None else np.flatnonzero(allowed)
        if len(self.positions) == 0:
            raise ValueError("nothing to search: no item is allowed")
        self.index = VectorIndex.build(vectors[self.positions], self.positions.astype(str))

    def search(self, queries: np.ndarray, exclude: np.ndarray, k: int) -> np.ndarray:
        """queries (B, Q, d), exclude (B, S) -1 padded -> (B, k) item positions, -1 padded when the database is
        too small. Each query row retrieves k + S candidates; the rows' lists are interleaved (first of every row,
        then the second of every row, ...), excluded and repeated items dropped, and the first k kept."""
        queries = np.asarray(queries, np.float32)
        if queries.ndim == 2:
            queries = queries[:, None]
        batch, per_set, _ = queries.shape
        depth = k + exclude.shape[1]
        _, rows = self.index.search(queries.reshape(batch * per_set, -1), depth)
        found = np.where(rows >= 0, self.positions[np.maximum(rows, 0)], -1).reshape(batch, per_set, -1)
        interleaved = found.transpose(0, 2, 1).reshape(batch, -1)
        out = np.full((batch, k), -1, np.int64)
        for b in range(batch):
            banned = set(exclude[b][exclude[b] >= 0].tolist())
            kept = []
            for position in interleaved[b].tolist():
                if position >= 0 and position not in banned:
                    banned.add(position)
                    kept.append(position)
                    if len(kept) == k:
                        break
            out[b, :len(kept)] = kept
        return out


def expansion_metrics(retrieved: np.ndarray, seed_pattern: np.ndarray, patterns: np.ndarray, positive: np.ndarray,
                      ks: list[int]) -> dict[str, np.ndarray]:
    """Per seed set, at each K: Purity@K (fraction of the top-K in the seeds' pattern), Attr@K (fraction with the
    attribute) and Joint@K (both). The denominator is K: a short list counts its missing slots as misses."""
    present = retrieved >= 0
    safe = np.maximum(retrieved, 0)
    in_pattern = present & (patterns[safe] == seed_pattern[:, None])
    has_attribute = present & positive[safe]
    metrics = {}
    for k in ks:
        metrics[f"purity@{k}"] = in_pattern[:, :k].sum(axis=1) / k
        metrics[f"attr@{k}"] = has_attribute[:, :k].sum(axis=1) / k
        metrics[f"joint@{k}"] = (in_pattern & has_attribute)[:, :k].sum(axis=1) / k
    return metrics


def oracle_joint(seed_positions: np.ndarray, seed_pattern: np.ndarray, patterns: np.ndarray, positive: np.ndarray,
                 ks: list[int]) -> dict[str, np.ndarray]:
    """The best Joint@K any method can reach per seed set: min(K, positives of the pattern outside the seeds) / K."""
    per_pattern = np.bincount(patterns[positive], minlength=int(patterns.max()) + 1)
    seeds = np.where(seed_positions >= 0, seed_positions, 0)
    positive_seeds = ((seed_positions >= 0) & positive[seeds]).sum(axis=1)
    available = per_pattern[seed_pattern] - positive_seeds
    return {f"joint@{k}": np.minimum(available, k) / k for k in ks}
