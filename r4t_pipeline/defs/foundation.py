"""Foundation assets per domain: catalog source -> catalog -> item_embeddings -> embedding_index,
and catalog -> broad_queries. Each asset calls the library and records what a user needs to see."""


import time

import dagster as dg
import pandas as pd

from r4t_pipeline import queries as q
from r4t_pipeline.catalog import Catalog
from r4t_pipeline.defs.artefacts import CatalogArtefact, EmbeddingsArtefact, IndexArtefact, QueryCorpusArtefact
from r4t_pipeline.defs.resources import MlflowTracking
from r4t_pipeline.embeddings import CatalogEmbeddings, embed_catalog
from r4t_pipeline.index import VectorIndex
from r4t_pipeline.io import file_sha256, stable_hash
from r4t_pipeline.settings import Settings
from r4t_pipeline.sources import LOADERS, resolve_data_dir
from r4t_pipeline.sources.files import ensure_files
from r4t_pipeline.stack import embedding_space, source_files

CODE_REVISION = "1"  # bump when an asset's code changes what it produces


def version(*parts: object) -> str:
    return f"{CODE_REVISION}-{stable_hash([str(p) for p in parts])}"


def source_fingerprint(settings: Settings, domain: str) -> str:
    """Content hash of the domain's source files: the catalog's upstream data version."""
    paths = ensure_files(resolve_data_dir(settings.catalog.data_dir), source_files(domain),
                         settings.catalog.allow_download)
    return stable_hash({name: file_sha256(path) for name, path in sorted(paths.items())}, length=16)


