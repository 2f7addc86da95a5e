"""Set-level fan-out rewards (SPEC §2): groundedness, diversity (Vendi), alignment for OAR; hard and soft
coverage of a reference set for WSCR; plus the format term of the FOLM output.

The term functions are pure numpy on L2-normalised embeddings (cos = dot product) and accept leading
batch dimensions. `FanoutScorer` executes a batch of fan-outs against one `VectorIndex` (OAR: the
collections; WSCR: the items) with a single index search and returns one dict of terms per fan-out.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field

from r4t_pipeline.config import Regime
from r4t_pipeline.encoders import EmbeddingSpace, l2_normalize
from r4t_pipeline.fanout import ParsedFanout, assets_dir, fanout_subqueries, format_penalty, parse_fanout
from r4t_pipeline.index import VectorIndex

OAR_TERMS = ("groundedness", "diversity", "alignment")
WSCR_TERMS = ("coverage", "soft_coverage")
# Lowest value each term can take on unit vectors (diversity = VS/K > 0); the empty-parse reward uses them.
TERM_LOWER_BOUNDS = {"groundedness": -1.0, "diversity": 0.0, "alignment": -1.0, "coverage": 0.0,
                     "soft_coverage": -1.0}


# ---- reward terms (pure) -------------------------------------------------------------------------

def groundedness(top1_scores: np.ndarray) -> np.ndarray:
    """r_g = (1/K) Σ_k max_{c∈D} cos(e_k, E_c(c)); `top1_scores` (..., K) are the top-1 search scores."""
    return np.mean(np.asarray(top1_scores, np.float64), axis=-1)


def vendi_score(vectors: np.ndarray) -> np.ndarray:
    """VS = exp(-Σ_i λ_i log λ_i), λ = eigenvalues of S/n, S = V Vᵀ (cosine kernel). Rows unit-norm;
    (..., n, d) -> (...), in [1, n]. The `vendi-score` package computes one set at a time; the reward scores
    thousands of fan-outs per step, so this batched form stays (tests hold it equal to the package)."""
    v = np.asarray(vectors, np.float64)
    n_rows = v.shape[-2]
    eigenvalues = np.clip(np.linalg.eigvalsh(v @ np.swapaxes(v, -1, -2) / n_rows), 0.0, None)  # drop -1e-17s
    safe = np.where(eigenvalues > 0, eigenvalues, 1.0)  # 0·log 0 = 0
    return np.exp(-np.sum(eigenvalues * np.log(safe), axis=-1))


def diversity(retrieved_item_vectors: np.ndarray, k: int) -> np.ndarray:
    """r_d = VS(E_c(c_1..c_n)) / K over the n parsed sub-queries' items, K the configured fan-out size (not n:
    a one-line fan-out must not score maximal diversity); (..., n, d) -> (...), in (0, n / K]."""
    return vendi_score(retrieved_item_vectors) / k


def alignment(sub_vectors: np.ndarray, query_vector: np.ndarray) -> np.ndarray:
    """r_a = (1/K) Σ_k cos(e_k, E_q(q)); sub_vectors (..., K, d), query_vector (..., d) -> (...)."""
    cos = np.einsum("...kd,...d->...k", np.asarray(sub_vectors, np.float64), np.asarray(query_vector, np.float64))
    return cos.mean(axis=-1)


def query_specificity(directions: Sequence[np.ndarray], query_vectors: np.ndarray,
                      query_ids: Sequence | None = None) -> np.ndarray:
    """Per fan-out: the mean cosine of its directions to its own query minus to another query (the next distinct
    one in order, the last compared with the first; rows with equal `query_ids` share a query). Near 0 the
    directions do not depend on the query (a fan-out LM writing catalog-style lines whatever the intent), which
    none of the reward terms shows: groundedness and diversity reward such lines. NaN with fewer than two queries."""
    query_vectors = np.asarray(query_vectors, np.float64)
    keys = list(range(len(query_vectors)) if query_ids is None else query_ids)
    if not len(directions) == len(query_vectors) == len(keys):
        raise ValueError(f"directions ({len(directions)}), query_vectors ({len(query_vectors)}) and query_ids "
                         f"({len(keys)}) differ in length")
    first: dict = {}  # each distinct query's first row, in order
    for n, key in enumerate(keys):
        first.setdefault(key, n)
    if len(first) < 2:
        return np.full(len(query_vectors), np.nan)
    following = dict(zip(first, np.roll(list(first.values()), -1)))
    other = query_vectors[[following[key] for key in keys]]
    return np.array([float((np.asarray(d, np.float64) @ (q - o)).mean())
                     for d, q, o in zip(directions, query_vectors, other)])


def coverage(retrieved_ids_per_direction: Sequence[Sequence] | np.ndarray, reference_ids: Sequence) -> float:
    """r_cov = |Y ∩ ∪_k R_k| / |Y|; R_k = the top-m ids of direction k (any id type, Y as a set)."""
    reference = np.unique(np.asarray(reference_ids))
    if reference.size == 0:
        raise ValueError("reference_ids is empty: coverage of an empty reference set is undefined")
    retrieved = np.concatenate([np.asarray(r).ravel() for r in retrieved_ids_per_direction])
    return float(np.isin(reference, retrieved).mean())


def soft_coverage(sub_vectors: np.ndarray, reference_vectors: np.ndarray) -> float:
    """r_soft = (1/|Y|) Σ_{y∈Y} max_k cos(e_k, E_c(y)); sub_vectors (K, d), reference_vectors (|Y|, d)."""
    if len(reference_vectors) == 0:
        raise ValueError("reference_vectors is empty: soft coverage of an empty reference set is undefined")
    cos = np.asarray(reference_vectors, np.float64) @ np.asarray(sub_vectors, np.float64).T
    return float(cos.max(axis=1).mean())


# ---- configuration -------------------------------------------------------------------------------

class RewardConfig(BaseModel):
    """Reward settings; presets in assets/rewards/*.yaml (`load_reward_preset`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    regime: Regime = "oar"
    k: int = Field(10, ge=1, description="sub-queries asked of the FOLM (format term target)")
    w_groundedness: float = Field(0.6, ge=0)
    w_diversity: float = Field(0.2, ge=0)
    w_alignment: float = Field(0.2, ge=0)
    coverage_top_m: int = Field(500, ge=1, description="items retrieved per direction for r_cov")
    coverage_hard_weight: float = Field(0.5, ge=0, le=1, description="WSCR: h r_cov + (1 - h) r_soft")
    format_coef: float = Field(0.5, ge=0, description="format term -coef |K - K_parsed| / K, capped at -coef")
    prefix_query: bool = Field(True, description="each sub-query is the query followed by the FOLM's line "
                                                 "(`fanout.with_query`), in the reward and in every text fan-out; "
                                                 "false: the line alone, e_k = E_q(line)")

    def composite(self, terms: Mapping[str, float]) -> float:
        """OAR: w_g r_g + w_d r_d + w_a r_a.  WSCR: h r_cov + (1 - h) r_soft."""
        if self.regime == "oar":
            return (self.w_groundedness * terms["groundedness"] + self.w_diversity * terms["diversity"]
                    + self.w_alignment * terms["alignment"])
        h = self.coverage_hard_weight
        return h * terms["coverage"] + (1 - h) * terms["soft_coverage"]

    def format_term(self, parsed: ParsedFanout) -> float:
        """SPEC's penalty, capped at -coef (an empty parse's) so that the empty-parse reward stays the
        minimum even for completions with K or more extra lines."""
        return max(format_penalty(parsed, self.k, self.format_coef), -self.format_coef)

    @property
    def empty_parse_reward(self) -> float:
        """The minimum reward: the composite with every term at its lower bound (weights are ≥ 0, so this
        is the composite's infimum: -0.8 for OAR 0.6/0.2/0.2, -0.5 for WSCR h = 0.5) plus the largest
        format term, -coef. Every non-empty fan-out scores at least this (equality needs cos = -1)."""
        return float(self.composite(TERM_LOWER_BOUNDS)) - self.format_coef


def load_reward_preset(name_or_path: str | Path) -> RewardConfig:
    """A preset by name (assets/rewards/<name>.yaml) or by path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = assets_dir() / "rewards" / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (assets_dir() / "rewards").glob("*.yaml"))
        raise ValueError(f"reward preset {str(name_or_path)!r} not found at {path}; known presets: {known}")
    try:  # pydantic's ValidationError is a ValueError; a YAML list or scalar fails here too
        return RewardConfig.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
    except ValueError as error:
        raise ValueError(f"{path}: invalid reward preset: {error}") from error


# ---- scorer --------------------------------------------------------------------------------------

class FanoutScorer:
    """Scores fan-outs (texts or vectors) against `index`, the database D of the configured regime."""

    def __init__(self, space: EmbeddingSpace, index: VectorIndex, config: RewardConfig,
                 cache_size: int = 200_000):
        if space.dim != index.dim:
            raise ValueError(f"embedding space dim {space.dim} differs from index dim {index.dim}")
        self.space, self.index, self.config = space, index, config
        self.cache_size = cache_size
        self._query_vectors: OrderedDict[str, np.ndarray] = OrderedDict()  # LRU: text -> E_q(text)
        self._position_of: dict | None = None

    # -- the vector path ---------------------------------------------------------------------------

    def score_directions(self, query_vectors: np.ndarray, directions: np.ndarray,
                         reference_ids: Sequence[Sequence[str]] | None = None) -> list[dict[str, float]]:
        """Score B fan-outs of K retrieval directions each: query_vectors (B, d), directions (B, K, d)."""
        query_vectors, directions = np.asarray(query_vectors), np.asarray(directions)
        if directions.ndim != 3 or query_vectors.shape != (len(directions), directions.shape[-1]):
            raise ValueError(f"expected query_vectors (B, d) and directions (B, K, d); got "
                             f"{query_vectors.shape} and {directions.shape}")
        return self._score_fanouts(query_vectors, list(directions), reference_ids)

    def _score_fanouts(self, query_vectors: np.ndarray, fanouts: list[np.ndarray],
                       reference_ids: Sequence[Sequence[str]] | None) -> list[dict[str, float]]:
        """Terms of B fan-outs of varying size, from one index search over all their rows."""
        wscr = self.config.regime == "wscr"
        if wscr and (reference_ids is None or len(reference_ids) != len(fanouts)):
            raise ValueError(f"reference_ids: regime 'wscr' needs one reference id list per fan-out "
                             f"({len(fanouts)}), got {None if reference_ids is None else len(reference_ids)}")
        if not fanouts:
            return []
        sizes = np.array([len(f) for f in fanouts])
        if (sizes == 0).any():
            raise ValueError(f"fan-out {int(np.argmin(sizes))} has no directions")
        rows = l2_normalize(np.concatenate(fanouts))
        query_vectors = l2_normalize(query_vectors)
        scores, positions = self.index.search(rows, self.config.coverage_top_m if wscr else 1)
        top1_vectors = self.index.vectors[positions[:, 0]]
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])

        results: list[dict[str, float]] = [{} for _ in fanouts]
        for size in np.unique(sizes):  # same-size fan-outs are scored as one stacked batch
            members = np.flatnonzero(sizes == size)
            row_ids = starts[members, None] + np.arange(size)  # (members, size)
            batch = {"groundedness": groundedness(scores[row_ids, 0]),
                     "diversity": diversity(top1_vectors[row_ids], self.config.k),
                     "alignment": alignment(rows[row_ids], query_vectors[members])}
            for j, b in enumerate(members):
                results[b] = {name: float(values[j]) for name, values in batch.items()}
                if wscr:
                    reference = self._positions(reference_ids[b], fanout=int(b))
                    results[b]["coverage"] = coverage(positions[row_ids[j]], reference)
                    results[b]["soft_coverage"] = soft_coverage(rows[row_ids[j]], self.index.vectors[reference])
        for terms in results:
            terms["composite"] = terms["total"] = float(self.config.composite(terms))
        return results

    def _positions(self, ids: Sequence[str], fanout: int) -> np.ndarray:
        """Index rows of reference item ids (deduplicated: Y is a set)."""
        if self._position_of is None:
            self._position_of = {item_id: n for n, item_id in enumerate(self.index.ids.tolist())}
        missing = [i for i in ids if i not in self._position_of]
        if missing or not len(ids):
            raise ValueError(f"reference_ids[{fanout}]: " + (f"ids not in the index: {missing[:5]}" if missing
                                                             else "empty reference set"))
        return np.unique([self._position_of[i] for i in ids])

    # -- the text path -----------------------------------------------------------------------------

    def score_texts(self, queries: Sequence[str], completions: Sequence[str],
                    reference_ids: Sequence[Sequence[str]] | None = None) -> list[dict[str, float]]:
        """Parse each FOLM completion and score it, format term included."""
        if len(queries) != len(completions):
            raise ValueError(f"queries ({len(queries)}) and completions ({len(completions)}) differ in length")
        return self._score_parsed(queries, [parse_fanout(c, self.config.k) for c in completions], reference_ids)

    def score_subqueries(self, queries: Sequence[str], subquery_lists: Sequence[Sequence[str]],
                         reference_ids: Sequence[Sequence[str]] | None = None) -> list[dict[str, float]]:
        """Score already-parsed fan-outs as given (no de-duplication); the format term counts them against
        K and only the first K are scored, as for a parsed completion."""
        if len(queries) != len(subquery_lists):
            raise ValueError(f"queries ({len(queries)}) and subquery_lists ({len(subquery_lists)}) differ in length")
        k = self.config.k
        parsed = [ParsedFanout(tuple(s[:k]), n_parsed=len(s), unparseable=False) for s in subquery_lists]
        return self._score_parsed(queries, parsed, reference_ids)

    def subqueries(self, query: str, lines: Sequence[str]) -> list[str]:
        """The texts this reward embeds for a fan-out's lines (with the query in front where `prefix_query`)."""
        return fanout_subqueries(query, lines, self.config.prefix_query)

    def __call__(self, queries: list[str], completions: list[str], **columns) -> list[dict[str, float]]:
        """The FOLM trainer's reward_fn; WSCR reads the `reference_ids` column, other columns are ignored."""
        return self.score_texts(queries, completions, columns.get("reference_ids"))

    def _score_parsed(self, queries: Sequence[str], parsed: Sequence[ParsedFanout],
                      reference_ids: Sequence[Sequence[str]] | None) -> list[dict[str, float]]:
        if reference_ids is not None and len(reference_ids) != len(parsed):
            raise ValueError(f"reference_ids ({len(reference_ids)}) and fan-outs ({len(parsed)}) differ in length")
        scored = [i for i, p in enumerate(parsed) if not p.is_empty]
        subqueries = [self.subqueries(queries[i], parsed[i].subqueries) for i in scored]
        vectors = self.embed_texts([queries[i] for i in scored] + [s for group in subqueries for s in group])
        query_vectors, sub_vectors = vectors[:len(scored)], vectors[len(scored):]
        bounds = itertools.pairwise(np.cumsum([0] + [len(group) for group in subqueries]))
        fanouts = [sub_vectors[a:b] for a, b in bounds]
        terms = self._score_fanouts(query_vectors, fanouts,
                                    None if reference_ids is None else [reference_ids[i] for i in scored])
        # not a reward term (weight 0 in GRPO, which logs it): whether the lines depend on their query at all
        specific = query_specificity(fanouts, query_vectors, [queries[i] for i in scored])
        results = [self._empty_parse_terms() for _ in parsed]
        for i, t, q in zip(scored, terms, specific):
            fmt = self.config.format_term(parsed[i])
            results[i] = {**t, "format": fmt, "n_subqueries": float(len(parsed[i].subqueries)),
                          "query_specificity": float(q), "total": t["composite"] + fmt}
        return results

    def _empty_parse_terms(self) -> dict[str, float]:
        """Every term at its lower bound, so that total = composite + format holds here too."""
        shown = OAR_TERMS + (WSCR_TERMS if self.config.regime == "wscr" else ())
        terms = {name: TERM_LOWER_BOUNDS[name] for name in shown}
        return {**terms, "composite": float(self.config.composite(terms)), "format": -self.config.format_coef,
                "n_subqueries": 0.0, "query_specificity": float("nan"), "total": self.config.empty_parse_reward}

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """E_q of all texts with one encoder call for those not in the in-memory LRU cache."""
        batch = {t: self._query_vectors[t] for t in dict.fromkeys(texts) if t in self._query_vectors}
        missing = [t for t in dict.fromkeys(texts) if t not in batch]
        if missing:
            batch.update(zip(missing, self.space.encode_queries(missing)))
        for text, vector in batch.items():
            self._query_vectors[text] = vector
            self._query_vectors.move_to_end(text)
        while len(self._query_vectors) > self.cache_size:
            self._query_vectors.popitem(last=False)
        if not texts:
            return np.zeros((0, self.space.dim), np.float32)
        return np.stack([batch[t] for t in texts])
