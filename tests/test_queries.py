import os
from collections import Counter

import polars as pl
import pytest

from r4t_pipeline import queries as q
from r4t_pipeline import stack
from r4t_pipeline.catalog import Catalog
from r4t_pipeline.paths import assets_dir
from r4t_pipeline.settings import load_settings


@pytest.fixture(scope="module")
def facets():
    return q.Facets.load(assets_dir() / "facets" / "polyvore.yaml")


def test_clean_title_keeps_descriptive_titles_only(facets):
    assert q.clean_title("THANKFUL FOR MY LULAROE PANTS!", facets.stopwords) == "thankful for my lularoe pants"
    assert q.clean_title("Untitled #12", facets.stopwords) == ""
    assert q.clean_title("2001-10-18 - Armin van Buuren - A State Of Trance 018", frozenset()) == \
        "armin van buuren a state of trance"


def test_template_queries_cover_every_facet_family(facets):
    frame = q.template_queries(facets, max_queries=80, seed=0)
    families = Counter(frame["source"].str.strip_prefix("template:").to_list())
    assert set(families) == set(facets.templates) and frame.height == 80
    assert frame["query"].is_unique().all()
    assert frame.equals(q.template_queries(facets, max_queries=80, seed=0))  # fixed seed, same corpus


def test_oar_corpus_is_deduplicated_and_split_8_1_1(polyvore_catalog, facets):
    oar = q.build_oar_queries(polyvore_catalog, facets, max_template_queries=500, max_title_queries=None, seed=0)
    assert oar["query"].is_unique().all() and oar["query_id"].is_unique().all()
    counts = q.split_counts(oar)
    assert abs(counts["train"] / oar.height - 0.8) < 0.01 and abs(counts["test"] / oar.height - 0.1) < 0.01
    real = oar.filter(pl.col("source") == "title")["query"]
    assert "thankful for my lularoe pants" in set(real.to_list())


def test_wscr_evaluates_on_human_written_titles_only(polyvore_catalog, facets):
    wscr = q.build_wscr_queries(polyvore_catalog, facets, seed=0)
    assert wscr.height == 3960
    titled = wscr.filter(pl.col("collection_id") == "pv209512492").row(0, named=True)
    assert titled["source"] == "title" and titled["query"] == "thankful for my lularoe pants"
    keywords = wscr.filter(pl.col("source") == "keywords")
    assert keywords["query"].str.ends_with("outfit").all() and (keywords["split"] == "train").all()
    held_out = wscr.filter(pl.col("split") != "train")
    assert set(held_out["source"].to_list()) == {"title"} and q.split_counts(wscr)["test"] > 100
    assert (wscr.group_by("query").agg(pl.col("split").n_unique())["split"] == 1).all()  # one split per text
    # keyword summaries are made of the reference items' own words; real titles mostly are not
    leakage = q.leakage_summary(wscr)
    assert leakage["train"]["keywords"] > 0.9 and leakage["test"]["title"] < 0.4
    # what the FOLM learns from looks like what it is tested on: the written training pairs only
    train = wscr.filter(pl.col("split") == "train")
    written = q.written_first(train)
    assert set(written["source"].to_list()) == {"title"} and 0 < written.height < train.height


def test_leakage_counts_query_words_found_in_the_reference(facets):
    assert q.leakage("black leather boots outfit", ["Black boots (Ankle Boots)", "red bag"], facets) == 2 / 3
    assert q.leakage("date night", ["black boots"], facets) == 0.0


def test_keyword_summary_prefers_repeated_then_common_words(facets):
    df = Counter({"black": 900, "leather": 500, "acme": 2, "boots": 300})
    summary = q.keyword_summary(["acme black leather boots", "black leather bag", "acme black tee"], facets, df)
    assert summary == "black leather acme outfit"


def test_a_catalog_without_titles_or_facet_file_still_gets_a_corpus(polyvore_catalog):
    small = polyvore_catalog.subsample(300, seed=2)
    untitled = Catalog("plain", small.items, small.collections.with_columns(title=pl.lit("")))
    facets = q.Facets.derive(untitled)
    assert facets.origin == "derived" and "dress" in facets.facets["word"] + facets.facets["category"]
    oar = q.build_oar_queries(untitled, facets, max_template_queries=200, max_title_queries=None, seed=0)
    assert oar.height > 100 and set(q.source_counts(oar)["test"]) == {"template"}
    wscr = q.build_wscr_queries(untitled, facets, seed=0)
    assert wscr.height == 300 and set(wscr["split"].to_list()) == {"train"}  # nothing human-written to test on
    assert q.written_first(wscr).height == 300  # nor to learn from: the keyword summaries are all there is


def test_corpus_round_trip(tmp_path, polyvore_catalog, facets):
    oar = q.build_oar_queries(polyvore_catalog, facets, 50, 20, seed=0)
    wscr = q.build_wscr_queries(polyvore_catalog, facets, seed=0, max_pairs=300)
    q.save_corpus(tmp_path / "c", oar, wscr)
    test = q.load_corpus(tmp_path / "c", "wscr", "test")
    assert set(test["split"].to_list()) == {"test"} and isinstance(test["reference_ids"][0].to_list(), list)
    with pytest.raises(FileNotFoundError, match="materialise the broad_queries asset"):
        q.load_corpus(tmp_path / "nothing", "oar")
    # RL rows: WSCR's written training pairs with their references; OAR's every training query
    settings = load_settings("demo", config_path=os.devnull)
    rows = stack.folm_train_rows(settings, tmp_path / "c", "wscr")
    titled = q.load_corpus(tmp_path / "c", "wscr", "train").filter(pl.col("source") == "title")
    assert [r["query"] for r in rows] == titled["query"].to_list() and all(r["reference_ids"] for r in rows)
    assert len(stack.folm_train_rows(settings, tmp_path / "c", "oar")) == q.load_corpus(tmp_path / "c", "oar",
                                                                                         "train").height
