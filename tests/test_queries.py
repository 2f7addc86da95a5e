from collections import Counter

import pytest

from r4t_pipeline import queries as q


@pytest.fixture(scope="module")
def facets():
    return q.Facets.load("polyvore")


def test_clean_title_keeps_descriptive_titles_only(facets):
    assert q.clean_title("THANKFUL FOR MY LULAROE PANTS!", facets.stopwords) == "thankful for my lularoe pants"
    assert q.clean_title("Untitled #12", facets.stopwords) == ""
    assert q.clean_title("2001-10-18 - Armin van Buuren - A State Of Trance 018", frozenset()) == \
        "armin van buuren a state of trance"


def test_template_queries_cover_every_facet_family(facets):
    frame = q.template_queries(facets, max_queries=80, seed=0)
    families = Counter(frame["source"].str.removeprefix("template:"))
    assert set(families) == set(facets.templates) and len(frame) == 80
    assert frame["query"].is_unique
    assert frame.equals(q.template_queries(facets, max_queries=80, seed=0))  # fixed seed, same corpus


def test_oar_corpus_is_deduplicated_and_split_8_1_1(polyvore_catalog, facets):
    oar = q.build_oar_queries(polyvore_catalog, facets, max_template_queries=500, max_title_queries=None, seed=0)
    assert oar["query"].is_unique and oar["query_id"].is_unique
    counts = q.split_counts(oar)
    assert abs(counts["train"] / len(oar) - 0.8) < 0.01 and abs(counts["test"] / len(oar) - 0.1) < 0.01
    real = oar[oar["source"] == "title"]["query"]
    assert "thankful for my lularoe pants" in set(real)


def test_wscr_pairs_use_real_titles_else_item_keywords_without_leakage(polyvore_catalog, facets):
    wscr = q.build_wscr_queries(polyvore_catalog, facets, seed=0)
    assert len(wscr) == 3960
    titled = wscr.set_index("collection_id").loc["pv209512492"]
    assert titled["source"] == "title" and titled["query"] == "thankful for my lularoe pants"
    untitled = wscr[wscr["source"] == "keywords"].iloc[0]
    assert untitled["query"].endswith("outfit") and len(untitled["reference_ids"]) >= 3
    assert (wscr.groupby("query")["split"].nunique() == 1).all()  # a query text lives in one split
    assert set(wscr["split"]) == {"train", "val", "test"}


def test_keyword_summary_prefers_repeated_then_common_words(facets):
    df = Counter({"black": 900, "leather": 500, "acme": 2, "boots": 300})
    summary = q.keyword_summary(["acme black leather boots", "black leather bag", "acme black tee"], facets, df)
    assert summary == "black leather acme outfit"


def test_corpus_round_trip(tmp_path, polyvore_catalog, facets):
    oar = q.build_oar_queries(polyvore_catalog, facets, 50, 20, seed=0)
    wscr = q.build_wscr_queries(polyvore_catalog, facets, seed=0, max_pairs=30)
    q.save_corpus(tmp_path / "c", oar, wscr)
    test = q.load_corpus(tmp_path / "c", "wscr", "test")
    assert set(test["split"]) == {"test"} and isinstance(test["reference_ids"][0], list)
    with pytest.raises(FileNotFoundError, match="materialise the broad_queries asset"):
        q.load_corpus(tmp_path / "nothing", "oar")
