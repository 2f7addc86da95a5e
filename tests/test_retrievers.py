"""The one retriever interface, on the smoke graph's real artefacts."""

import numpy as np
import pytest

from r4t_pipeline import stack


def _retriever(smoke, regime: str, method: str):
    _, artefacts = stack.latest_artefacts(smoke.settings, "polyvore", regime, [method])
    return stack.build_retriever(smoke.settings, regime, method, artefacts)


@pytest.mark.parametrize("method", stack.METHODS)
def test_every_method_returns_directions_candidates_and_a_merged_set(smoke, method):
    retriever = _retriever(smoke, "wscr", method)
    first_item = str(retriever.index.ids[0])
    batch = retriever.retrieve(["bohemian festival style", "office essentials"], pool_size=40, seed=1,
                               reference_ids=[[first_item], [first_item]])
    assert len(batch.fanouts) == 2 and batch.fanout_seconds >= 0 and batch.search_seconds >= 0
    for fanout in batch.fanouts:
        n = len(fanout.directions)
        assert fanout.directions.shape[1] == 128 and len(fanout.candidate_ids) == n
        assert all(len(ids) == -(-40 // n) for ids in fanout.candidate_ids)  # the pool split evenly
        np.testing.assert_allclose(np.linalg.norm(fanout.directions, axis=1), 1.0, atol=1e-4)
        assert len(fanout.merged) == len(set(fanout.merged)) <= 40 + n
        if method in ("zero_shot", "best_of_n", "r4t_folm"):
            assert len(fanout.subqueries) == n
    if method in ("r4t_diffusion", "supervised_diffusion"):
        assert all(len(f.directions) == smoke.settings.rewards.k for f in batch.fanouts)
    if method == "no_fanout":
        assert all(len(f.directions) == 1 for f in batch.fanouts)


def test_same_seed_same_diffusion_fanout(smoke):
    retriever = _retriever(smoke, "oar", "r4t_diffusion")
    a = retriever.retrieve(["summer vacation vibes"], 10, seed=3).fanouts[0]
    b = retriever.retrieve(["summer vacation vibes"], 10, seed=3).fanouts[0]
    c = retriever.retrieve(["summer vacation vibes"], 10, seed=4).fanouts[0]
    np.testing.assert_array_equal(a.directions, b.directions)
    assert not np.allclose(a.directions, c.directions)


def test_bad_requests_are_refused_clearly(smoke):
    _, artefacts = stack.latest_artefacts(smoke.settings, "polyvore", "oar", [])
    with pytest.raises(ValueError, match="unknown method 'magic'"):
        stack.build_retriever(smoke.settings, "oar", "magic", artefacts)
    retriever = _retriever(smoke, "oar", "no_fanout")
    with pytest.raises(ValueError, match="non-empty"):
        retriever.retrieve(["  "], 10)
