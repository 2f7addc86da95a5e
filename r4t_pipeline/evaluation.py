"""Evaluation (SPEC §7, paper Appendix B) of any `Retriever` on held-out queries.

WSCR: Recall@pool and Hit@pool (each of K directions retrieves pool/K candidates, none taken twice; the paper's
pool is 5,000 = 10 x 500; we also report a pool of 3.5% of the catalog, the paper's pool-to-catalog ratio), each a
mean over R independent runs per query, and the Vendi Score across those runs of each query's representative
embedding (mean direction).
OAR: embedding proxies, on 0-100, of the paper's LLM-judge dimensions:
  groundedness = mean cos(retrieved collection, the direction that retrieved it)
  diversity    = (VS(retrieved collections) - 1) / (K - 1)   (Vendi, cosine kernel; duplicates count)
  alignment    = mean cos(retrieved collection, E_q(query))
Every number is a mean over queries with a bootstrap standard error over queries; the comparisons the method's
claims rest on (zero-shot against no fan-out, R4T-FOLM against zero-shot, R4T-Diffusion against R4T-FOLM and against
the supervised anchor) are also reported as paired differences over the same queries, whose errors are far smaller
than either method's own, since the hard queries are hard for both. R4T-Diffusion is also evaluated
with a sweep of samplers and step counts, each with its fan-out latency at batch 8, so the sampler's cost is read
off beside what it buys. WSCR on a catalog whose items carry categories also gets its headroom: the recall of two
fixed fan-outs of category names that bracket what a sub-query writer at that granularity can reach.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm
from vendi_score import vendi

from r4t_pipeline.bench import time_batches
from r4t_pipeline.diffusion.edm import network_calls
from r4t_pipeline.encoders import l2_normalize
from r4t_pipeline.io import write_json
from r4t_pipeline.methods import KEPT_QUERY
from r4t_pipeline.retrievers import RetrievalBatch, Retriever
from r4t_pipeline.rewards import query_specificity
from r4t_pipeline.stats import defined_means, mean_and_error
from r4t_pipeline.tracking import NamedLogFn

METRICS_FILE = "metrics.json"  # what `run_evaluation` returns, as the evaluation asset writes it
# of what `run_evaluation` returns, per regime: bump a regime's when a field is added or changes meaning there, so
# that only its evaluations go stale (WSCR 4: scores are means over the runs, and `runs` is recorded)
RESULT_VERSION = {"oar": 3, "wscr": 4}
# (method, against): the paper's claims, each a paired difference over the same test queries
COMPARISONS = (("zero_shot", "no_fanout"), ("r4t_folm", "zero_shot"), ("r4t_diffusion", "r4t_folm"),
               ("r4t_diffusion", "supervised_diffusion"))


def wscr_pool_metrics(batch: RetrievalBatch, reference_ids: Sequence[Sequence[str]]) -> dict[str, np.ndarray]:
    recall, hit = [], []
    for fanout, reference in zip(batch.fanouts, reference_ids):
        pool = {i for ids in fanout.candidate_ids for i in ids}
        found = len(set(reference) & pool)
        recall.append(found / len(set(reference)))
        hit.append(float(found > 0))
    return {"recall": np.array(recall), "hit": np.array(hit)}


def run_vendi(runs: Sequence[RetrievalBatch]) -> np.ndarray:
    """Per query: Vendi Score across R runs of the run's representative embedding (its mean direction)."""
    per_query = zip(*[[l2_normalize(f.directions.mean(axis=0)) for f in batch.fanouts] for batch in runs])
    return np.array([float(vendi.score_X(np.stack(reps), normalize=False)) for reps in per_query])


def oar_proxies(batch: RetrievalBatch, retriever: Retriever, query_vectors: np.ndarray) -> dict[str, np.ndarray]:
    position = {item_id: n for n, item_id in enumerate(retriever.index.ids.tolist())}
    grounded, diverse, aligned = [], [], []
    for fanout, query_vector in zip(batch.fanouts, query_vectors):
        retrieved = retriever.index.vectors[[position[i] for ids in fanout.candidate_ids for i in ids]]
        grounded.append(float(np.concatenate(fanout.candidate_scores).mean()))
        diverse.append((float(vendi.score_X(retrieved, normalize=False)) - 1) / max(len(retrieved) - 1, 1))
        aligned.append(float((retrieved @ query_vector).mean()))
    return {name: 100 * np.array(v) for name, v in
            (("groundedness", grounded), ("diversity", diverse), ("alignment", aligned))}


