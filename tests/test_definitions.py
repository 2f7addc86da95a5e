"""The smoke profile's whole asset graph, materialised through Dagster's API on real data (conftest)."""

import json

import numpy as np
import pytest

from r4t_pipeline import queries as q
from r4t_pipeline.catalog import Catalog
from r4t_pipeline.embeddings import CatalogEmbeddings
from r4t_pipeline.index import VectorIndex
from r4t_pipeline.synth import load_targets

STAGES = ("folm_checkpoint", "synthetic_targets", "diffusion_checkpoint", "evaluation")


def test_whole_graph_materialises_and_checks_pass(smoke):
    assert smoke.result.success
    checks = smoke.result.get_asset_check_evaluations()
    assert len(checks) == 6 and all(c.passed for c in checks), [(c.check_name, c.metadata) for c in checks]
    keys = {m.asset_key.to_user_string() for m in smoke.result.get_asset_materialization_events()}
    foundation = ("catalog", "item_embeddings", "embedding_index", "broad_queries", "folm_base", "supervised_diffusion")
    expected = {f"polyvore/{a}" for a in foundation}
    expected |= {f"polyvore/{r}/{s}" for r in ("oar", "wscr") for s in STAGES}
    expected |= {f"modit/{t}/task_data" for t in ("polyvore_likes", "polyvore_price")}
    expected |= {f"modit/{p}/{s}" for p in ("item", "pattern") for s in ("raw", "ordered", "tail", "hppo")}
    assert keys == expected | {"modit/evaluation", "latency_benchmark", "evaluation_report"}


def test_foundation_outputs_are_consistent(smoke):
    catalog = Catalog.load(smoke.path("polyvore/catalog"))
    emb = CatalogEmbeddings.load(smoke.path("polyvore/item_embeddings"))
    index = VectorIndex.load(smoke.records.read("polyvore/embedding_index").collections_path)
    assert catalog.collections.height == 60 == len(index)
    assert list(emb.item_ids) == catalog.items["item_id"].to_list() and emb.items.shape[1] == 128
    _, found = index.search(emb.collections[:5], 1)  # a collection's own vector retrieves it first
    assert list(index.ids[found[:, 0]]) == list(emb.collection_ids[:5])
    wscr = q.load_corpus(smoke.path("polyvore/broad_queries"), "wscr")
    assert set(wscr["reference_ids"].explode().to_list()) <= set(catalog.items["item_id"].to_list())
    assert np.isfinite(emb.items).all()


def test_stage_artefacts_chain_together(smoke):
    settings = smoke.settings
    for regime in ("oar", "wscr"):
        targets, conditions, frame = load_targets(smoke.path(f"polyvore/{regime}/synthetic_targets"))
        assert targets.shape[1:] == (settings.rewards.k, 128) and len(conditions) == frame.height > 0
        folm = smoke.records.read(f"polyvore/{regime}/folm_checkpoint")
        assert (frame["folm_checkpoint"] == f"{folm.asset}@{folm.version}").all()
        metrics = json.loads((smoke.path(f"polyvore/{regime}/evaluation") / "metrics.json").read_text())
        assert set(metrics["validation_reward"]) == {"no_fanout", "zero_shot", "best_of_n", "r4t_folm",
                                                     "r4t_diffusion", "supervised_diffusion"}
        # smoke evaluates R4T-Diffusion again with the query kept as one more direction
        assert set(metrics["metrics"]) == set(metrics["validation_reward"]) | {"r4t_diffusion+query"}
        assert all(-2 < r["total"] < 1.01 for r in metrics["validation_reward"].values())
        # the claims as paired differences over the same queries: their mean is the difference of the two means
        assert [(p["method"], p["against"]) for p in metrics["paired"]] == [
            ("zero_shot", "no_fanout"), ("r4t_folm", "zero_shot"), ("r4t_diffusion", "r4t_folm"),
            ("r4t_diffusion", "supervised_diffusion")]
        for p in metrics["paired"]:
            for metric, (difference, _) in p["difference"].items():
                assert difference == pytest.approx(metrics["metrics"][p["method"]][metric][0]
                                                   - metrics["metrics"][p["against"]][metric][0], abs=1e-9)
    report = (smoke.path("evaluation_report") / "report.md").read_text()
    assert "## polyvore · OAR" in report and "## polyvore · WSCR" in report and "Fan-out latency" in report


def test_metadata_shows_counts_examples_and_curves(smoke):
    meta = {m.asset_key.to_user_string(): m.materialization.metadata
            for m in smoke.result.get_asset_materialization_events()}
    assert meta["polyvore/catalog"]["collections"].value == 60
    assert meta["polyvore/catalog"]["source_collections"].value == 3960
    assert "query" in meta["polyvore/broad_queries"]["oar_examples"].value
    assert meta["polyvore/item_embeddings"]["encoder"].value == "all-MiniLM-L6-v2@128"
    assert meta["polyvore/oar/folm_checkpoint"]["steps"].value == smoke.settings.folm.train.steps
    assert 0 < meta["polyvore/wscr/synthetic_targets"]["sigma_data"].value < 1
    assert "R4T-Diffusion" in meta["evaluation_report"]["report"].value


def test_the_modit_branch_chains_its_stages_and_reports(smoke):
    stages = [smoke.records.read(f"modit/item/{s}") for s in ("raw", "ordered", "tail", "hppo")]
    for previous, stage in zip(stages, stages[1:]):  # each stage starts from the one before
        assert stage.lineage[previous.asset] == previous.version
    assert all((smoke.path(s.asset) / "model.safetensors").is_file() for s in stages)
    evaluation = json.loads((smoke.path("modit/evaluation") / "evaluation" / "evaluation.json").read_text())
    cells = {(c["task"], c["protocol"]) for c in evaluation["cells"]}
    assert cells == {(t, p) for t in ("polyvore_likes", "polyvore_price") for p in ("item", "pattern")}
    for cell in evaluation["cells"]:
        assert {"seed_centroid", "global_attribute", "interpolation", "pretrained", "modit", "hppo"} <= \
            set(cell["metrics"])
        assert 0 <= cell["comparisons"]["hppo_vs_modit"]["joint@10"]["p_wilcoxon"] <= 1
    meta = {m.asset_key.to_user_string(): m.materialization.metadata
            for m in smoke.result.get_asset_materialization_events()}
    assert meta["modit/polyvore_likes/task_data"]["pattern_stats"].value["patterns"] > 1
    assert "MO-DiT+HPPO (stage 4)" in meta["modit/evaluation"]["table"].value
    report = (smoke.path("evaluation_report") / "report.md").read_text()
    assert "## MO-DiT+HPPO" in report and "Generator latency" in report
    assert "purity vs attribute frontier" in (smoke.path("evaluation_report") / "report.html").read_text()
