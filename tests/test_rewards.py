"""Set-level rewards: hand-computed term values, and the paper's reward-hacking cases on real Polyvore items."""

from __future__ import annotations

import gzip
import json
import math
import os
import re
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

from r4t_pipeline.catalog import item_text
from r4t_pipeline.encoders import EmbeddingCache, EmbeddingSpace, MiniLMEncoder
from r4t_pipeline.index import VectorIndex
from r4t_pipeline.rewards import (
    FanoutScorer,
    RewardConfig,
    alignment,
    coverage,
    diversity,
    groundedness,
    load_reward_preset,
    query_specificity,
    soft_coverage,
    vendi_score,
)

POLYVORE = Path(os.environ.get("R4T_DATA_DIR", "/work/shared/data")) / "polyvore"
THEME = re.compile(r"boho|bohemian|festival|coachella", re.IGNORECASE)
QUERY = "bohemian festival style"
K = 10
# (c) distinct, on-topic, catalog-grounded sub-queries: real item names from the valid split's boho outfits
GROUNDED = ["women boho half sleeve v neck floral chiffon mini dress", "boho style thong wedge sandals",
            "boho crossbody khaki crossbody bags", "chicnova fashion boho drop earrings", "vintage bohemian necklace",
            "see chloé boho floral print maxi skirt", "preowned hand embroidered beaded bohemian blouse",
            "etro paisley shoulder bag leather fringe", "miss selfridge oversized fringe crochet shawl",
            "melissa raffia sun hat"]
# (b) paraphrases of the query
PARAPHRASES = ["bohemian festival style", "boho festival style", "bohemian festival fashion",
               "bohemian festival outfit",
               "boho festival look", "bohemian style for festivals", "festival bohemian fashion",
               "boho chic festival style", "bohemian festival look", "festival boho outfit"]
# (a) is K copies of the text of one real, off-topic item ("gold notes", Stationery): a string sitting
# exactly on a database item, what a groundedness-only policy converges to.
DEGENERATE_ITEM_NAME = "gold notes"


# ---- hand-computed term values -------------------------------------------------------------------

def test_vendi_of_identical_vectors_is_one_and_of_orthonormal_vectors_is_k():
    v = np.zeros(8, np.float32)
    v[3] = 1.0
    assert vendi_score(np.tile(v, (5, 1))) == pytest.approx(1.0, abs=1e-9)
    assert vendi_score(np.eye(5, 8)) == pytest.approx(5.0, abs=1e-9)
    assert diversity(np.eye(5, 8), k=5) == pytest.approx(1.0, abs=1e-9)
    assert diversity(np.tile(v, (5, 1)), k=5) == pytest.approx(0.2, abs=1e-9)
    # divided by the configured K, not the rows there are: a one-line fan-out is not maximally diverse
    assert diversity(np.eye(1, 8), k=10) == pytest.approx(0.1, abs=1e-9)
    assert diversity(np.eye(5, 8), k=10) == pytest.approx(0.5, abs=1e-9)


@pytest.mark.parametrize("case", ["random", "identical", "two_clusters", "single", "orthonormal"])
def test_batched_vendi_equals_the_vendi_score_package(case):
    from vendi_score import vendi

    rng = np.random.default_rng(0)
    sets = {"random": rng.normal(size=(6, 10, 16)), "identical": np.tile(rng.normal(size=(3, 1, 16)), (1, 10, 1)),
            "two_clusters": np.repeat(rng.normal(size=(4, 2, 16)), 5, axis=1), "single": rng.normal(size=(5, 1, 16)),
            "orthonormal": np.tile(np.eye(8, 16), (2, 1, 1))}[case]
    sets = sets / np.linalg.norm(sets, axis=-1, keepdims=True)
    batched = vendi_score(sets)
    one_at_a_time = [vendi.score_X(s, normalize=False) for s in sets]
    np.testing.assert_allclose(batched, one_at_a_time, rtol=1e-9, atol=1e-9)


