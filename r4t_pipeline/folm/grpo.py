"""GRPO with the soft-PPO per-token loss (SPEC §3), as a compact loop over `transformers` models.

One training step: pick `per_step_queries` queries, sample a group of `group_size` completions each from
the current policy (this is π_old), score them, form group-relative advantages
    A_i = (R_i - mean(R)) / (std(R) + 1e-6),
then take `num_iterations` AdamW steps on the per-token loss, ρ = π_θ(token) / π_old(token):
    L = -min(ρA, clip(ρ, 1-ε, 1+ε)A) + β_f (ρ - 1 - log ρ) + β_r (ρ log ρ - ρ + 1),
averaged over each completion's tokens, then over completions (GRPO). The first iteration runs at
π_θ = π_old, so ρ = 1 exactly there and its log-probs become π_old for the later iterations.

Why not TRL's GRPOTrainer: there a step is one optimizer update on a slice of buffered generations drawn
through a repeat sampler, which makes exact resumption at a step boundary, per-term reward logging and
the two KL terms indirect. This loop is short, resumes bit-for-bit (tested), and does no CPU work that
TRL would not. For multi-GPU/vLLM runs, `soft_ppo_token_loss` drops into a `_compute_loss` override.
"""

from __future__ import annotations

import json
import logging
import resource
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, Field
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from r4t_pipeline.config import FolmTrainConfig
from r4t_pipeline.folm.generate import Rollouts, sample_rollouts
from r4t_pipeline.folm.models import load_causal_lm
from r4t_pipeline.io import atomic_dir, stable_hash, write_json

log = logging.getLogger(__name__)

RewardFn = Callable[..., list[dict[str, float]]]
LogFn = Callable[[int, dict[str, float]], None]
META_FILE = "r4t_folm.json"


class FolmTrainResult(BaseModel):
    checkpoint_dir: Path
    steps: int
    resumed_from_step: int = Field(description="steps already done when this call started")
    seconds_per_step: float = Field(description="mean wall time of the steps this call ran")
    peak_rss_mb: float = Field(description="the process's peak RSS, reward model and all")
    peak_gpu_mb: float | None
    history: list[dict[str, float]] = Field(description="one row per step: reward/<term> means, loss, KL terms, ...")


def soft_ppo_token_loss(
    logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, epsilon: float,
    beta_forward: float, beta_reverse: float,
) -> dict[str, torch.Tensor]:
    """Per-token loss and its parts (SPEC §3); `advantages` broadcasts over tokens ([N, 1])."""
    log_ratio = logps - old_logps
    ratio = log_ratio.exp()
    surrogate = torch.min(ratio * advantages, ratio.clamp(1 - epsilon, 1 + epsilon) * advantages)
    # ρ - 1 - log ρ estimates KL(π_old ‖ π_θ), ρ log ρ - ρ + 1 = ρ·log ρ - (ρ - 1) estimates KL(π_θ ‖ π_old). Written
    # with expm1 (ρ - 1 without cancellation), the reverse term as log ρ·(ρ - 1) minus the forward one (no
    # first-order cancellation); the clamp removes a last-ulp negative near ρ = 1, where the gradient is ~0 anyway.
    rho_minus_one = torch.expm1(log_ratio)
    kl_forward = (rho_minus_one - log_ratio).clamp_min(0)
    kl_reverse = (log_ratio * rho_minus_one - kl_forward).clamp_min(0)
    clipped = ((ratio > 1 + epsilon) & (advantages > 0)) | ((ratio < 1 - epsilon) & (advantages < 0))
    return {"loss": -surrogate + beta_forward * kl_forward + beta_reverse * kl_reverse,
            "kl_forward": kl_forward, "kl_reverse": kl_reverse, "clip_fraction": clipped.float()}


def group_advantages(totals: torch.Tensor, group_size: int) -> torch.Tensor:
    """(R_i - mean) / (std + 1e-6) within each consecutive group of `group_size` rewards."""
    groups = totals.view(-1, group_size)
    return ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-6)).view(-1)


def completion_logps(
    model: PreTrainedModel, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
    completion_mask: torch.Tensor, temperature: float,
) -> torch.Tensor:
    """log π(token) of each completion token at the sampling temperature, [N, C]."""
    input_ids = torch.cat([prompt_ids, completion_ids], 1)
    mask = torch.cat([prompt_mask, completion_mask], 1)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # as `generate` numbers left-padded rows
    width = completion_ids.shape[1]
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                   logits_to_keep=width + 1).logits[:, :-1].float() / temperature
    return logits.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def _micro_batches(rollouts: Rollouts, size: int, device: torch.device) -> list[tuple[slice, tuple[torch.Tensor, ...]]]:
    """Row slices with their tensors, padding columns shared by the whole slice trimmed away."""
    batches = []
    for start in range(0, len(rollouts.texts), size):
        rows = slice(start, start + size)
        p_mask, c_mask = rollouts.prompt_mask[rows], rollouts.completion_mask[rows]
        first = int(p_mask.any(0).nonzero()[0])
        last = int(c_mask.any(0).nonzero()[-1]) + 1
        tensors = (rollouts.prompt_ids[rows, first:], p_mask[:, first:], rollouts.completion_ids[rows, :last],
                   c_mask[:, :last])
        batches.append((rows, tuple(t.to(device) for t in tensors)))
    return batches


