"""Run the whole MO-DiT+HPPO branch outside Dagster and print its stage times and evaluation table.

    R4T_DATA_DIR=/path/to/data python scripts/modit_run.py --profile demo [--domains polyvore djmix]

Catalogs and embeddings come from the R4T artefact layout of the profile (<work_dir>/<profile>/<domain>/catalog,
.../embeddings); missing ones are built here the way the R4T foundation assets build them. MO-DiT outputs go to
<work_dir>/<profile>/modit (what `r4t expand` reads). Profiles: smoke, demo; paper runs the quality settings.
"""

from __future__ import annotations

import argparse
import json
import time

from r4t_pipeline import stack
from r4t_pipeline.catalog import Catalog
from r4t_pipeline.embeddings import CatalogEmbeddings, embed_catalog
from r4t_pipeline.modit import modit_config, run_modit
from r4t_pipeline.settings import load_settings
from r4t_pipeline.sources import LOADERS, resolve_data_dir


def foundation(settings, domain: str) -> tuple[Catalog, CatalogEmbeddings]:
    catalog_dir, embeddings_dir = settings.artefact(domain, "catalog"), settings.artefact(domain, "embeddings")
    if not (catalog_dir / "items.parquet").exists():
        full = LOADERS[domain](resolve_data_dir(settings.catalog.data_dir), settings.catalog.allow_download)
        full.subsample(settings.catalog.max_collections.get(domain), settings.catalog.seed).save(catalog_dir)
    catalog = Catalog.load(catalog_dir)
    if not (embeddings_dir / "embeddings.json").exists():
        embed_catalog(catalog, stack.embedding_space(settings, show_progress=True)).save(embeddings_dir)
    return catalog, CatalogEmbeddings.load(embeddings_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="demo", choices=["smoke", "demo", "paper"])
    parser.add_argument("--domains", nargs="+", default=["polyvore", "djmix"], choices=["polyvore", "djmix"])
    parser.add_argument("--fresh", action="store_true", help="retrain every stage instead of resuming")
    args = parser.parse_args()
    settings = load_settings(args.profile)
    cfg = modit_config(None if args.profile == "paper" else args.profile)
    cfg = cfg.model_copy(update={"tasks": [t for t in cfg.tasks if t.domain in args.domains]})
    started = time.perf_counter()
    loaded = {domain: foundation(settings, domain) for domain in args.domains}
    print(f"catalogs and embeddings: {time.perf_counter() - started:.1f} s")
    summary = run_modit({d: c for d, (c, _) in loaded.items()}, {d: e for d, (_, e) in loaded.items()}, cfg,
                        settings.artefact("modit"), resume=not args.fresh)
    print(json.dumps(summary["times_seconds"], indent=1))
    print(summary["evaluation"]["table_markdown"])
    print(json.dumps(summary["evaluation"]["goal"], indent=1))


if __name__ == "__main__":
    main()