def test_vendi_of_two_vectors_at_60_degrees():
    # cos = 1/2: S/2 = [[1/2, 1/4], [1/4, 1/2]] has eigenvalues 3/4 and 1/4
    pair = np.array([[1.0, 0.0], [0.5, math.sqrt(3) / 2]])
    expected = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))  # = 1.7548
    assert vendi_score(pair) == pytest.approx(expected, abs=1e-9)
    assert expected == pytest.approx(1.7548, abs=1e-4)


def test_terms_accept_a_batch_dimension():
    batch = np.stack([np.eye(3), np.tile(np.eye(3)[:1], (3, 1))])  # (2, 3, 3)
    np.testing.assert_allclose(vendi_score(batch), [3.0, 1.0], atol=1e-9)
    np.testing.assert_allclose(groundedness(np.array([[1.0, 0.5, 0.0], [0.2, 0.2, 0.2]])), [0.5, 0.2])
    query = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    np.testing.assert_allclose(alignment(batch, query), [1 / 3, 0.0], atol=1e-12)


def test_coverage_and_soft_coverage_by_hand():
    retrieved = [["a", "b", "c"], ["d", "e", "a"]]
    assert coverage(retrieved, ["a", "e"]) == 1.0
    assert coverage(retrieved, ["x", "y"]) == 0.0
    assert coverage(retrieved, ["a", "x", "x"]) == 0.5  # Y is a set
    with pytest.raises(ValueError, match="reference_ids"):
        coverage(retrieved, [])
    sub = np.array([[1.0, 0.0], [0.0, 1.0]])
    reference = np.array([[1.0, 0.0], [math.sqrt(0.5), math.sqrt(0.5)], [-1.0, 0.0]])
    assert soft_coverage(sub, reference) == pytest.approx((1.0 + math.sqrt(0.5) + 0.0) / 3)


def test_query_specificity_by_hand():
    q = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert query_specificity([q[:1], q[1:]], q).tolist() == [1.0, 1.0]  # each points at its own query only
    constant = np.array([[0.6, 0.8]])
    assert query_specificity([constant, constant], q) == pytest.approx([-0.2, 0.2])  # mean 0: the same lines for all
    rows = query_specificity([q[:1], q[:1], q[1:]], q[[0, 0, 1]], ["a", "a", "b"])
    assert rows.tolist() == [1.0, 1.0, 1.0]  # rows of one query are compared with the next query, not each other
    assert np.isnan(query_specificity([q[:1]], q[:1])).all()
    with pytest.raises(ValueError, match=r"directions \(1\), query_vectors \(2\) and query_ids \(2\)"):
        query_specificity([q[:1]], q)


def test_config_composites_and_empty_parse_reward():
    oar = RewardConfig()
    assert oar.composite({"groundedness": 1.0, "diversity": 0.5, "alignment": 0.0}) == pytest.approx(0.7)
    assert oar.empty_parse_reward == pytest.approx(-0.6 - 0.2 - 0.5)  # r_g = r_a = -1, r_d -> 0, format -0.5
    wscr = RewardConfig(regime="wscr")
    assert wscr.composite({"coverage": 1.0, "soft_coverage": 0.5}) == pytest.approx(0.75)
    assert wscr.empty_parse_reward == pytest.approx(-0.5 - 0.5)
    with pytest.raises(ValueError, match="w_diversity"):
        RewardConfig(w_diversity=-0.1)


def test_presets_load_and_unknown_names_fail(tmp_path):
    default = load_reward_preset("oar_default")
    assert (default.w_groundedness, default.w_diversity, default.w_alignment, default.k) == (0.6, 0.2, 0.2, 10)
    wscr = load_reward_preset("wscr_default")
    assert (wscr.regime, wscr.coverage_top_m, wscr.coverage_hard_weight) == ("wscr", 500, 0.5)
    assert load_reward_preset("oar_groundedness_only").w_diversity == 0.0
    assert load_reward_preset("oar_groundedness_alignment").w_diversity == 0.0
    with pytest.raises(ValueError, match="oar_default"):
        load_reward_preset("no_such_preset")
    bad = tmp_path / "bad.yaml"
    bad.write_text("regime: oar\nw_groundness: 0.6\n")
    with pytest.raises(ValueError, match="bad.yaml"):
        load_reward_preset(bad)


