"""Seed-set expansion methods behind one interface: `retrieve(seeds, k) -> (m, k)` item positions, seeds
excluded. Baselines: the seed centroid, global attribute retrieval, a fixed interpolation along the attribute
direction; generators: the diffusion checkpoints of stages 1-4 (query embeddings from the seed sequence)."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from r4t_pipeline.diffusion.train import DiffusionRetrieverModel
from r4t_pipeline.encoders import l2_normalize
from r4t_pipeline.modit.config import SamplingConfig, SequenceConfig
from r4t_pipeline.modit.data import centroids, decode_queries, seed_conditions
from r4t_pipeline.modit.retrieval import ItemSearcher
from r4t_pipeline.modit.tasks import SeedSets


def seed_centroids(vectors: np.ndarray, seeds: SeedSets) -> np.ndarray:
    """(m, d) normalised mean of each seed set's item embeddings."""
    return centroids(vectors, seeds.positions)


def interpolate(centroid: np.ndarray, direction: np.ndarray, lam: float) -> np.ndarray:
    """normalise(centroid + lambda * attribute direction) per row: lambda = 0 is the seed centroid."""
    return l2_normalize(centroid + lam * direction[None])


class ExpansionMethod(ABC):
    name: str

    @abstractmethod
    def retrieve(self, seeds: SeedSets, k: int) -> np.ndarray:
        """(m, k) positions of the retrieved items, best first, none of them a seed; -1 pads a short list."""


class QueryMethod(ExpansionMethod):
    """A method that writes query embeddings (m, Q, d) and lets nearest-neighbour search do the rest."""

    def __init__(self, searcher: ItemSearcher):
        self.searcher = searcher

    @abstractmethod
    def queries(self, seeds: SeedSets) -> np.ndarray: ...

    def retrieve(self, seeds: SeedSets, k: int) -> np.ndarray:
        return self.searcher.search(self.queries(seeds), seeds.positions, k)


class SeedCentroid(QueryMethod):
    name = "seed_centroid"

    def __init__(self, searcher: ItemSearcher, vectors: np.ndarray):
        super().__init__(searcher)
        self.vectors = vectors

    def queries(self, seeds: SeedSets) -> np.ndarray:
        return seed_centroids(self.vectors, seeds)[:, None]


class Interpolation(SeedCentroid):
    name = "interpolation"

    def __init__(self, searcher: ItemSearcher, vectors: np.ndarray, direction: np.ndarray, lam: float):
        super().__init__(searcher, vectors)
        self.direction, self.lam = direction, lam

    def queries(self, seeds: SeedSets) -> np.ndarray:
        return interpolate(seed_centroids(self.vectors, seeds), self.direction, self.lam)[:, None]


class GlobalAttribute(ExpansionMethod):
    """The attribute-positive items nearest to the seed centroid, whatever their pattern (the labels of every
    database item are known at query time)."""

    name = "global_attribute"

    def __init__(self, vectors: np.ndarray, positive: np.ndarray, name: str | None = None):
        self.vectors = vectors
        self.searcher = ItemSearcher(vectors, positive)
        self.name = name or self.name

    def retrieve(self, seeds: SeedSets, k: int) -> np.ndarray:
        return self.searcher.search(seed_centroids(self.vectors, seeds)[:, None], seeds.positions, k)


class Generator(QueryMethod):
    """A diffusion checkpoint reading [token, seeds by ascending predicted attribute] and generating
    `queries_per_seed_set` query embeddings (independent samples) per seed set."""

    def __init__(self, name: str, searcher: ItemSearcher, model: DiffusionRetrieverModel, token: str,
                 vectors: np.ndarray, scores: np.ndarray, sampling: SamplingConfig, sequences: SequenceConfig):
        super().__init__(searcher)
        self.name, self.model, self.token = name, model, token
        self.vectors, self.scores, self.sampling, self.sequences = vectors, scores, sampling, sequences

    def queries(self, seeds: SeedSets, seed: int | None = None, count: int | None = None) -> np.ndarray:
        """(m, count) queries, count = queries_per_seed_set unless given; sample n uses seed + n."""
        conditions, mask = seed_conditions(seeds, self.token, self.vectors, self.scores, self.sequences.max_items)
        first = self.sampling.seed if seed is None else seed
        samples = [self.model.sample(conditions, condition_mask=mask, sampler=self.sampling.sampler,
                                     steps=self.sampling.steps, guidance=self.sampling.guidance, seed=first + n,
                                     num_rows=1, normalize=False)
                   for n in range(count or self.sampling.queries_per_seed_set)]
        return decode_queries(np.concatenate(samples, axis=1), seed_centroids(self.vectors, seeds),
                              self.sequences.target)
