"""One retriever interface for every method: a batch of query texts in; for each query its retrieval
directions (and sub-queries, for text fan-outs), the candidates of each direction, and the merged set.

`pool_size` is the candidate budget per query, split evenly over a method's directions (OAR: K, one
item per direction; WSCR: K x m, e.g. 10 x 500 = 5,000), and no item is given to two directions, so every method
gets a pool of the same number of distinct items (see `distinct_columns`).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from r4t_pipeline.config import FanoutSampling, SamplerName
from r4t_pipeline.encoders import EmbeddingSpace
from r4t_pipeline.fanout import fanout_subqueries, parse_fanout
from r4t_pipeline.index import VectorIndex


@dataclass
class Fanout:
    """One query's fan-out: directions (n, d), and each direction's candidate ids and scores."""

    query: str
    directions: np.ndarray
    candidate_ids: list[list[str]]
    candidate_scores: list[np.ndarray]
    subqueries: list[str] | None = None

    def within(self, pool_size: int) -> Fanout:
        """The same fan-out at a smaller pool: each direction keeps its first ceil(pool / n) candidates, which is
        what retrieving that pool directly gives (`distinct_columns` fills the pool in rounds)."""
        m = share(pool_size, len(self.directions))
        return Fanout(self.query, self.directions, [ids[:m] for ids in self.candidate_ids],
                      [s[:m] for s in self.candidate_scores], self.subqueries)

    @property
    def merged(self) -> list[str]:
        """The item set: candidates interleaved by rank across directions, first occurrence kept."""
        ranked = (ids[r] for r in range(max(map(len, self.candidate_ids), default=0))
                  for ids in self.candidate_ids if r < len(ids))
        return list(dict.fromkeys(ranked))


@dataclass
class RetrievalBatch:
    fanouts: list[Fanout]
    fanout_seconds: float       # generating the directions (the cost R4T compiles away)
    search_seconds: float       # nearest-neighbour search of all directions, and filling the pool from it
    extras: dict = field(default_factory=dict)


class Retriever(ABC):
    name: str
    # True: E_q(q) joins each fan-out as its first direction (and the query as its first sub-query), as RAG-Fusion
    # keeps the original query among its generated ones
    keep_query: bool = False

    def __init__(self, space: EmbeddingSpace, index: VectorIndex):
        self.space, self.index = space, index

    @abstractmethod
    def directions(self, queries: list[str], seed: int, reference_ids: list[list[str]] | None = None
                   ) -> tuple[list[np.ndarray], list[list[str]] | None]:
        """Per query an (n, d) array of unit directions, and the sub-query texts when there are any."""

    def embed_subqueries(self, subqueries: list[list[str]]) -> list[np.ndarray]:
        """Per query its sub-queries' E_q embeddings, all encoded in one call."""
        flat = self.space.encode_queries([s for group in subqueries for s in group])
        bounds = np.cumsum([0] + [len(g) for g in subqueries])
        return [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    def retrieve(self, queries: list[str], pool_size: int, seed: int = 0,
                 reference_ids: list[list[str]] | None = None, keep_query: bool | None = None) -> RetrievalBatch:
        """`keep_query`: this call's choice (None: the retriever's `keep_query`)."""
        if not queries or any(not q.strip() for q in queries):
            raise ValueError("queries must be non-empty texts")
        keep_query = self.keep_query if keep_query is None else keep_query
        started = time.perf_counter()
        directions, subqueries = self.directions(queries, seed, reference_ids)
        if keep_query:
            own = self.space.encode_queries(queries)
            directions = [np.vstack([own[i:i + 1], d]) for i, d in enumerate(directions)]
            subqueries = None if subqueries is None else [[q, *s] for q, s in zip(queries, subqueries)]
        fanned = time.perf_counter()
        per_direction = [share(pool_size, len(d)) for d in directions]
        # twice a direction's share is deep enough to skip what the others took, unless they overlap most of it;
        # a lone direction (the plain query) has nothing to skip
        depth = max(m * min(len(d), 2) for m, d in zip(per_direction, directions))
        scores, positions = self.index.search(np.concatenate(directions), depth)
        fanouts, row = [], 0
        for i, (query, dirs) in enumerate(zip(queries, directions)):
            m, top = per_direction[i], slice(row, row + len(dirs))
            row += len(dirs)
            found, ranked = scores[top], positions[top]
            columns = distinct_columns(ranked, m)
            if min(map(len, columns)) < m and ranked.shape[1] < min(m * len(dirs), len(self.index)):
                found, ranked = self.index.search(dirs, m * len(dirs))  # deep enough for any overlap
                columns = distinct_columns(ranked, m)
            fanouts.append(Fanout(query, dirs, [list(self.index.ids[r[c]]) for r, c in zip(ranked, columns)],
                                  [f[c] for f, c in zip(found, columns)],
                                  None if subqueries is None else subqueries[i]))
        searched = time.perf_counter()
        return RetrievalBatch(fanouts, fanned - started, searched - fanned)


def share(pool_size: int, directions: int) -> int:
    """Each direction's part of the pool: ceil(pool / n), at least one."""
    return max(1, -(-pool_size // directions))


def distinct_columns(positions: np.ndarray, m: int) -> list[list[int]]:
    """Per direction, the columns of its m candidates in `positions` (n directions x ranked depth): in m rounds,
    each direction in turn takes its best item that no earlier turn took. Directions that overlap would otherwise
    spend the pool on duplicates (a fifth of it for ten sub-queries of one set title); this way the pool holds n x m
    distinct items, among them every direction's own top m, and its first r rounds are the pool of r per direction.
    A direction whose ranked list runs out (a catalog smaller than the pool) gets fewer."""
    ranked, depth = positions.tolist(), positions.shape[1]
    taken, columns, following = set(), [[] for _ in ranked], [0] * len(ranked)
    for _ in range(m):
        for direction, items in enumerate(ranked):
            column = following[direction]
            while column < depth and items[column] in taken:
                column += 1
            if column < depth:
                taken.add(items[column])
                columns[direction].append(column)
            following[direction] = column + 1
    return columns


class NoFanout(Retriever):
    """The query alone, one direction: E_q(q)."""

    name = "no_fanout"

    def directions(self, queries, seed, reference_ids=None):
        return list(self.space.encode_queries(queries)[:, None, :]), None


class TextFanout(Retriever):
    """Sub-queries written by a causal LM, each embedded by E_q. An unparseable completion falls back to
    the query itself, so every query gets at least one direction."""

    name = "text_fanout"

    def __init__(self, space: EmbeddingSpace, index: VectorIndex, model, tokenizer, k: int,
                 sampling: FanoutSampling | None = None, batch_size: int = 16, prefix_query: bool = False):
        super().__init__(space, index)
        self.model, self.tokenizer, self.k = model, tokenizer, k
        self.sampling, self.batch_size, self.prefix_query = sampling or FanoutSampling(), batch_size, prefix_query

    def sample_subqueries(self, queries: list[str], num_samples: int, seed: int) -> list[list[list[str]]]:
        from r4t_pipeline.folm.generate import generate_fanouts

        s = self.sampling
        completions = generate_fanouts(self.model, self.tokenizer, queries, self.k, num_samples, s.temperature,
                                       s.max_new_tokens, self.batch_size, seed, s.no_repeat_ngram_size,
                                       self.k if s.fill_k_lines else 0)
        return [[fanout_subqueries(q, parse_fanout(c, self.k).subqueries, self.prefix_query) or [q] for c in group]
                for q, group in zip(queries, completions)]

    def directions(self, queries, seed, reference_ids=None):
        subqueries = [group[0] for group in self.sample_subqueries(queries, 1, seed)]
        return self.embed_subqueries(subqueries), subqueries


class ZeroShotFanout(TextFanout):
    """The base FOLM before RL."""

    name = "zero_shot"


class R4TFolm(TextFanout):
    """The RL-tuned FOLM."""

    name = "r4t_folm"


class BestOfN(TextFanout):
    """N zero-shot fan-outs per query, the best kept by a reference-free reward (`scorer`): the OAR reward.
    At query time there is no reference set, so in WSCR too the selection scores groundedness, diversity and
    alignment over the items rather than coverage (which would make it an oracle)."""

    name = "best_of_n"

    def __init__(self, *args, scorer, n: int = 10, **kwargs):
        super().__init__(*args, **kwargs)
        self.scorer, self.n = scorer, n

    def directions(self, queries, seed, reference_ids=None):
        samples = self.sample_subqueries(queries, self.n, seed)
        flat_queries = [q for q, group in zip(queries, samples) for _ in group]
        totals = np.array([t["total"] for t in self.scorer.score_subqueries(
            flat_queries, [s for group in samples for s in group])]).reshape(len(queries), -1)
        best = [group[int(np.argmax(row))] for group, row in zip(samples, totals)]
        return self.embed_subqueries(best), best


class R4TDiffusion(Retriever):
    """All K directions in one pass of the EDM diffusion transformer, conditioned on E_q(q)."""

    name = "r4t_diffusion"

    def __init__(self, space: EmbeddingSpace, index: VectorIndex, model, sampler: SamplerName = "heun",
                 steps: int | None = None, guidance: float = 0.1):
        super().__init__(space, index)
        self.model, self.sampler, self.steps, self.guidance = model, sampler, steps, guidance

    def directions(self, queries, seed, reference_ids=None):
        conditions = self.space.encode_queries(queries)
        samples = self.model.sample(conditions, sampler=self.sampler, steps=self.steps, guidance=self.guidance,
                                    seed=seed)
        return list(samples), None


class SupervisedDiffusion(R4TDiffusion):
    """The same sampler over the supervised anchor: a denoiser trained on the real training sets (`slate`)."""

    name = "supervised_diffusion"
