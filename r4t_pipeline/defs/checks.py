"""Asset checks: the properties later stages rely on, verified on what was actually written."""

import dagster as dg
import numpy as np
import polars as pl

from r4t_pipeline import queries as q
from r4t_pipeline.catalog import Catalog, CatalogError
from r4t_pipeline.embeddings import CatalogEmbeddings
from r4t_pipeline.index import VectorIndex
from r4t_pipeline.records import CatalogRecord, EmbeddingsRecord, IndexRecord, QueryCorpusRecord


def foundation_checks(name: str) -> list:
    @dg.asset_check(asset=[name, "catalog"], description="ids unique, every item has text, no empty or "
                                                         "dangling collections")
    def catalog_is_valid(catalog: CatalogRecord) -> dg.AssetCheckResult:
        cat = Catalog.load(catalog.path)
        try:
            cat.validate(catalog.path)
        except CatalogError as err:
            return dg.AssetCheckResult(passed=False, metadata={"error": str(err)})
        return dg.AssetCheckResult(passed=True, metadata=cat.summary())

    @dg.asset_check(asset=[name, "item_embeddings"], description="one finite unit vector per item and collection")
    def embeddings_are_unit_vectors(item_embeddings: EmbeddingsRecord) -> dg.AssetCheckResult:
        emb = CatalogEmbeddings.load(item_embeddings.path)
        norms = np.linalg.norm(np.concatenate([emb.items, emb.collections]), axis=1)
        worst = float(np.abs(norms - 1).max()) if len(norms) else 0.0
        return dg.AssetCheckResult(passed=bool(np.isfinite(norms).all() and worst < 1e-4),
                                   metadata={"max_norm_deviation": worst, "rows": len(norms)})

    @dg.asset_check(asset=[name, "embedding_index"], description="items retrieve themselves (recall@1 on a sample)")
    def index_finds_items(embedding_index: IndexRecord) -> dg.AssetCheckResult:
        index = VectorIndex.load(embedding_index.items_path)
        sample = np.random.default_rng(0).choice(len(index), size=min(500, len(index)), replace=False)
        _, found = index.search(index.vectors[sample], k=1)
        # duplicate texts share a vector, so accept any row with the same vector
        same = np.isclose((index.vectors[found[:, 0]] * index.vectors[sample]).sum(1), 1.0, atol=1e-5)
        recall = float(same.mean())
        return dg.AssetCheckResult(passed=recall >= 0.99, metadata={"self_recall_at_1": recall, "sampled": len(sample)})

    @dg.asset_check(asset=[name, "broad_queries"], description="no query text shared by two splits; WSCR "
                                                               "validation and test hold no keyword summaries")
    def query_splits_are_disjoint(broad_queries: QueryCorpusRecord) -> dg.AssetCheckResult:
        problems = {}
        for regime in ("oar", "wscr"):
            frame = q.load_corpus(broad_queries.path, regime)
            leaked = frame.group_by("query").agg(pl.col("split").n_unique()).filter(pl.col("split") > 1)
            found = {"leaked_queries": leaked["query"].head(5).to_list()}
            if regime == "wscr":
                held_out = frame.filter(pl.col("split") != "train", ~pl.col("source").is_in(q.EVALUATION_SOURCES))
                found["derived_queries_in_evaluation"] = held_out["query"].head(5).to_list()
            if any(found.values()):
                problems[regime] = found
        return dg.AssetCheckResult(passed=not problems, metadata={"problems": problems})

    return [catalog_is_valid, embeddings_are_unit_vectors, index_finds_items, query_splits_are_disjoint]
