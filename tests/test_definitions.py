"""Materialises the foundation graph of the smoke profile through Dagster's API on real data."""

import dagster as dg
import numpy as np
import pytest

from r4t_pipeline import queries as q
from r4t_pipeline.catalog import Catalog
from r4t_pipeline.defs import build_definitions
from r4t_pipeline.embeddings import CatalogEmbeddings
from r4t_pipeline.index import VectorIndex
from r4t_pipeline.settings import load_settings


@pytest.fixture(scope="module")
def materialised(tmp_path_factory):
    root = tmp_path_factory.mktemp("r4t")
    settings = load_settings("smoke", config_path=root / "none.yaml", overrides={"work_dir": str(root)})
    defs = build_definitions(settings)
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(list(defs.assets) + list(defs.asset_checks), resources=defs.resources, instance=instance)
    return settings, result


def test_whole_graph_materialises_and_checks_pass(materialised):
    settings, result = materialised
    assert result.success
    checks = result.get_asset_check_evaluations()
    assert len(checks) == 8 and all(c.passed for c in checks), [(c.check_name, c.metadata) for c in checks]
    keys = {m.asset_key.to_user_string() for m in result.get_asset_materialization_events()}
    assert keys == {f"{d}/{a}" for d in ("polyvore", "djmix")
                    for a in ("catalog", "item_embeddings", "embedding_index", "broad_queries")}


def test_outputs_on_disk_are_consistent(materialised):
    settings, _ = materialised
    for domain, n_collections in (("polyvore", 60), ("djmix", 40)):
        catalog = Catalog.load(settings.artefact(domain, "catalog"))
        emb = CatalogEmbeddings.load(settings.artefact(domain, "embeddings"))
        index = VectorIndex.load(settings.artefact(domain, "index", "collections"))
        assert len(catalog.collections) == n_collections
        assert list(emb.item_ids) == catalog.items["item_id"].tolist() and emb.items.shape[1] == 128
        assert len(index) == n_collections
        # a collection's own vector retrieves that collection first
        _, found = index.search(emb.collections[:5], 1)
        assert list(index.ids[found[:, 0]]) == list(emb.collection_ids[:5])
        wscr = q.load_corpus(settings.artefact(domain, "broad_queries"), "wscr")
        assert set(i for ids in wscr["reference_ids"] for i in ids) <= set(catalog.items["item_id"])
        assert np.isfinite(emb.items).all()


def test_metadata_shows_counts_and_examples(materialised):
    _, result = materialised
    meta = {m.asset_key.to_user_string(): m.materialization.metadata for m in result.get_asset_materialization_events()}
    assert meta["polyvore/catalog"]["collections"].value == 60
    assert meta["polyvore/catalog"]["source_collections"].value == 3960
    assert "query" in meta["djmix/broad_queries"]["oar_examples"].value
    assert meta["polyvore/item_embeddings"]["encoder"].value == "all-MiniLM-L6-v2@128"