def policy_update(
    model: PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    rollouts: Rollouts,
    advantages: torch.Tensor,
    old_logps: list[torch.Tensor] | None,
    config: FolmTrainConfig,
) -> tuple[dict[str, float], list[torch.Tensor]]:
    """One AdamW step on the soft-PPO loss over all rollouts (gradient accumulated over micro-batches).

    `old_logps=None` means the model still is π_old: its own detached log-probs are used (ρ = 1) and
    returned for the next iterations."""
    device = next(model.parameters()).device
    n_rows = len(rollouts.texts)
    n_tokens = float(rollouts.completion_mask.sum())
    sums = dict.fromkeys(("loss", "kl_forward", "kl_reverse", "clip_fraction"), 0.0)
    recorded: list[torch.Tensor] = []
    model.train()
    batches = _micro_batches(rollouts, config.micro_batch_size, device)
    for i, (rows, (p_ids, p_mask, c_ids, c_mask)) in enumerate(batches):
        logps = completion_logps(model, p_ids, p_mask, c_ids, c_mask, config.temperature)
        old = logps.detach() if old_logps is None else old_logps[i]
        recorded.append(old)
        terms = soft_ppo_token_loss(logps, old, advantages[rows].to(device).unsqueeze(1), config.epsilon,
                                    config.beta_forward, config.beta_reverse)
        mask = c_mask.float()
        per_completion = (terms["loss"] * mask).sum(1) / mask.sum(1).clamp(min=1)
        (per_completion.sum() / n_rows).backward()
        sums["loss"] += per_completion.sum().item() / n_rows
        for name in ("kl_forward", "kl_reverse", "clip_fraction"):
            sums[name] += (terms[name].detach() * mask).sum().item() / n_tokens
    grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                               config.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {**sums, "grad_norm": float(grad_norm)}, recorded