def specificity(batch: RetrievalBatch, query_vectors: np.ndarray) -> np.ndarray:
    """0-100: how much more a fan-out's directions point at its own query than at another test query's."""
    fanouts = batch.fanouts
    return 100 * query_specificity([f.directions for f in fanouts], query_vectors, [f.query for f in fanouts])


def truncate_pool(batch: RetrievalBatch, pool_size: int) -> RetrievalBatch:
    """The same fan-outs with a smaller pool, read off the candidates of a larger one (see `Fanout.within`)."""
    return RetrievalBatch([f.within(pool_size) for f in batch.fanouts], batch.fanout_seconds, batch.search_seconds)


def pooled_recall_and_hit(batch: RetrievalBatch, reference_ids: Sequence[Sequence[str]], pools: dict[str, int]
                          ) -> dict[str, np.ndarray]:
    """Per query, Recall and Hit (%) at each pool, read off one batch retrieved at the largest pool."""
    scores = {}
    for label, pool in pools.items():
        at_pool = wscr_pool_metrics(truncate_pool(batch, pool), reference_ids)
        scores[f"recall@{label}"], scores[f"hit@{label}"] = 100 * at_pool["recall"], 100 * at_pool["hit"]
    return scores


def mean_over_runs(batches: Sequence[RetrievalBatch], reference_ids: Sequence[Sequence[str]], pools: dict[str, int],
                   query_vectors: np.ndarray) -> dict[str, np.ndarray]:
    """Per query, Recall, Hit and query specificity averaged over R runs: one run's expected score, without the
    sampling noise of reading it off a single run (which would otherwise enter every paired difference)."""
    per_run = [{**pooled_recall_and_hit(batch, reference_ids, pools),
                "query_specificity": specificity(batch, query_vectors)} for batch in batches]
    return {name: np.mean([run[name] for run in per_run], axis=0) for name in per_run[0]}


def summarize(scores: dict[str, np.ndarray]) -> dict[str, tuple[float, float]]:
    """Mean and bootstrap standard error over queries of each per-query score."""
    return {name: mean_and_error(values) for name, values in scores.items()}


def wscr_scores(retriever: Retriever, queries: list[str], reference_ids: list[list[str]], pools: dict[str, int],
                runs: int, seed: int = 0) -> tuple[dict[str, np.ndarray], float]:
    """Per-query scores and the fan-out seconds per query. `pools`: label -> pool size, e.g. {"5K": 5000, "3.5%":
    668}; R runs are retrieved once at the largest pool, smaller pools are read off the same ranked candidates, every
    score is a mean over the R runs, and the Vendi Score is taken across them."""
    batches = [retriever.retrieve(queries, max(pools.values()), seed=seed + r, reference_ids=reference_ids)
               for r in range(runs)]
    scores = mean_over_runs(batches, reference_ids, pools, retriever.space.encode_queries(queries))
    scores["vendi"] = run_vendi(batches)
    return scores, sum(b.fanout_seconds for b in batches) / (runs * len(queries))


class CategoryFanout(Retriever):
    """Evaluation only (WSCR): one direction per category name, embedded by E_q like a sub-query. With `ceiling`,
    the distinct categories of the query's reference items: it reads the answer, so it is a bound, not a method.
    Otherwise `floor`: the same names for every query, the catalog's K most frequent categories (no intent)."""

    name = "category_fanout"

    def __init__(self, space, index, categories: dict[str, str], k: int, ceiling: bool):
        super().__init__(space, index)
        self.categories, self.k, self.ceiling = categories, k, ceiling
        self.frequent = [c for c, _ in Counter(c for c in categories.values() if c).most_common(k)]

    def subqueries(self, query: str, reference: Sequence[str]) -> list[str]:
        if not self.ceiling:
            return self.frequent
        return list(dict.fromkeys(self.categories[i] for i in reference if self.categories.get(i)))[:self.k] or [query]

    def directions(self, queries, seed, reference_ids=None):
        if self.ceiling and reference_ids is None:
            raise ValueError("the ceiling names the categories of the reference items: pass reference_ids")
        texts = [self.subqueries(q, ids) for q, ids in zip(queries, reference_ids or [[]] * len(queries))]
        return self.embed_subqueries(texts), texts