def test_reward_overrides_are_validated_like_the_preset():
    from r4t_pipeline.settings import load_settings
    from r4t_pipeline.stack import reward_config

    def with_oar(overrides: dict):
        return reward_config(load_settings("smoke", config_path=os.devnull,
                                           overrides={"rewards": {"overrides": {"oar": overrides}}}), "oar")

    tuned = with_oar({"w_groundedness": 0.4, "w_diversity": "0.4"})  # a quoted YAML number is still a number
    assert (tuned.w_groundedness, tuned.w_diversity, tuned.w_alignment) == (0.4, 0.4, 0.2)
    assert isinstance(tuned.w_diversity, float)
    with pytest.raises(ValueError, match=r"rewards\.overrides\.oar: w_grondedness: Extra inputs"):
        with_oar({"w_grondedness": 0.4})
    with pytest.raises(ValueError, match=r"w_groundedness: Input should be a valid number"):
        with_oar({"w_groundedness": "1/3"})
    with pytest.raises(ValueError, match="is for regime 'wscr', not 'oar'"):
        with_oar({"regime": "wscr"})


# ---- a real Polyvore database --------------------------------------------------------------------

class CountingSpace(EmbeddingSpace):
    """The real space, recording each encode_queries batch so the test can see the encoder calls."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.query_batches: list[list[str]] = []

    def encode_queries(self, texts):
        self.query_batches.append(list(texts))
        return super().encode_queries(texts)


@pytest.fixture(scope="module")
def polyvore(tmp_path_factory):
    """~1,500 real items: the boho/festival outfits' items first, then other outfits in file order."""
    if not (POLYVORE / "valid_no_dup.json.gz").exists():
        pytest.skip(f"Polyvore data not found under {POLYVORE} (set R4T_DATA_DIR)")
    categories = {}
    for line in (POLYVORE / "category_id.txt").read_text().splitlines():
        cid, _, name = line.strip().partition(" ")
        if cid.isdigit():
            categories[int(cid)] = name.strip()
    with gzip.open(POLYVORE / "valid_no_dup.json.gz", "rt") as fh:
        outfits = json.load(fh)
    texts, outfit_items = {}, {}
    for outfit in sorted(outfits, key=lambda o: not THEME.search(o["name"])):
        named = [(re.search(r"tid=(\d+)", it["image"]).group(1), it["name"].strip(), it["categoryid"])
                 for it in outfit["items"] if it["name"].strip()]
        outfit_items[outfit["set_id"]] = [(tid, name) for tid, name, _ in named]
        texts.update({tid: item_text(name, categories.get(cid, "")) for tid, name, cid in named if tid not in texts})
        if len(texts) >= 1500:
            break
    ids = list(texts)
    # the on-disk cache lets each preset's scorer reuse sub-query embeddings another scorer computed
    cache = EmbeddingCache(tmp_path_factory.mktemp("embeddings") / "cache.sqlite")
    space = CountingSpace(MiniLMEncoder(device="cpu"), dim=128, cache=cache)
    index = VectorIndex.build(space.encode_items([texts[i] for i in ids]), ids)
    names = {name for items in outfit_items.values() for _, name in items}
    return {"space": space, "index": index, "texts": texts, "outfit_items": outfit_items, "names": names,
            "outfit_titles": {o["set_id"]: o["name"] for o in outfits}}


@pytest.fixture(scope="module")
def hacking_fanouts(polyvore):
    degenerate = next(text for tid, text in polyvore["texts"].items()
                      if text.startswith(DEGENERATE_ITEM_NAME + " ("))
    assert set(GROUNDED) <= polyvore["names"], "the grounded sub-queries must be real catalog item names"
    return {"degenerate": [degenerate] * K, "paraphrases": PARAPHRASES, "grounded": GROUNDED}


