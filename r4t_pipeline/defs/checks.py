"""Asset checks: the properties later stages rely on, verified on what was actually written."""


import dagster as dg
import numpy as np

from r4t_pipeline import queries as q
from r4t_pipeline.catalog import Catalog, CatalogError
from r4t_pipeline.defs.artefacts import CatalogArtefact, EmbeddingsArtefact, IndexArtefact, QueryCorpusArtefact
from r4t_pipeline.embeddings import CatalogEmbeddings
from r4t_pipeline.index import VectorIndex


def foundation_checks(domain: str) -> list:
    @dg.asset_check(asset=[domain, "catalog"], description="ids unique, every item has text, no empty or "
                                                           "dangling collections")
    def catalog_is_valid(catalog: CatalogArtefact) -> dg.AssetCheckResult:
        cat = Catalog.load(catalog.path)
        try:
            cat.validate(catalog.path)
        except CatalogError as err:
            return dg.AssetCheckResult(passed=False, metadata={"error": str(err)})
        return dg.AssetCheckResult(passed=True, metadata=cat.summary())

    @dg.asset_check(asset=[domain, "item_embeddings"], description="one finite unit vector per item and collection")
    def embeddings_are_unit_vectors(item_embeddings: EmbeddingsArtefact) -> dg.AssetCheckResult:
        emb = CatalogEmbeddings.load(item_embeddings.path)
        norms = np.linalg.norm(np.concatenate([emb.items, emb.collections]), axis=1)
        worst = float(np.abs(norms - 1).max()) if len(norms) else 0.0
        return dg.AssetCheckResult(passed=bool(np.isfinite(norms).all() and worst < 1e-4),
                                   metadata={"max_norm_deviation": worst, "rows": len(norms)})

    @dg.asset_check(asset=[domain, "embedding_index"], description="items retrieve themselves (recall@1 on a sample)")
    def index_finds_items(embedding_index: IndexArtefact) -> dg.AssetCheckResult:
        index = VectorIndex.load(embedding_index.items_path)
        sample = np.random.default_rng(0).choice(len(index), size=min(500, len(index)), replace=False)
        _, found = index.search(index.vectors[sample], k=1)
        # duplicate texts share a vector, so accept any row with the same vector
        same = np.isclose((index.vectors[found[:, 0]] * index.vectors[sample]).sum(1), 1.0, atol=1e-5)
        recall = float(same.mean())
        return dg.AssetCheckResult(passed=recall >= 0.99, metadata={"self_recall_at_1": recall, "sampled": len(sample)})

    @dg.asset_check(asset=[domain, "broad_queries"], description="every split non-empty; no query text shared by "
                                                                 "two splits")
    def query_splits_are_disjoint(broad_queries: QueryCorpusArtefact) -> dg.AssetCheckResult:
        problems = {}
        for regime in ("oar", "wscr"):
            frame = q.load_corpus(broad_queries.path, regime)
            splits_per_query = frame.groupby("query")["split"].nunique()
            leaked = splits_per_query[splits_per_query > 1]
            empty = [s for s in q.SPLITS if not (frame["split"] == s).any()]
            if len(leaked) or empty:
                problems[regime] = {"leaked_queries": leaked.index[:5].tolist(), "empty_splits": empty}
        return dg.AssetCheckResult(passed=not problems, metadata={"problems": problems})

    return [catalog_is_valid, embeddings_are_unit_vectors, index_finds_items, query_splits_are_disjoint]