def category_headroom(space, index, categories: dict[str, str], queries: list[str], reference_ids: list[list[str]],
                      pools: dict[str, int], k: int) -> dict[str, dict[str, tuple[float, float]]]:
    """Recall and Hit of the ceiling and the floor `CategoryFanout`s; empty when no item has a category."""
    if not any(categories.values()):
        return {}
    return {bound: summarize(pooled_recall_and_hit(
                CategoryFanout(space, index, categories, k, bound == "ceiling").retrieve(
                    queries, max(pools.values()), reference_ids=reference_ids), reference_ids, pools))
            for bound in ("ceiling", "floor")}


def oar_scores(retriever: Retriever, queries: list[str], k: int, seed: int = 0, judge=None,
               label=None) -> tuple[dict[str, np.ndarray], float]:
    """Per-query embedding proxies (with an `LLMJudge` and `label`: id -> text, also the judge's three scores) and
    the fan-out seconds per query."""
    batch = retriever.retrieve(queries, k, seed=seed)
    query_vectors = retriever.space.encode_queries(queries)
    scores = oar_proxies(batch, retriever, query_vectors)
    scores["average"] = (scores["groundedness"] + scores["diversity"] + scores["alignment"]) / 3
    scores["query_specificity"] = specificity(batch, query_vectors)
    if judge is not None:
        judged = [judge.score(f.query, [(f.subqueries[n] if f.subqueries else f"direction {n + 1}", label(i))
                                        for n, ids in enumerate(f.candidate_ids) for i in ids])
                  for f in batch.fanouts]
        scores.update({f"judge_{name}": np.array([j[name] for j in judged]) for name in judged[0]})
    return scores, batch.fanout_seconds / len(queries)


def paired_differences(per_query: dict[str, dict[str, np.ndarray]], metrics: Sequence[str]) -> list[dict]:
    """Each of `COMPARISONS` whose two methods were evaluated: per metric, the mean over queries of the first
    method's score minus the second's, with the bootstrap standard error of that mean."""
    return [{"method": method, "against": against,
             "difference": {m: mean_and_error(per_query[method][m] - per_query[against][m]) for m in metrics}}
            for method, against in COMPARISONS if method in per_query and against in per_query]


def training_reward(retriever: Retriever, scorer, queries: list[str], reference_ids: list[list[str]] | None,
                    seed: int = 0) -> dict[str, float]:
    """Mean training-reward terms of a method's fan-outs: text fan-outs through the parsed sub-queries
    (format term included), generated directions through the vector path (no text, so no format term)."""
    directions, subqueries = retriever.directions(queries, seed, reference_ids)
    if subqueries is not None:
        terms = scorer.score_subqueries(queries, subqueries, reference_ids)
    else:
        terms = scorer.score_directions(scorer.embed_texts(queries), np.stack(directions), reference_ids)
    return defined_means(terms)


def _sample(frame, max_queries: int | None, seed: int):
    return frame.sample(n=max_queries, seed=seed) if max_queries and frame.height > max_queries else frame


class FinishedRows:
    """The results of each evaluated row (a method, a kept-query variant, a sampler setting), one JSON file each in
    `folder`, so that an interrupted evaluation goes on from the first row not done; without a folder, none."""

    def __init__(self, folder: Path | None):
        self.folder = folder

    def names(self) -> list[str]:
        """The rows kept so far."""
        return sorted(path.stem for path in self.folder.glob("*.json")) if self.folder else []

    def get(self, row: str) -> dict | None:
        path = self._path(row)
        if not (path and path.is_file()):
            return None
        try:
            return json.loads(path.read_text())
        except ValueError as err:
            raise ValueError(f"{path}: not a finished evaluation row ({err}); delete it to evaluate "
                             f"{row} again") from err

    def put(self, row: str, result: dict) -> dict:
        """Keeps `result` (as JSON, written atomically) and returns it as `get` will read it back."""
        result = json.loads(json.dumps(_plain(result)))
        if path := self._path(row):
            write_json(path, result)
        return result

    def _path(self, row: str) -> Path | None:
        return self.folder / f"{row}.json" if self.folder else None


