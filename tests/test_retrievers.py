"""The one retriever interface, on the smoke graph's real artefacts."""

import numpy as np
import pytest

from r4t_pipeline import stack
from r4t_pipeline.fanout import with_query
from r4t_pipeline.retrievers import distinct_columns


def _retriever(smoke, regime: str, method: str):
    _, artefacts = stack.latest_artefacts(smoke.settings, "polyvore", regime, [method])
    return stack.build_retriever(smoke.settings, regime, method, artefacts)


@pytest.mark.parametrize("method", stack.METHODS)
def test_every_method_returns_directions_candidates_and_a_merged_set(smoke, method):
    retriever = _retriever(smoke, "wscr", method)
    first_item = str(retriever.index.ids[0])
    queries = ["bohemian festival style", "office essentials"]
    batch = retriever.retrieve(queries, pool_size=40, seed=1, reference_ids=[[first_item], [first_item]])
    assert len(batch.fanouts) == 2 and batch.fanout_seconds >= 0 and batch.search_seconds >= 0
    for query, fanout in zip(queries, batch.fanouts):
        n = len(fanout.directions)
        assert fanout.directions.shape[1] == 128 and len(fanout.candidate_ids) == n
        assert all(len(ids) == -(-40 // n) for ids in fanout.candidate_ids)  # the pool split evenly
        np.testing.assert_allclose(np.linalg.norm(fanout.directions, axis=1), 1.0, atol=1e-4)
        assert len(fanout.merged) == len(set(fanout.merged)) <= 40 + n
        if method in ("zero_shot", "best_of_n", "r4t_folm"):
            assert len(fanout.subqueries) == n and all(s.startswith(query) for s in fanout.subqueries)
    if method in ("r4t_diffusion", "supervised_diffusion"):
        assert all(len(f.directions) == smoke.settings.rewards.k for f in batch.fanouts)
    if method == "no_fanout":
        assert all(len(f.directions) == 1 for f in batch.fanouts)


@pytest.mark.parametrize("method", ["zero_shot", "r4t_folm"])
def test_text_fanouts_read_the_lines_alone_when_the_reward_does(smoke, method):
    """`prefix_query: false` in the regime's reward: the same sampled lines, without the query in front."""
    rewards = smoke.settings.rewards.model_copy(update={"overrides": {"oar": {"prefix_query": False}}})
    settings = smoke.settings.model_copy(update={"rewards": rewards})
    _, artefacts = stack.latest_artefacts(smoke.settings, "polyvore", "oar", [method])
    queries = ["bohemian festival style", "office essentials"]
    prefixed, written = (stack.build_retriever(s, "oar", method, artefacts).retrieve(queries, 20, seed=2).fanouts
                         for s in (smoke.settings, settings))
    for query, a, b in zip(queries, prefixed, written):
        assert a.subqueries == with_query(query, b.subqueries) != b.subqueries
        np.testing.assert_allclose(a.directions, stack.embedding_space(smoke.settings).encode_queries(a.subqueries),
                                   atol=1e-5)


def test_best_of_n_selects_over_the_texts_its_regime_embeds(smoke):
    """The selection reads the OAR reward's terms in both regimes, but the regime's own `prefix_query`."""
    rewards = smoke.settings.rewards.model_copy(update={"overrides": {"wscr": {"prefix_query": False}}})
    settings = smoke.settings.model_copy(update={"rewards": rewards})
    _, artefacts = stack.latest_artefacts(smoke.settings, "polyvore", "wscr", ["best_of_n"])
    for current, prefixed in ((smoke.settings, True), (settings, False)):
        retriever = stack.build_retriever(current, "wscr", "best_of_n", artefacts)
        assert retriever.prefix_query is prefixed and retriever.scorer.config.prefix_query is prefixed
        assert retriever.scorer.config.regime == "oar"


def test_the_pool_is_filled_with_distinct_items_in_rounds():
    # three directions over items 0-5; 0 and 1 lead two lists each
    ranked = np.array([[0, 1, 2, 3, 4, 5], [0, 1, 3, 2, 5, 4], [4, 0, 1, 5, 2, 3]])
    columns = distinct_columns(ranked, 2)
    picked = [row[c].tolist() for row, c in zip(ranked, columns)]
    assert picked == [[0, 2], [1, 3], [4, 5]]  # round 1: 0, then 1 (0 is taken), 4; round 2: 2, 3, then 5
    assert [row[c[:1]].tolist() for row, c in zip(ranked, columns)] == [[0], [1], [4]]  # one round = pool of 3
    assert [len(c) for c in distinct_columns(ranked[:, :3], 2)] == [2, 2, 1]  # a list runs out: fewer, no repeats


def test_a_fanout_of_overlapping_directions_gets_the_whole_pool(smoke):
    retriever = _retriever(smoke, "wscr", "no_fanout")
    thrice = np.repeat(retriever.space.encode_queries(["bohemian festival style"]), 3, axis=0)
    retriever.directions = lambda queries, seed, reference_ids=None: ([thrice], None)  # three identical directions
    fanout = retriever.retrieve(["bohemian festival style"], pool_size=30).fanouts[0]
    alone = _retriever(smoke, "wscr", "no_fanout").retrieve(["bohemian festival style"], pool_size=30).fanouts[0]
    # in turns down one ranked list, to its 30th item: past twice a direction's share, the first search's depth
    assert len(fanout.merged) == 30 and set(fanout.merged) == set(alone.merged)
    assert [fanout.candidate_ids[j] for j in range(3)] == [alone.merged[j::3] for j in range(3)]


def test_same_seed_same_diffusion_fanout(smoke):
    retriever = _retriever(smoke, "oar", "r4t_diffusion")
    a = retriever.retrieve(["summer vacation vibes"], 10, seed=3).fanouts[0]
    b = retriever.retrieve(["summer vacation vibes"], 10, seed=3).fanouts[0]
    c = retriever.retrieve(["summer vacation vibes"], 10, seed=4).fanouts[0]
    np.testing.assert_array_equal(a.directions, b.directions)
    assert not np.allclose(a.directions, c.directions)


@pytest.mark.parametrize("method", ["r4t_folm", "r4t_diffusion"])
def test_the_query_keeps_a_seat_as_the_first_direction(smoke, method):
    """keep_query: the same fan-out with E_q(q) before its directions (and the query before its sub-queries)."""
    _, artefacts = stack.latest_artefacts(smoke.settings, "polyvore", "oar", [method])
    plain, kept = (stack.build_retriever(smoke.settings, "oar", method, artefacts, keep_query=keep)
                   for keep in (False, True))
    query_only = stack.build_retriever(smoke.settings, "oar", "no_fanout", artefacts)
    queries = ["bohemian festival style", "office essentials"]
    without, with_seat = (r.retrieve(queries, pool_size=30, seed=2).fanouts for r in (plain, kept))
    own = plain.space.encode_queries(queries)
    for query, vector, a, b in zip(queries, own, without, with_seat):
        np.testing.assert_allclose(b.directions[0], vector, atol=1e-6)
        np.testing.assert_array_equal(b.directions[1:], a.directions)  # same seed, same fan-out
        alone = query_only.retrieve([query], pool_size=len(b.candidate_ids[0])).fanouts[0]
        # the query's seat picks first, and what it alone would retrieve is in the pool (taken by it or another)
        assert b.candidate_ids[0][0] == alone.candidate_ids[0][0] and set(alone.merged) <= set(b.merged)
        assert (b.subqueries is None) == (method == "r4t_diffusion")
        if b.subqueries is not None:
            assert b.subqueries == [query, *a.subqueries]
    with pytest.raises(ValueError, match="no_fanout is the query alone"):
        stack.build_retriever(smoke.settings, "oar", "no_fanout", artefacts, keep_query=True)


def test_onnx_runtime_retrieves_what_pytorch_retrieves(smoke):
    settings = smoke.settings.model_copy(update={"query_runtime": "onnx"})
    queries = ["bohemian festival style", "office essentials", "a cosy winter evening by the fire"]
    for method in ("no_fanout", "r4t_diffusion"):
        _, artefacts = stack.latest_artefacts(smoke.settings, "polyvore", "oar", [method])
        eager, onnx = (stack.build_retriever(s, "oar", method, artefacts) for s in (smoke.settings, settings))
        assert type(onnx.space.encoder.onnx).__name__ == "OnnxModule"
        a, b = (r.retrieve(queries, pool_size=20, seed=5).fanouts for r in (eager, onnx))
        for x, y in zip(a, b):
            np.testing.assert_allclose(y.directions, x.directions, atol=1e-5)
            assert y.candidate_ids == x.candidate_ids


def test_bad_requests_are_refused_clearly(smoke):
    _, artefacts = stack.latest_artefacts(smoke.settings, "polyvore", "oar", [])
    with pytest.raises(ValueError, match="unknown method 'magic'"):
        stack.build_retriever(smoke.settings, "oar", "magic", artefacts)
    retriever = _retriever(smoke, "oar", "no_fanout")
    with pytest.raises(ValueError, match="non-empty"):
        retriever.retrieve(["  "], 10)