def scorer_for(polyvore, config: RewardConfig | str, prefix_query: bool = False) -> FanoutScorer:
    """The terms of SPEC §2 on the sub-queries as given (e_k = E_q(q_k)) unless `prefix_query`."""
    config = load_reward_preset(config) if isinstance(config, str) else config
    return FanoutScorer(polyvore["space"], polyvore["index"], config.model_copy(update={"prefix_query": prefix_query}))


def score_cases(polyvore, fanouts, preset: str) -> dict[str, dict[str, float]]:
    names = list(fanouts)
    scores = scorer_for(polyvore, preset).score_subqueries([QUERY] * len(names), [fanouts[n] for n in names])
    return dict(zip(names, scores))


def test_all_three_terms_rank_grounded_diverse_fanout_above_both_hacks(polyvore, hacking_fanouts):
    s = score_cases(polyvore, hacking_fanouts, "oar_default")
    assert s["grounded"]["total"] > s["degenerate"]["total"]
    assert s["grounded"]["total"] > s["paraphrases"]["total"]
    # why: the copies retrieve one item (Vendi 1 -> r_d = 1/K); the paraphrases align best but spread less
    assert s["degenerate"]["diversity"] == pytest.approx(1 / K, abs=1e-6)
    assert s["paraphrases"]["diversity"] < s["grounded"]["diversity"]
    assert s["paraphrases"]["alignment"] > max(s["grounded"]["alignment"], s["degenerate"]["alignment"])
    assert s["degenerate"]["groundedness"] == pytest.approx(1.0, abs=1e-5)  # sits exactly on an item
    assert all(r["format"] == 0.0 for r in s.values())


def test_groundedness_only_lets_the_degenerate_fanout_win(polyvore, hacking_fanouts):
    s = score_cases(polyvore, hacking_fanouts, "oar_groundedness_only")
    assert s["degenerate"]["total"] > s["grounded"]["total"] > s["paraphrases"]["total"]


def test_without_diversity_the_degenerate_fanout_nearly_catches_up(polyvore, hacking_fanouts):
    full = score_cases(polyvore, hacking_fanouts, "oar_default")
    no_diversity = score_cases(polyvore, hacking_fanouts, "oar_groundedness_alignment")
    margin = {name: s["grounded"]["total"] - s["degenerate"]["total"] for name, s in
              [("full", full), ("no_diversity", no_diversity)]}
    assert margin["no_diversity"] < margin["full"] / 2


def test_subquery_equal_to_an_item_text_has_maximal_groundedness(polyvore, hacking_fanouts):
    item_texts = list(polyvore["texts"].values())[:K]
    scorer = scorer_for(polyvore, "oar_default")
    exact, *others = scorer.score_subqueries([QUERY] * 4, [item_texts, *hacking_fanouts.values()])
    assert exact["groundedness"] == pytest.approx(1.0, abs=1e-5)
    assert all(exact["groundedness"] >= o["groundedness"] - 1e-6 for o in others)


