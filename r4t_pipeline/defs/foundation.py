"""Foundation assets per catalog: catalog source -> catalog -> item_embeddings -> embedding_index, and
catalog -> broad_queries. Each asset reads its inputs from the records on its edges, calls the library and
records what a user needs to see."""

import time

import dagster as dg
import polars as pl

from r4t_pipeline import queries as q
from r4t_pipeline.catalog import Catalog
from r4t_pipeline.catalogs import CatalogEntry, SqlSource
from r4t_pipeline.defs.production import Production, code_version, preview, retry_transient
from r4t_pipeline.defs.resources import MlflowTracking
from r4t_pipeline.embeddings import CatalogEmbeddings, embed_catalog
from r4t_pipeline.index import VectorIndex
from r4t_pipeline.records import CatalogRecord, EmbeddingsRecord, IndexRecord, QueryCorpusRecord
from r4t_pipeline.settings import Settings
from r4t_pipeline.stack import embedding_space


def catalog_code_version(settings: Settings, entry: CatalogEntry) -> str:
    """What the catalog asset's output depends on besides the source content: the cap, the seed, and for SQL
    the queries (where the files or the database are is not part of it: the content hash covers that)."""
    source = entry.source
    selected = [source.items, source.collections] if isinstance(source, SqlSource) else []
    return code_version(source.kind, getattr(source, "builtin", ""), selected, entry.max_collections, entry.seed)


