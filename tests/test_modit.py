"""MO-DiT+HPPO: metrics, search, ordered sequences, holdout splits, Pareto filter, the preference loss, stage
resume after a kill, and all four stages + evaluation + `r4t expand` end to end on small real samples of both
catalogs (MiniLM embeddings)."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from r4t_pipeline.config import DiffusionTrainConfig
from r4t_pipeline.diffusion import DenoiserConfig, EDMPrecond, SetDenoiser, train_diffusion
from r4t_pipeline.embeddings import embed_catalog
from r4t_pipeline.modit import (
    ModitLayout,
    assert_splits_disjoint,
    check_splits,
    flat_metrics,
    modit_config,
    run_modit,
    train_stage,
)
from r4t_pipeline.modit.config import AttributeTask, ThresholdRule
from r4t_pipeline.modit.data import order_by_score, ordered_sequences, split_continuations
from r4t_pipeline.modit.evaluate import modit_latency
from r4t_pipeline.modit.expand import expand, resolve_task
from r4t_pipeline.modit.hppo import PreferenceData, dpo_loss, preference_pairs, train_hppo
from r4t_pipeline.modit.retrieval import ItemSearcher, expansion_metrics, oracle_joint
from r4t_pipeline.modit.tasks import TEST, TRAIN, attribute_labels, build_task_data

pytestmark = pytest.mark.usefixtures("single_thread")


# ---- metrics and search on hand-built cases ----------------------------------------------------------------

def test_joint_purity_attr_at_k_on_a_hand_built_case():
    patterns = np.array([0, 0, 0, 0, 1, 1, 1, 2])
    positive = np.array([0, 1, 1, 0, 1, 0, 1, 1], bool)
    retrieved = np.array([[1, 2, 4, 3],     # pattern-0 seeds: in pattern 1,2,3; positive 1,2,4; both 1,2
                          [7, -1, -1, -1]])  # pattern-1 seeds: a short list; its empty slots are misses
    m = expansion_metrics(retrieved, np.array([0, 1]), patterns, positive, [2, 4])
    assert m["purity@2"].tolist() == [1.0, 0.0] and m["attr@2"].tolist() == [1.0, 0.5]
    assert m["joint@2"].tolist() == [1.0, 0.0]
    assert m["purity@4"].tolist() == [0.75, 0.0] and m["attr@4"].tolist() == [0.75, 0.25]
    assert m["joint@4"].tolist() == [0.5, 0.0]
    # ceiling: pattern 0 has positives {1, 2}; with seed 1 among the seeds one is left
    oracle = oracle_joint(np.array([[1, 0], [4, -1]]), np.array([0, 1]), patterns, positive, [2])
    assert oracle["joint@2"].tolist() == [0.5, 0.5]


def test_search_excludes_seeds_and_interleaves_queries():
    vectors = np.eye(6, dtype=np.float32)
    vectors[1] = vectors[0] * 0.9 + vectors[1] * 0.1
    vectors[3] = vectors[2] * 0.9 + vectors[3] * 0.1
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    searcher = ItemSearcher(vectors)
    # two queries, on items 0 and 2; item 0 is a seed: the lists interleave as 2, 1, 3, (0 excluded) ...
    queries = np.stack([vectors[0], vectors[2]])[None]
    assert searcher.search(queries, np.array([[0, -1]]), 3).tolist() == [[2, 1, 3]]
    restricted = ItemSearcher(vectors, np.array([0, 0, 1, 1, 0, 0], bool))
    assert restricted.search(vectors[[0]], np.array([[2]]), 3).tolist() == [[3, -1, -1]]


def test_threshold_rules_and_unknown_values(polyvore_catalog):
    catalog = polyvore_catalog
    ids = catalog.items["item_id"].to_numpy().astype(str)
    quartile = attribute_labels(catalog, ids, AttributeTask(name="t", domain="polyvore", column="likes"))
    known = quartile["known"]
    assert 0 < known.sum() < len(ids) and not quartile["positive"][~known].any()
    assert quartile["threshold"] == np.quantile(quartile["values"][known], 0.75)
    assert quartile["positive"][known].mean() == pytest.approx(0.25, abs=0.01)
    either = attribute_labels(catalog, ids, AttributeTask(name="t", domain="polyvore", column="likes",
                                                          threshold=ThresholdRule(quantile=0.9, at_least=50)))
    assert either["threshold"] == 50  # the lower of the two rules: an item qualifies by either
    with pytest.raises(ValueError, match="has no column 'rating'"):
        attribute_labels(catalog, ids, AttributeTask(name="t", domain="polyvore", column="rating"))


def test_order_by_score_and_continuations():
    scores = np.array([0.9, 0.1, 0.5, 0.3])
    assert order_by_score(np.array([[0, 1, 2, -1]]), scores).tolist() == [[1, 2, 0, -1]]
    prefixes, targets = split_continuations(np.array([[1, 3, 2, -1], [3, 2, 0, 1]]))
    assert prefixes.tolist() == [[1, 3, -1], [3, 2, 0]] and targets.tolist() == [2, 1]


# ---- the preference loss -------------------------------------------------------------------------------------

DIM, TOKENS = 8, 3


def random_precond(seed: int = 0) -> EDMPrecond:
    """Every weight random: adaLN-Zero's zero init would make the network ignore its input at first."""
    torch.manual_seed(seed)
    net = SetDenoiser(DenoiserConfig(dim=DIM, cond_dim=DIM, hidden=16, mlp=32, heads=2, layers=1,
                                     cond_positions=TOKENS))
    for p in net.parameters():
        nn.init.normal_(p, std=0.3)
    return EDMPrecond(net, sigma_data=0.35)