def foundation_assets(settings: Settings, domain: str) -> list:
    group = domain
    facets_file = q.assets_dir() / "facets" / f"{domain}.yaml"

    @dg.observable_source_asset(key=[domain, "catalog_source"], group_name=group,
                                description=f"The {domain} source files in the data directory (content hash).")
    def catalog_source() -> dg.DataVersion:
        return dg.DataVersion(source_fingerprint(settings, domain))

    @dg.asset(key=[domain, "catalog"], group_name=group, deps=[catalog_source.key], kinds={"parquet"},
              code_version=version(settings.catalog.version()),
              description=f"The {domain} catalog in the generic format: items and curated collections.")
    def catalog(mlflow: MlflowTracking) -> dg.Output[CatalogArtefact]:
        started = time.perf_counter()
        data_dir = resolve_data_dir(settings.catalog.data_dir)
        with mlflow.run(f"{domain}/catalog", params={"data_dir": data_dir, **settings.catalog.model_dump()}) as run:
            full = LOADERS[domain](data_dir, allow_download=settings.catalog.allow_download)
            cat = full.subsample(settings.catalog.max_collections.get(domain), settings.catalog.seed)
            fingerprint = source_fingerprint(settings, domain)
            path = settings.artefact(domain, "catalog")
            cat.save(path, extra_meta={"source_fingerprint": fingerprint, "source_summary": full.summary()})
            summary = cat.summary()
            run.log(0, {k: float(v) for k, v in summary.items()})
        preview = cat.collections.head(5).assign(item_ids=lambda f: f["item_ids"].map(lambda ids: ", ".join(ids[:4])))
        return dg.Output(
            CatalogArtefact(domain=domain, path=str(path), items=summary["items"], collections=summary["collections"]),
            data_version=dg.DataVersion(stable_hash([fingerprint, settings.catalog.version()], length=16)),
            metadata={**{k: dg.MetadataValue.int(v) if isinstance(v, int) else v for k, v in summary.items()},
                      "source_items": full.summary()["items"], "source_collections": full.summary()["collections"],
                      "path": dg.MetadataValue.path(str(path)),
                      "items_preview": dg.MetadataValue.md(
                          cat.items.head(8)[["item_id", "text", "likes"]].to_markdown()),
                      "collections_preview": dg.MetadataValue.md(preview[["collection_id", "title", "item_ids"]]
                                                                 .to_markdown()),
                      "seconds": round(time.perf_counter() - started, 2)})

    @dg.asset(key=[domain, "item_embeddings"], group_name=group, kinds={"numpy"},
              ins={"catalog_artefact": dg.AssetIn(key=catalog.key)},
              code_version=version(settings.encoder.version()),
              description="E_c of every item (truncated to d, L2-normalised) and one vector per collection.")
    def item_embeddings(mlflow: MlflowTracking,
                        catalog_artefact: CatalogArtefact) -> dg.Output[EmbeddingsArtefact]:
        started = time.perf_counter()
        cat = Catalog.load(catalog_artefact.path)
        space = embedding_space(settings, show_progress=True)
        with mlflow.run(f"{domain}/item_embeddings", params=settings.encoder.model_dump()) as run:
            emb = embed_catalog(cat, space)
            path = settings.artefact(domain, "embeddings")
            emb.save(path)
            seconds = time.perf_counter() - started
            run.log(0, {"items": len(emb.items), "seconds": seconds, "items_per_second": len(emb.items) / seconds})
        return dg.Output(EmbeddingsArtefact(domain=domain, path=str(path), encoder=emb.encoder, dim=emb.dim),
                         metadata={"encoder": emb.encoder, "dim": emb.dim, "items": len(emb.items),
                                   "collections": len(emb.collections), "seconds": round(seconds, 2),
                                   "path": dg.MetadataValue.path(str(path))})

    @dg.asset(key=[domain, "embedding_index"], group_name=group, kinds={"faiss"},
              ins={"embeddings": dg.AssetIn(key=item_embeddings.key)},
              code_version=version(settings.index.version()),
              description="FAISS indexes over items (WSCR database) and collections (OAR database).")
    def embedding_index(embeddings: EmbeddingsArtefact) -> dg.Output[IndexArtefact]:
        started = time.perf_counter()
        emb = CatalogEmbeddings.load(embeddings.path)
        cfg = settings.index
        paths = {}
        tables = (("items", emb.item_ids, emb.items), ("collections", emb.collection_ids, emb.collections))
        for name, ids, vectors in tables:
            index = VectorIndex.build(vectors, ids, cfg.kind, nlist=cfg.nlist, nprobe=cfg.nprobe, hnsw_m=cfg.hnsw_m)
            paths[name] = settings.artefact(domain, "index", name)
            index.save(paths[name])
        return dg.Output(IndexArtefact(domain=domain, items_path=str(paths["items"]),
                                       collections_path=str(paths["collections"]), kind=cfg.kind),
                         metadata={"kind": cfg.kind, "items": len(emb.items), "collections": len(emb.collections),
                                   "seconds": round(time.perf_counter() - started, 2)})

    @dg.asset(key=[domain, "broad_queries"], group_name=group, kinds={"parquet"},
              ins={"catalog_artefact": dg.AssetIn(key=catalog.key)},
              code_version=version(settings.queries.version(),
                                   file_sha256(facets_file) if facets_file.exists() else ""),
              description="Broad-query corpus: OAR intents and WSCR (query, reference set) pairs, split 8:1:1.")
    def broad_queries(catalog_artefact: CatalogArtefact) -> dg.Output[QueryCorpusArtefact]:
        cat = Catalog.load(catalog_artefact.path)
        cfg = settings.queries
        facets = q.Facets.load(domain)
        oar = q.build_oar_queries(cat, facets, cfg.max_template_queries, cfg.max_title_queries, cfg.seed)
        writer = None
        if cfg.wscr_query_model:
            from r4t_pipeline.folm.describe import collection_query_writer

            writer = collection_query_writer(cfg.wscr_query_model)
        wscr = q.build_wscr_queries(cat, facets, cfg.seed, cfg.max_wscr_pairs, writer)
        path = settings.artefact(domain, "broad_queries")
        q.save_corpus(path, oar, wscr)
        counts = {"oar": q.split_counts(oar), "wscr": q.split_counts(wscr)}
        return dg.Output(QueryCorpusArtefact(domain=domain, path=str(path), counts=counts),
                         metadata={"oar_queries": len(oar), "wscr_pairs": len(wscr),
                                   "oar_splits": counts["oar"], "wscr_splits": counts["wscr"],
                                   "oar_sources": oar["source"].str.split(":").str[0].value_counts().to_dict(),
                                   "wscr_sources": wscr["source"].value_counts().to_dict(),
                                   "oar_examples": dg.MetadataValue.md(_examples(oar, ["query", "source", "split"])),
                                   "wscr_examples": dg.MetadataValue.md(_examples(
                                       wscr.assign(reference_items=wscr["reference_ids"].map(len)),
                                       ["query", "source", "reference_items", "split"])),
                                   "path": dg.MetadataValue.path(str(path))})

    return [catalog_source, catalog, item_embeddings, embedding_index, broad_queries]


def _examples(frame: pd.DataFrame, columns: list[str], n: int = 10) -> str:
    return frame.sample(n=min(n, len(frame)), random_state=0)[columns].to_markdown(index=False)