def foundation_assets(settings: Settings, entry: CatalogEntry) -> list:
    name = entry.name

    @dg.observable_source_asset(key=[name, "catalog_source"], group_name=name,
                                description=f"Where the {name} catalog comes from ({entry.source.kind}): its "
                                            "content fingerprint.")
    def catalog_source() -> dg.DataVersion:
        return dg.DataVersion(entry.source.data_version())

    @dg.asset(key=[name, "catalog"], group_name=name, deps=[catalog_source.key], kinds={"parquet"},
              code_version=catalog_code_version(settings, entry),
              description=f"The {name} catalog in the generic format: items and curated collections.")
    @retry_transient
    def catalog(context: dg.AssetExecutionContext, mlflow: MlflowTracking) -> dg.Output[CatalogRecord]:
        started = time.perf_counter()
        with mlflow.run(f"{name}/catalog", params={**entry.source.describe(),
                                                   "max_collections": entry.max_collections}) as run:
            full = entry.source.load(name)
            cat = full.subsample(entry.max_collections, entry.seed)
            summary = cat.summary()
            run.log(0, {k: float(v) for k, v in summary.items()})
        production = Production(context, settings, {}, content=cat.content_hash())
        if reused := production.reuse():
            return reused
        with production.writing() as tmp:
            cat.save(tmp, extra_meta={"source": entry.source.describe(), "source_summary": full.summary()})
        return production.output(production.record(CatalogRecord, items=summary["items"],
                                                   collections=summary["collections"]), {
            **{k: dg.MetadataValue.int(v) if isinstance(v, int) else v for k, v in summary.items()},
            "source_items": full.summary()["items"], "source_collections": full.summary()["collections"],
            "items_preview": preview(cat.items, ["item_id", "text", "likes"]),
            "collections_preview": preview(cat.collections, ["collection_id", "title", "item_ids"]),
            "seconds": round(time.perf_counter() - started, 2)})

    @dg.asset(key=[name, "item_embeddings"], group_name=name, kinds={"numpy"},
              ins={"catalog_record": dg.AssetIn(key=catalog.key)},
              code_version=code_version(settings.encoder.version()),
              description="E_c of every item (truncated to d, L2-normalised) and one vector per collection.")
    @retry_transient
    def item_embeddings(context: dg.AssetExecutionContext, mlflow: MlflowTracking,
                        catalog_record: CatalogRecord) -> dg.Output[EmbeddingsRecord]:
        production = Production(context, settings, {"catalog": catalog_record})
        if reused := production.reuse():
            return reused
        started = time.perf_counter()
        cat = Catalog.load(catalog_record.path)
        space = embedding_space(settings, show_progress=True)
        with mlflow.run(f"{name}/item_embeddings", params=settings.encoder.model_dump()) as run:
            emb = embed_catalog(cat, space)
            with production.writing() as tmp:
                emb.save(tmp)
            seconds = time.perf_counter() - started
            run.log(0, {"items": len(emb.items), "seconds": seconds, "items_per_second": len(emb.items) / seconds})
        return production.output(production.record(EmbeddingsRecord, encoder=emb.encoder, dim=emb.dim), {
            "encoder": emb.encoder, "dim": emb.dim, "items": len(emb.items), "collections": len(emb.collections),
            "seconds": round(seconds, 2)})

    @dg.asset(key=[name, "embedding_index"], group_name=name, kinds={"faiss"},
              ins={"embeddings": dg.AssetIn(key=item_embeddings.key)},
              code_version=code_version(settings.index.version()),
              description="FAISS indexes over items (WSCR database) and collections (OAR database).")
    @retry_transient
    def embedding_index(context: dg.AssetExecutionContext, embeddings: EmbeddingsRecord) -> dg.Output[IndexRecord]:
        production = Production(context, settings, {"embeddings": embeddings})
        if reused := production.reuse():
            return reused
        started = time.perf_counter()
        emb = CatalogEmbeddings.load(embeddings.path)
        cfg = settings.index
        with production.writing() as tmp:
            for table, ids, vectors in (("items", emb.item_ids, emb.items),
                                        ("collections", emb.collection_ids, emb.collections)):
                VectorIndex.build(vectors, ids, cfg.kind, nlist=cfg.nlist, nprobe=cfg.nprobe,
                                  hnsw_m=cfg.hnsw_m).save(tmp / table)
        return production.output(production.record(IndexRecord, kind=cfg.kind), {
            "kind": cfg.kind, "items": len(emb.items), "collections": len(emb.collections),
            "seconds": round(time.perf_counter() - started, 2)})

    @dg.asset(key=[name, "broad_queries"], group_name=name, kinds={"parquet"},
              ins={"catalog_record": dg.AssetIn(key=catalog.key)},
              code_version=code_version(settings.queries.version(), entry.facets_hash()),
              description="Broad-query corpus: OAR intents and WSCR (query, reference set) pairs; validation and "
                          "test WSCR queries are human- or LLM-written only.")
    @retry_transient
    def broad_queries(context: dg.AssetExecutionContext, catalog_record: CatalogRecord
                      ) -> dg.Output[QueryCorpusRecord]:
        production = Production(context, settings, {"catalog": catalog_record})
        if reused := production.reuse():
            return reused
        cat = Catalog.load(catalog_record.path)
        cfg = settings.queries
        facets = entry.facets(cat)
        oar = q.build_oar_queries(cat, facets, cfg.max_template_queries, cfg.max_title_queries, cfg.seed,
                                  cfg.split_fractions)
        writer = None
        if cfg.wscr_query_model:
            from r4t_pipeline.folm.describe import collection_query_writer

            writer = collection_query_writer(cfg.wscr_query_model)
        wscr = q.build_wscr_queries(cat, facets, cfg.seed, cfg.max_wscr_pairs, writer, cfg.split_fractions)
        with production.writing() as tmp:
            q.save_corpus(tmp, oar, wscr)
        counts = {"oar": q.split_counts(oar), "wscr": q.split_counts(wscr)}
        examples = wscr.with_columns(reference_items=pl.col("reference_ids").list.len())
        return production.output(production.record(QueryCorpusRecord, counts=counts), {
            "oar_queries": oar.height, "wscr_pairs": wscr.height, "facets": facets.origin,
            "oar_sources": q.source_counts(oar), "wscr_sources": q.source_counts(wscr),
            "wscr_leakage": q.leakage_summary(wscr),
            "oar_examples": preview(oar.sample(n=min(10, oar.height), seed=0), ["query", "source", "split"]),
            "wscr_examples": preview(examples.sample(n=min(10, examples.height), seed=0),
                                     ["query", "source", "reference_items", "leakage", "split"])})

    return [catalog_source, catalog, item_embeddings, embedding_index, broad_queries]