def preference_batch(n: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    winners, losers = torch.randn(n, 1, DIM, generator=g) * 0.35, torch.randn(n, 1, DIM, generator=g) * 0.35
    sigma = torch.exp(torch.randn(n, generator=g) - 1)
    return winners, losers, sigma, torch.randn(n, 1, DIM, generator=g), torch.randn(n, TOKENS, DIM, generator=g)


def test_preference_loss_is_log2_at_the_reference_with_a_nonzero_gradient():
    reference = random_precond()
    policy = copy.deepcopy(reference)
    winners, losers, sigma, noise, cond = preference_batch()
    loss, margin = dpo_loss(policy, reference, winners, losers, sigma, noise, cond, None, beta=50.0)
    assert torch.allclose(margin, torch.zeros_like(margin), atol=1e-6)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    loss.backward()
    # d loss / d theta = beta/2 * grad(e(x_w) - e(x_l)) at theta = ref: not zero, so the first step moves
    assert sum(p.grad.abs().sum() for p in policy.parameters()) > 0


def test_preference_loss_has_zero_gradient_when_winner_equals_loser():
    # float64: the two halves' gradients cancel exactly, up to rounding
    reference = random_precond().double()
    policy = random_precond(seed=1).double()  # any policy: the margin vanishes identically in theta
    winners, _, sigma, noise, cond = (t.double() for t in preference_batch())
    loss, margin = dpo_loss(policy, reference, winners, winners.clone(), sigma, noise, cond, None, beta=50.0)
    loss.backward()
    assert torch.allclose(margin, torch.zeros_like(margin), atol=1e-12)
    assert max(p.grad.abs().max().item() for p in policy.parameters() if p.grad is not None) < 1e-9


def test_a_preference_step_raises_the_winners_relative_likelihood():
    reference = random_precond()
    policy = copy.deepcopy(reference)
    batch = preference_batch()
    optimizer = torch.optim.SGD(policy.parameters(), lr=1e-5)  # a small step: first order holds
    loss, _ = dpo_loss(policy, reference, *batch[:4], batch[4], None, beta=50.0)
    loss.backward()
    optimizer.step()
    after, margin = dpo_loss(policy, reference, *batch[:4], batch[4], None, beta=50.0)
    # margin < 0: the winner's denoising error fell relative to the loser's (a higher implicit reward)
    assert margin.mean().item() < 0 and after.item() < math.log(2)


# ---- the Pareto filter -------------------------------------------------------------------------------------

def test_pareto_filter_drops_exactly_the_pairs_that_lower_purity():
    rng = np.random.default_rng(0)
    joint = rng.integers(0, 6, size=(30, 7)) / 10
    purity = rng.integers(3, 11, size=(30, 7)) / 10
    everything = preference_pairs(joint, purity, 0.1, 10**6, False, np.random.default_rng(1))
    kept = preference_pairs(joint, purity, 0.1, 10**6, True, np.random.default_rng(1))
    rows, win, lose = everything.T
    assert (joint[rows, win] - joint[rows, lose] >= 0.1 - 1e-9).all()
    expected = {tuple(p) for p, ok in zip(everything.tolist(), purity[rows, win] >= purity[rows, lose]) if ok}
    assert {tuple(p) for p in kept.tolist()} == expected
    assert 0 < len(expected) < len(everything)
    capped = preference_pairs(joint, purity, 0.1, 2, True, np.random.default_rng(1))
    assert np.bincount(capped[:, 0]).max() <= 2 and {tuple(p) for p in capped.tolist()} <= expected


# ---- the denoiser extension -----------------------------------------------------------------------------------

def test_condition_positions_make_order_matter_and_leave_r4t_unchanged():
    r4t = DenoiserConfig(dim=DIM, cond_dim=DIM, hidden=16, mlp=32, heads=2, layers=1)
    assert "cond_positions" not in r4t.to_dict()  # R4T configs and run fingerprints stay as they were
    assert not any("cond_position" in name for name, _ in SetDenoiser(r4t).named_parameters())
    x, cond = torch.randn(2, 1, DIM), torch.randn(2, TOKENS, DIM)
    swapped = cond[:, [0, 2, 1]]
    for positions, order_matters in ((0, False), (TOKENS, True)):
        torch.manual_seed(0)
        net = SetDenoiser(DenoiserConfig(dim=DIM, cond_dim=DIM, hidden=16, mlp=32, heads=2, layers=1,
                                         cond_positions=positions))
        for p in net.parameters():
            nn.init.normal_(p, std=0.3)
        with torch.no_grad():
            same = torch.allclose(net(x, torch.zeros(2), cond), net(x, torch.zeros(2), swapped), atol=1e-5)
        assert same != order_matters
    with pytest.raises(ValueError, match="knows 3 positions"):
        net(x, torch.zeros(2), torch.randn(2, 4, DIM))


# ---- real samples of both catalogs -----------------------------------------------------------------------------

def tiny_config(**overrides):
    """The smoke profile: patterns of ~20 items, seed sets of 2-4, tiny training runs."""
    return modit_config("smoke", overrides)


@pytest.fixture(scope="module")
def sample(polyvore_catalog, data_dir, minilm_space):
    """A few hundred real items of each catalog, embedded with MiniLM (128-d)."""
    from r4t_pipeline.sources import load_djmix

    catalogs = {"polyvore": polyvore_catalog.subsample(90, seed=0),
                "djmix": load_djmix(data_dir, allow_download=False).subsample(25, seed=0)}
    return catalogs, {domain: embed_catalog(catalog, minilm_space) for domain, catalog in catalogs.items()}


@pytest.fixture(scope="module")
def sample_tasks(sample):
    catalogs, embeddings = sample
    cfg = tiny_config()
    return cfg, [build_task_data(t, catalogs[t.domain], embeddings[t.domain], cfg) for t in cfg.tasks]


def test_task_data_splits_are_disjoint_and_seeds_low_in_one_pattern(sample_tasks):
    _, tasks = sample_tasks
    for data in tasks:
        assert all(v == 0 for v in check_splits(data).values()), check_splits(data)
        for protocol in ("item", "pattern"):
            split = data.splits[protocol]
            assert all(len(data.seed_sets[protocol][s]) > 0 for s in ("train", "val", "test")), (data.name, protocol)
            if protocol == "pattern":  # no pattern has both training and test items
                train_patterns = set(data.patterns[data.database & (split == TRAIN)].tolist())
                assert not train_patterns & set(data.patterns[split == TEST].tolist())
        assert data.meta["pattern_stats"]["patterns"] == data.n_patterns
        assert data.predictor_auc["item"]["test"] > 0.5 or data.name == "djmix_reuse"  # reuse is barely predictable
    likes, price = tasks[0], tasks[1]  # one model trains on both: what one holds out, the other cannot train on
    for protocol in ("item", "pattern"):
        assert not (likes.train_items(protocol) & (price.splits[protocol] != TRAIN)).any()
        assert not (price.train_items(protocol) & (likes.splits[protocol] != TRAIN)).any()
    assert likes.meta["train_items_held_out_by_sibling_tasks"]["item"] == 0  # the item split is shared
    broken = copy.deepcopy(tasks[0])
    test_seed = broken.seed_sets["item"]["test"].positions[0, 0]
    broken.splits["item"][test_seed] = TRAIN
    with pytest.raises(ValueError, match="seeds_outside_split"):
        assert_splits_disjoint(broken)


def test_ordered_sequences_stay_in_one_pattern_and_rise_in_predicted_attribute(sample_tasks):
    cfg, tasks = sample_tasks
    data = tasks[0]
    scores, eligible = data.scores["item"], data.known & data.train_items("item")
    rows = ordered_sequences(data.patterns, scores, eligible, 4, 2, cfg.sequences.max_items, np.random.default_rng(0))
    assert len(rows) > 10
    for row in rows:
        members = row[row >= 0]
        assert 3 <= len(members) <= cfg.sequences.max_items + 1 and len(set(members)) == len(members)
        assert len(set(data.patterns[members])) == 1 and eligible[members].all()
        assert (np.diff(scores[members]) >= 0).all()


def test_stage_resumes_after_a_kill(sample_tasks, sample, tmp_path):
    cfg, tasks = sample_tasks
    catalogs, embeddings = sample
    cfg = cfg.model_copy(update={"raw": cfg.raw.model_copy(update={"steps": 6, "checkpoint_every": 2,
                                                                    "log_every": 1})})

    def kill_at_step_5(step, metrics):
        if step == 5:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        train_stage("raw", "item", tasks, embeddings, cfg, tmp_path / "raw", catalogs=catalogs, log_fn=kill_at_step_5)
    assert (tmp_path / "raw.partial" / "training_state.pt").exists() and not (tmp_path / "raw").exists()
    resumed = train_stage("raw", "item", tasks, embeddings, cfg, tmp_path / "raw", catalogs=catalogs)
    straight = train_stage("raw", "item", tasks, embeddings, cfg, tmp_path / "straight", catalogs=catalogs)
    assert (resumed.steps, resumed.steps_run, straight.steps_run) == (6, 2, 6)
    weights = [load_file(r.checkpoint_dir / "model.safetensors") for r in (resumed, straight)]
    assert all(torch.allclose(weights[0][k], weights[1][k]) for k in weights[0])
    with pytest.raises(ValueError, match="pass init_from"):
        train_stage("tail", "item", tasks, embeddings, cfg, tmp_path / "tail")


def test_hppo_resumes_after_a_kill_with_identical_weights(tmp_path):
    g = torch.Generator().manual_seed(0)
    targets, conditions = torch.randn(8, 1, DIM, generator=g).numpy(), torch.randn(8, TOKENS, DIM, generator=g).numpy()
    denoiser = DenoiserConfig(dim=DIM, cond_dim=DIM, hidden=16, mlp=32, heads=2, layers=1, cond_positions=TOKENS)
    reference = train_diffusion(targets, conditions, denoiser, DiffusionTrainConfig(steps=3, batch_size=4,
                                                                                     warmup_steps=1),
                                tmp_path / "tail").checkpoint_dir
    mask = np.ones((8, TOKENS), bool)
    prefs = PreferenceData(conditions, mask, targets, targets[::-1].copy(), np.full(8, "t"))
    cfg = modit_config("smoke").hppo.model_copy(update={"steps": 6, "checkpoint_every": 2, "log_every": 1,
                                                        "batch_size": 4})

    def kill_at_step_5(step, metrics):
        assert set(metrics) >= {"loss", "reward_margin", "preference_accuracy"}
        if step == 5:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        train_hppo(prefs, reference, cfg, tmp_path / "hppo", log_fn=kill_at_step_5)
    resumed = train_hppo(prefs, reference, cfg, tmp_path / "hppo")
    straight = train_hppo(prefs, reference, cfg, tmp_path / "straight")
    assert (resumed.steps, resumed.steps_run, straight.steps_run) == (6, 2, 6)
    weights = [load_file(r.checkpoint_dir / "model.safetensors") for r in (resumed, straight)]
    assert all(torch.allclose(weights[0][k], weights[1][k]) for k in weights[0])
    assert json.loads((resumed.checkpoint_dir / "config.json").read_text())["reference"] == str(reference)
    again = train_hppo(prefs, reference, cfg, tmp_path / "hppo")  # finished: returns without training
    assert again.steps_run == 0


@pytest.fixture(scope="module")
def modit_run(sample, tmp_path_factory):
    """All four stages for both protocols and the evaluation, on the real samples, in the CLI's layout."""
    catalogs, embeddings = sample
    root = tmp_path_factory.mktemp("modit")
    for domain in catalogs:
        catalogs[domain].save(root / "smoke" / domain / "catalog")
        embeddings[domain].save(root / "smoke" / domain / "embeddings")
    cfg = tiny_config()
    summary = run_modit(catalogs, embeddings, cfg, root / "smoke" / "modit")
    return root, cfg, summary


def test_all_stages_and_the_evaluation_end_to_end(modit_run):
    root, cfg, summary = modit_run
    layout = ModitLayout(root / "smoke" / "modit")
    checkpoints = layout.checkpoints(cfg.protocols)
    assert all(set(checkpoints[p]) == {"raw", "ordered", "tail", "hppo"} for p in cfg.protocols)
    stages = summary["stages"]
    assert stages["item/raw"]["examples_by_source"].keys() == {"djmix", "polyvore"}
    assert stages["pattern/ordered"]["examples_by_source"].keys() == {t.name for t in cfg.tasks}
    assert stages["item/hppo"]["pairs"] > 0 and "tail_centroid" in stages["item/hppo"]["pool"]["djmix_reuse"][
        "joint_by_kind"]
    evaluation = json.loads((layout.evaluation / "evaluation.json").read_text())
    cells = evaluation["cells"]
    assert {(c["task"], c["protocol"]) for c in cells} == {(t.name, p) for t in cfg.tasks for p in cfg.protocols}
    for cell in cells:
        assert set(cell["metrics"]) == {"seed_centroid", "global_attribute", "predicted_attribute", "interpolation",
                                        "pretrained", "ordered", "modit", "hppo", "hppo_positives_only"}
        for metric in ("joint@10", "purity@10", "attr@10", "joint@50"):
            mean, err = cell["metrics"]["hppo"][metric]
            assert 0 <= mean <= 1 and err >= 0
        for method in ("global_attribute", "hppo_positives_only"):  # only positives (each sample task has >= 10)
            assert cell["metrics"][method]["attr@10"][0] == pytest.approx(1.0)
        comparison = cell["comparisons"]["hppo_vs_modit"]["joint@10"]
        assert 0 <= comparison["p_wilcoxon"] <= 1 and 0 <= comparison["p_bootstrap_patterns"] <= 1
        assert cell["best_baseline"] in ("seed_centroid", "global_attribute", "interpolation")
        assert cell["lambda"] in cfg.evaluation.lambdas
    flat = flat_metrics(evaluation)  # what MLflow gets
    assert {"polyvore_likes/item/hppo/joint_at_10",
            "djmix_reuse/pattern/hppo_vs_modit/joint_at_10_p_wilcoxon"} <= set(flat)
    assert (layout.evaluation / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    assert "| MO-DiT+HPPO (stage 4) |" in (layout.evaluation / "table.md").read_text()
    assert summary["times_seconds"]["total"] > 0


def test_latency_of_the_generator_per_batch_of_seed_sets(modit_run, sample):
    root, cfg, _ = modit_run
    layout = ModitLayout(root / "smoke" / "modit")
    timings = modit_latency(layout.load_task("polyvore_price"), sample[1]["polyvore"],
                            layout.checkpoints(["item"])["item"], cfg, "item", [2, 4], repeats=2)
    assert set(timings) == {"modit_hppo_heun1", "seed_centroid"}
    assert timings["modit_hppo_heun1"]["4"]["median_seconds"] > 0 and len(timings["seed_centroid"]["2"]["runs"]) == 2


def test_expand_returns_items_with_attribute_and_pattern_flags(modit_run, sample):
    root, cfg, _ = modit_run
    catalogs, embeddings = sample
    layout = ModitLayout(root / "smoke" / "modit")
    data = layout.load_task("polyvore_likes")
    seeds = data.seed_sets["item"]["test"]
    ids = [str(data.item_ids[n]) for n in seeds.members(0)]
    checkpoints = layout.checkpoints(["item"])["item"]
    result = expand(ids, data, catalogs["polyvore"], embeddings["polyvore"], cfg, k=7, checkpoints=checkpoints)
    assert len(result.items) == 7 and not result.warnings and result.pattern == seeds.pattern[0]
    assert not {i["item_id"] for i in result.items} & set(ids)
    for item in result.items:
        n = list(data.item_ids).index(item["item_id"])
        assert item["in_pattern"] == (data.patterns[n] == seeds.pattern[0])
        assert item["has_attribute"] == data.positive[n] and item["likes"] == data.values[n]
    other = next(n for n in np.flatnonzero(data.database) if data.patterns[n] != seeds.pattern[0])
    mixed = expand([*ids, str(data.item_ids[other])], data, catalogs["polyvore"], embeddings["polyvore"], cfg,
                   k=5, method="seed_centroid")
    assert "the seeds come from 2 patterns" in mixed.warnings[0]
    with pytest.raises(ValueError, match="no seed ids given"):
        expand([" "], data, catalogs["polyvore"], embeddings["polyvore"], cfg)
    with pytest.raises(ValueError, match=r"unknown item id\(s\) \['nope'\]"):
        expand([ids[0], "nope"], data, catalogs["polyvore"], embeddings["polyvore"], cfg)
    unlabelled = str(data.item_ids[np.flatnonzero(~data.database)[0]])
    with pytest.raises(ValueError, match="have no 'likes' value"):
        expand([unlabelled], data, catalogs["polyvore"], embeddings["polyvore"], cfg)
    assert resolve_task(cfg, "djmix", "likes") == "djmix_reuse" and resolve_task(cfg, "polyvore", "price")
    with pytest.raises(ValueError, match="unknown task 'color' for domain 'polyvore'"):
        resolve_task(cfg, "polyvore", "color")