def _plain(value):
    """JSON's types for numpy's arrays and scalars."""
    if isinstance(value, dict):
        return {key: _plain(v) for key, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value


def run_evaluation(settings, regime: str, catalog_path: str, corpus_path: str, artefacts,
                   methods: tuple[str, ...] | None = None, n_examples: int = 3, log_fn: NamedLogFn | None = None,
                   resume_dir: Path | None = None) -> dict:
    """All methods on the regime's test split (human- or LLM-written queries only, see `queries`): metrics per
    method, the training reward of each on the validation split, and a few qualitative examples.
    `artefacts`: the `stack.RetrieverArtefacts` the records on the evaluation's edges name. A progress bar counts
    the evaluated rows (methods, kept-query variants, sampler settings), and `log_fn(row, row number, metrics)` gets
    each row's means as it is done (a `quality` evaluation takes about 40 minutes). With `resume_dir`, each row's
    results are kept there as it is done, and a rerun after an interruption reads them back instead of computing
    them again: the folder must be named by what is evaluated (the evaluation asset's version), since a row found
    there is taken for the one this call would compute."""
    from r4t_pipeline import stack
    from r4t_pipeline.catalog import Catalog
    from r4t_pipeline.queries import load_corpus

    cfg, k = settings.evaluation, settings.rewards.k
    test = _sample(load_corpus(corpus_path, regime, "test"), cfg.max_queries, cfg.seed)
    val = _sample(load_corpus(corpus_path, regime, "val"), cfg.max_validation_queries or cfg.max_queries, cfg.seed)
    catalog = Catalog.load(catalog_path)
    queries = test["query"].to_list()
    paper_pool = k * cfg.per_direction
    pools = {f"{paper_pool // 1000}K" if paper_pool % 1000 == 0 else str(paper_pool): paper_pool,
             f"{100 * cfg.catalog_pool_fraction:g}%": max(k, round(cfg.catalog_pool_fraction * catalog.items.height))}
    about = {"catalog": catalog.name, "regime": regime, "queries": len(queries), "pools": pools,
             "validation_queries": val.height, "query_sources": dict(test["source"].value_counts().iter_rows()),
             "leakage": float(test["leakage"].mean()) if regime == "wscr" and test.height else None,
             **({"runs": cfg.runs} if regime == "wscr" else {})}
    if not queries or not val.height:
        return {**about, "metrics": {}, "examples": {}, "validation_reward": {},
                "skipped": f"no {regime.upper()} {'test' if not queries else 'validation'} queries: the catalog has "
                           "no titled collections (declare queries.wscr_query_model to describe them)"}
    label = _labeller(catalog, regime)
    val_refs = val["reference_ids"].to_list() if regime == "wscr" else None
    scorer = stack.fanout_scorer(settings, regime, artefacts.index)
    judge = None
    if cfg.llm_judge_url and regime == "oar":
        from r4t_pipeline.judge import LLMJudge

        judge = LLMJudge(cfg.llm_judge_url, cfg.llm_judge_model, cfg.llm_judge_api_key_env, seed=cfg.seed)

    def evaluate(retriever: Retriever, judged: bool = True
                 ) -> tuple[dict[str, tuple[float, float]], dict[str, np.ndarray]]:
        """The summary (mean and s.e. of each score, and the fan-out seconds per query) and the per-query scores."""
        if regime == "wscr":
            scores, seconds = wscr_scores(retriever, queries, test["reference_ids"].to_list(), pools, cfg.runs,
                                          cfg.seed)
        else:
            scores, seconds = oar_scores(retriever, queries, k + retriever.keep_query, cfg.seed,
                                         judge if judged else None, label)
        return {**summarize(scores), "fanout_seconds_per_query": (seconds, 0.0)}, scores

    methods = tuple(methods or stack.METHODS)
    kept = [method for method in cfg.keep_query_methods if method in methods]
    sweep_settings = cfg.sampler_sweep if "r4t_diffusion" in methods else []
    rows = FinishedRows(resume_dir)
    with tqdm(total=len(methods) + len(kept) + len(sweep_settings), desc=f"evaluate {catalog.name} {regime}",
              disable=None) as progress:  # closed on errors too
        logged: list[str] = []  # not progress.n: a disabled bar (no terminal, as under Dagster) does not count

        def evaluated(row: str, compute: Callable[[], dict]) -> dict:
            """The row's results: read back from an interrupted run of this evaluation, or computed and kept."""
            result = rows.get(row)
            if result is None:
                result = rows.put(row, compute())
            result["metrics"] = {metric: tuple(value) for metric, value in result["metrics"].items()}
            logged.append(row)
            progress.set_postfix_str(row, refresh=False)
            progress.update()
            if log_fn:
                log_fn(row, len(logged), {metric: value[0] for metric, value in result["metrics"].items()})
            return result

        def method_row(method: str) -> dict:
            retriever = stack.build_retriever(settings, regime, method, artefacts)
            reward = training_reward(retriever, scorer, val["query"].to_list(), val_refs, cfg.seed)
            summary, scores = evaluate(retriever)
            row = {"metrics": summary, "per_query": scores, "reward": reward}
            if method in ("zero_shot", "r4t_folm", "r4t_diffusion", "supervised_diffusion"):
                batch = retriever.retrieve(queries[:n_examples], k, seed=cfg.seed)
                row["examples"] = [{"query": f.query, "directions": [
                    {"subquery": f.subqueries[n] if f.subqueries else None, "top_item": label(ids[0])}
                    for n, ids in enumerate(f.candidate_ids)]} for f in batch.fanouts]
            return row

        def kept_query_row(method: str) -> dict:  # the proxies: judge calls cost
            retriever = stack.build_retriever(settings, regime, method, artefacts, keep_query=True)
            return {"metrics": evaluate(retriever, judged=False)[0]}

        def sweep_row(setting) -> dict:  # quality against sampling cost: what fewer network calls give up
            retriever = stack.build_retriever(settings, regime, "r4t_diffusion", artefacts, sampler=setting.sampler,
                                              steps=setting.steps, cached=False)  # timed: queries encoded
            timing = time_batches(retriever, queries, [8], cfg.latency_repeats, k if regime == "oar" else paper_pool,
                                  cfg.latency_budget_seconds)["8"]
            return {**setting.model_dump(), "network_calls": network_calls(setting.sampler, setting.steps),
                    "metrics": evaluate(retriever, judged=False)[0],  # the proxies; judge calls cost
                    "fanout_ms_batch8": 1000 * timing.get("fanout_median_seconds", float("nan"))}

        metrics, per_query, examples, rewards = {}, {}, {}, {}
        for method in methods:
            row = evaluated(method, partial(method_row, method))
            metrics[method], rewards[method] = row["metrics"], row["reward"]
            per_query[method] = {metric: np.asarray(values) for metric, values in row["per_query"].items()}
            if "examples" in row:
                examples[method] = row["examples"]
        for method in kept:  # the query as one more direction (RAG-Fusion keeps it)
            row = f"{method}{KEPT_QUERY}"
            metrics[row] = evaluated(row, partial(kept_query_row, method))["metrics"]
        sweep = [evaluated(f"r4t_diffusion@{setting.sampler}-{setting.steps}", partial(sweep_row, setting))
                 for setting in sweep_settings]
    headroom = {}
    if regime == "wscr":  # what naming the right item types would reach, beside what the methods reach
        categories = dict(zip(catalog.items["item_id"].to_list(), catalog.items["category"].to_list()))
        headroom = category_headroom(scorer.space, scorer.index, categories, queries, test["reference_ids"].to_list(),
                                     pools, k)
    headline = ["diversity", "average"] if regime == "oar" else [f"recall@{label}" for label in pools]
    return {**about, "metrics": metrics, "paired": paired_differences(per_query, headline), "examples": examples,
            "validation_reward": rewards, "headroom": headroom, "diffusion_sampling": settings.diffusion.sampling(),
            "sampler_sweep": sweep}


def _labeller(catalog, regime: str):
    """Readable text for a retrieved id: an item's text, or a collection's title and first items."""
    items = catalog.item_texts()
    if regime == "wscr":
        return items.__getitem__
    collections = {cid: (title, ids) for cid, title, ids in
                   catalog.collections.select("collection_id", "title", "item_ids").iter_rows()}

    def label(collection_id: str) -> str:
        title, ids = collections[collection_id]
        return f"{title or collection_id}: " + "; ".join(items[i] for i in ids[:3])
    return label