def test_text_path_format_term_and_empty_parse(polyvore, hacking_fanouts):
    scorer = scorer_for(polyvore, "oar_default")
    numbered = "\n".join(f"{i + 1}. {s}" for i, s in enumerate(GROUNDED))
    completions = {
        "exact": numbered,
        "three": "\n".join(GROUNDED[:3]),
        "copies": "\n".join(hacking_fanouts["degenerate"]),  # duplicates are dropped by the parser: 1 left
        "too_many": numbered + "\n" + "\n".join(f"- {p}" for p in PARAPHRASES * 2 + ["extra one", "extra two"]),
        "empty": "",
        "unparseable": "<|im_end|>",
    }
    s = dict(zip(completions, scorer([QUERY] * len(completions), list(completions.values()))))
    assert s["exact"]["format"] == 0.0 and s["exact"]["n_subqueries"] == K
    assert s["three"]["format"] == pytest.approx(-0.5 * 7 / 10)
    assert s["copies"]["format"] == pytest.approx(-0.5 * 9 / 10) and s["copies"]["n_subqueries"] == 1
    assert s["too_many"]["format"] == pytest.approx(-0.5)  # 20 extra lines: capped at the empty parse's term
    for name in ("exact", "three", "copies", "too_many"):
        assert s[name]["total"] == pytest.approx(s[name]["composite"] + s[name]["format"])
    minimum = scorer.config.empty_parse_reward
    assert s["empty"]["total"] == s["unparseable"]["total"] == minimum
    assert s["empty"]["total"] == pytest.approx(s["empty"]["composite"] + s["empty"]["format"])
    assert [r["total"] for r in scorer([QUERY, QUERY], ["", "\n\n"])] == [minimum, minimum]
    # the text path scores the parsed sub-queries exactly as the parsed path does
    parsed = scorer.score_subqueries([QUERY], [GROUNDED])[0]
    assert s["exact"]["total"] == pytest.approx(parsed["total"], abs=1e-6)
    # the empty-parse minimum is below every non-empty reward, in both regimes
    others = [r["total"] for name, r in s.items() if name not in ("empty", "unparseable")]
    others += [r["total"] for preset in ("oar_default", "oar_groundedness_only", "oar_groundedness_alignment")
               for r in score_cases(polyvore, hacking_fanouts, preset).values()]
    assert minimum < min(others)


def test_group_is_encoded_in_one_call_with_repeats_cached(polyvore):
    space = CountingSpace(polyvore["space"].encoder, dim=128)
    scorer = FanoutScorer(space, polyvore["index"], RewardConfig(prefix_query=False))
    group = ["\n".join(GROUNDED), "\n".join(GROUNDED[:5] + PARAPHRASES[:5]), "\n".join(reversed(GROUNDED)), ""]
    first = scorer([QUERY] * len(group), group)
    assert len(space.query_batches) == 1
    assert sorted(space.query_batches[0]) == sorted({QUERY, *GROUNDED, *PARAPHRASES[:5]})
    assert first[0]["total"] == pytest.approx(first[2]["total"], abs=1e-6)  # rows of a fan-out carry no order
    again = scorer([QUERY, QUERY], [group[0], "\n".join(PARAPHRASES)])
    assert space.query_batches[1] == PARAPHRASES[5:]  # only the new texts reach the encoder
    assert again[0] == pytest.approx(first[0], nan_ok=True)  # one query: no specificity (NaN)


def test_prefixed_subqueries_carry_the_query_into_every_direction(polyvore):
    """The default reward embeds "<query> <line>": item names that fit any intent (the same ten for two queries)
    become specific to each query, and a line that already starts with its query is embedded as it is."""
    space = CountingSpace(polyvore["space"].encoder, dim=128)
    prefixed = FanoutScorer(space, polyvore["index"], RewardConfig())
    other_query = "office wear for winter"
    terms = prefixed([QUERY, other_query], ["\n".join(GROUNDED)] * 2)
    assert sorted(space.query_batches[0]) == sorted({QUERY, other_query, *(f"{q} {line}" for q in (QUERY, other_query)
                                                                          for line in GROUNDED)})
    as_written = scorer_for(polyvore, "oar_default").score_subqueries([QUERY, other_query], [GROUNDED] * 2)
    assert terms[0]["alignment"] > as_written[0]["alignment"] and terms[1]["alignment"] > as_written[1]["alignment"]
    assert terms[0]["total"] != pytest.approx(terms[1]["total"], abs=1e-3)  # the same lines, two rewards
    assert as_written[0]["groundedness"] == pytest.approx(as_written[1]["groundedness"], abs=1e-6)
    query_vectors = polyvore["space"].encode_queries([QUERY, other_query])
    written = [polyvore["space"].encode_queries(GROUNDED)] * 2
    carried = [polyvore["space"].encode_queries(prefixed.subqueries(q, GROUNDED)) for q in (QUERY, other_query)]
    assert query_specificity(written, query_vectors).mean() == pytest.approx(0.0, abs=1e-6)
    assert (query_specificity(carried, query_vectors) > 0.1).all()
    # the scorer reports it beside the terms (GRPO logs it): over the batch's other query, as by hand
    np.testing.assert_allclose([t["query_specificity"] for t in terms], query_specificity(carried, query_vectors),
                               atol=1e-5)
    assert sum(t["query_specificity"] for t in as_written) == pytest.approx(0.0, abs=1e-5)  # mean 0: same lines
    already = prefixed.subqueries(QUERY, GROUNDED)
    assert prefixed.subqueries(QUERY, already) == already
    alone = prefixed.score_subqueries([QUERY], [already])[0]
    assert math.isnan(alone.pop("query_specificity"))  # one query: nothing to compare with
    assert alone == pytest.approx({k: v for k, v in terms[0].items() if k != "query_specificity"})