def _query_rows(train_queries: list[dict[str, Any]], step: int, count: int, seed: int) -> list[dict[str, Any]]:
    """Queries for `step` (1-based): successive slices of one seeded permutation per epoch, so reruns match."""
    n = len(train_queries)
    positions = range((step - 1) * count, step * count)
    return [train_queries[int(np.random.default_rng([seed, p // n]).permutation(n)[p % n])] for p in positions]


def _score(reward_fn: RewardFn, rows: list[dict[str, Any]], rollouts: Rollouts) -> list[dict[str, float]]:
    queries = [rows[i]["query"] for i in rollouts.query_index]
    columns = {key: [rows[i][key] for i in rollouts.query_index] for key in rows[0] if key != "query"}
    scores = reward_fn(queries, rollouts.texts, **columns)
    if len(scores) != len(rollouts.texts) or any("total" not in s for s in scores):
        raise ValueError(f"reward_fn must return one dict with a 'total' key per completion "
                         f"({len(rollouts.texts)} completions, got {len(scores)} results)")
    return scores


def _validate_queries(train_queries: list[dict[str, Any]]) -> None:
    if not train_queries:
        raise ValueError("train_queries is empty")
    keys = set(train_queries[0])
    for i, row in enumerate(train_queries):
        if not isinstance(row.get("query"), str) or not row["query"].strip():
            raise ValueError(f"train_queries[{i}]: 'query' must be a non-empty string")
        if set(row) != keys:
            raise ValueError(f"train_queries[{i}]: columns {sorted(row)} differ from row 0's {sorted(keys)}")


def _run_identity(spec: str, config: FolmTrainConfig, train_queries: list[dict[str, Any]], run_key: str) -> dict:
    """What a finished or interrupted run must match to be reused: base model (a local folder by its files'
    names, sizes and mtimes, so a rebuilt base counts as new), config, training rows, and `run_key`."""
    base = Path(spec)
    files = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(base.iterdir()) if f.is_file()] \
        if base.is_dir() else []
    rows = json.dumps(train_queries, sort_keys=True, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    return {"base_model": spec, "base_files": stable_hash(files), "config": config.model_dump(exclude={"save_every"}),
            "train_queries": stable_hash(rows), "run_key": run_key}


def _state_dir(out_dir: Path) -> Path:
    return out_dir.with_name(f"{out_dir.name}.resume")


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _load_policy(
    spec: str, config: FolmTrainConfig, state: Path | None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if state is None or not config.lora_rank:
        return load_causal_lm(str(state / "policy") if state else spec, lora_rank=config.lora_rank or None,
                              lora_alpha=config.lora_alpha)
    from peft import PeftModel

    base, tokenizer = load_causal_lm(spec)
    return PeftModel.from_pretrained(base, state / "policy", is_trainable=True), tokenizer


def _save_state(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, optimizer: torch.optim.Optimizer,
                meta: dict[str, Any], folder: Path) -> None:
    """Resumable checkpoint: policy (LoRA: the adapter only), tokenizer, optimizer, history."""
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp / "policy")
        tokenizer.save_pretrained(tmp / "policy")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(meta, indent=2))


def _peak_memory() -> tuple[float, float | None]:
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    gpu_mb = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return rss_mb, gpu_mb


def train_folm(
    model_dir_or_spec: str | Path,
    train_queries: list[dict[str, Any]],
    reward_fn: RewardFn,
    config: FolmTrainConfig,
    out_dir: Path,
    resume: bool = True,
    log_fn: LogFn | None = None,
    run_key: str = "",
) -> FolmTrainResult:
    """Train a FOLM with GRPO + soft-PPO and write it to `out_dir` (HF folder + r4t_folm.json), atomically.

    `train_queries`: rows with "query" plus extra columns passed to `reward_fn` by name (e.g.
    "reference_ids"). `reward_fn(queries, completions, **columns)` returns one dict per completion with
    "total" (optimised) and any named terms (logged as reward/<name>). With `resume`, a finished `out_dir`
    of the same run is returned as is, and an interrupted run continues from its last checkpoint; "same"
    means same base model files, config, training rows and `run_key`, which should identify what the
    callable `reward_fn` cannot: e.g. a hash of the reward's config and index."""
    spec, out_dir = str(model_dir_or_spec), Path(out_dir)
    _validate_queries(train_queries)
    meta = _run_identity(spec, config, train_queries, run_key)
    done = _read_json(out_dir / META_FILE)
    if resume and done and {k: done.get(k) for k in meta} == meta and done.get("steps_done") == config.steps:
        return FolmTrainResult(checkpoint_dir=out_dir, steps=config.steps, resumed_from_step=config.steps,
                               **{k: done[k] for k in ("seconds_per_step", "peak_rss_mb", "peak_gpu_mb", "history")})
    state_dir = _state_dir(out_dir)
    state = _read_json(state_dir / "state.json") if resume else None
    if state is not None and {k: state.get(k) for k in meta} != meta:
        log.warning("ignoring checkpoint %s: it was made by another run (base, config, data or run_key)", state_dir)
        state = None
    model, tokenizer = _load_policy(spec, config, state_dir if state else None)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate,
                                  weight_decay=config.weight_decay)
    history: list[dict[str, float]] = state["history"] if state else []
    if state:
        optimizer.load_state_dict(torch.load(state_dir / "optimizer.pt", weights_only=True))
    start = len(history)
    step_seconds: list[float] = []
    for step in tqdm(range(start + 1, config.steps + 1), initial=start, total=config.steps, desc="grpo", disable=None):
        began = time.perf_counter()
        rows = _query_rows(train_queries, step, config.per_step_queries, config.seed)
        rollouts = sample_rollouts(model, tokenizer, [r["query"] for r in rows], config.k, config.group_size,
                                   config.temperature, config.max_new_tokens, config.generation_batch_size,
                                   seed=config.seed * 1_000_003 + step)
        generated = time.perf_counter()
        scores = _score(reward_fn, rows, rollouts)
        advantages = group_advantages(torch.tensor([s["total"] for s in scores], dtype=torch.float32),
                                      config.group_size)
        old_logps, updates = None, []
        for _ in range(config.num_iterations):
            metrics, old_logps = policy_update(model, optimizer, rollouts, advantages, old_logps, config)
            updates.append(metrics)
        step_seconds.append(time.perf_counter() - began)
        row = {f"reward/{name}": float(np.mean([s[name] for s in scores])) for name in scores[0]}
        row |= {name: float(np.mean([u[name] for u in updates])) for name in updates[0]}
        row |= {"completion_tokens": float(rollouts.completion_mask.sum(1).float().mean()),
                "seconds": step_seconds[-1], "seconds_generate": generated - began}
        history.append(row)
        if log_fn:
            log_fn(step, row)
        if step % config.save_every == 0 and step < config.steps:
            _save_state(model, tokenizer, optimizer, {**meta, "history": history}, state_dir)
    rss_mb, gpu_mb = _peak_memory()
    result = FolmTrainResult(checkpoint_dir=out_dir, steps=config.steps, resumed_from_step=start,
                             seconds_per_step=float(np.mean(step_seconds)) if step_seconds else 0.0,
                             peak_rss_mb=rss_mb, peak_gpu_mb=gpu_mb, history=history)
    final = model.merge_and_unload() if config.lora_rank else model
    with atomic_dir(out_dir) as tmp:
        final.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / META_FILE, {**meta, "steps_done": config.steps,
                                     **result.model_dump(include={"seconds_per_step", "peak_rss_mb", "peak_gpu_mb",
                                                                   "history"})})
    shutil.rmtree(state_dir, ignore_errors=True)
    return result