def test_directions_path_matches_text_path_and_normalises(polyvore):
    scorer = scorer_for(polyvore, "oar_default")
    space = polyvore["space"]
    from_text = scorer.score_subqueries([QUERY, QUERY], [GROUNDED, PARAPHRASES])
    directions = np.stack([space.encode_queries(GROUNDED), space.encode_queries(PARAPHRASES)]) * 3.0
    from_vectors = scorer.score_directions(space.encode_queries([QUERY, QUERY]), directions)
    for text_terms, vector_terms in zip(from_text, from_vectors):
        for name in ("groundedness", "diversity", "alignment", "composite"):
            assert vector_terms[name] == pytest.approx(text_terms[name], abs=1e-5)
    with pytest.raises(ValueError, match="directions"):
        scorer.score_directions(np.zeros((2, 128)), np.zeros((3, K, 128)))


def test_wscr_reference_names_reach_full_coverage_and_unrelated_ones_score_lower(polyvore):
    set_id, items = next((sid, items) for sid, items in polyvore["outfit_items"].items()
                         if polyvore["outfit_titles"][sid] == "Boho Style" and len(items) == 5)
    reference = [tid for tid, _ in items]
    own_names = [name for _, name in items]
    unrelated = ["kitchen table lamp", "men's leather wallet", "scented candle", "throw pillow", "nail polish"]
    title = polyvore["outfit_titles"][set_id]
    default = scorer_for(polyvore, "wscr_default")
    own, other = default.score_subqueries([title, title], [own_names, unrelated], [reference, reference])
    assert own["coverage"] == 1.0
    assert own["soft_coverage"] > other["soft_coverage"]
    assert own["total"] > other["total"]
    # m = 500 is a third of this small database, so even unrelated directions cover the set (SPEC §7);
    # a pool of ~3.5% of the catalog (m = 50) tells the two apart on hard coverage as well
    narrow = scorer_for(polyvore, RewardConfig(regime="wscr", coverage_top_m=50))
    own_narrow, other_narrow = narrow.score_subqueries([title, title], [own_names, unrelated], [reference, reference])
    assert own_narrow["coverage"] == 1.0 > other_narrow["coverage"]
    with pytest.raises(ValueError, match="reference_ids"):
        default.score_subqueries([title], [own_names])
    with pytest.raises(ValueError, match="not in the index"):
        default.score_subqueries([title], [own_names], [["no-such-item"]])


def test_own_items_are_query_specific_and_one_list_for_every_title_is_not(polyvore):
    """Real titles and their outfits' items: the items of each title's own outfit point at that title; the same
    ten catalog items for every title score zero on average, however well each of them matches some title."""
    position = {item_id: n for n, item_id in enumerate(polyvore["index"].ids.tolist())}
    titled = [(polyvore["outfit_titles"][set_id], [position[tid] for tid, _ in items if tid in position])
              for set_id, items in polyvore["outfit_items"].items() if polyvore["outfit_titles"].get(set_id)]
    titles = polyvore["space"].encode_queries([title for title, _ in titled])
    own = query_specificity([polyvore["index"].vectors[rows] for _, rows in titled], titles)
    shared = polyvore["index"].vectors[:K]
    same = query_specificity([shared] * len(titled), titles)
    assert own.mean() > 3 * own.std() / np.sqrt(len(own))  # titles say little of their items, but more than nothing
    assert abs(same.mean()) < 1e-6
