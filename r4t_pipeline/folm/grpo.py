"""GRPO with the soft-PPO per-token loss (SPEC §3), on TRL's `GRPOTrainer`.

One GRPO step samples a group of `group_size` completions for each of `per_step_queries` queries from the
current policy (π_old), scores them, forms group-relative advantages A_i = (R_i - mean(R)) / (std(R) + ε),
then takes `num_iterations` optimizer steps on all of them with the per-token loss, ρ = π_θ(token) / π_old(token):
    L = -min(ρA, clip(ρ, 1-ε, 1+ε)A) + β_f (ρ - 1 - log ρ) + β_r (ρ log ρ - ρ + 1),
averaged over each completion's tokens, then over completions (TRL's `loss_type="grpo"`). The first iteration
runs at π_θ = π_old, so ρ = 1 there. TRL does the sampling, the reward contract, the advantages, accelerate
(several processes), LoRA through peft and checkpoints; `SoftPPOTrainer._compute_loss` is the one method
that differs. On a GPU, `use_vllm: true` in the train config makes TRL generate with vLLM (colocated).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME

from r4t_pipeline.config import FolmTrainConfig
from r4t_pipeline.device import resolve_device
from r4t_pipeline.fanout import build_messages, build_prompt_text
from r4t_pipeline.folm.callbacks import LogCallback
from r4t_pipeline.folm.models import add_lora, load_causal_lm
from r4t_pipeline.io import atomic_dir, stable_hash, write_json
from r4t_pipeline.tracking import LogFn

log = logging.getLogger(__name__)

RewardFn = Callable[..., list[dict[str, float]]]
META_FILE = "r4t_folm.json"
RUN_FILE = "r4t_run.json"  # the run identity a checkpoint folder belongs to


class FolmTrainResult(BaseModel):
    checkpoint_dir: Path
    steps: int
    resumed_from_step: int = Field(description="GRPO steps already done when this call started")
    seconds_per_step: float = Field(description="mean wall time of the steps this call ran")
    peak_rss_mb: float = Field(description="the process's peak RSS, reward model and all")
    peak_gpu_mb: float | None
    history: list[dict[str, float]] = Field(description="one row per GRPO step: reward/<term> means, loss, KL terms")


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


def _trl():
    """TRL imported on first use: it pulls in datasets and the trainer stack (seconds), which most callers skip."""
    from trl import GRPOConfig, GRPOTrainer

    class SoftPPOTrainer(GRPOTrainer):
        """TRL's GRPO with the soft-PPO per-token loss in place of its own (no reference model: β = 0 there)."""

        def __init__(self, *args, beta_forward: float, beta_reverse: float, **kwargs):
            super().__init__(*args, **kwargs)
            self.beta_forward, self.beta_reverse = beta_forward, beta_reverse

        def _compute_loss(self, model, inputs):
            prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
            mask = inputs["completion_mask"]
            logps, _, _ = self._get_per_token_logps_and_entropies(
                model, torch.cat([prompt_ids, completion_ids], 1), torch.cat([inputs["prompt_mask"], mask], 1),
                completion_ids.size(1))
            old = inputs.get("old_per_token_logps")  # None when nothing changed the policy since sampling
            terms = soft_ppo_token_loss(logps, logps.detach() if old is None else old,
                                        inputs["advantages"].unsqueeze(1), self.epsilon_low, self.beta_forward,
                                        self.beta_reverse)
            per_completion = (terms["loss"] * mask).sum(1) / mask.sum(1).clamp(min=1)
            for name in ("kl_forward", "kl_reverse", "clip_fraction"):
                totals = self.accelerator.reduce(torch.stack([(terms[name].detach() * mask).sum(),
                                                              mask.sum().float()]), reduction="sum")
                self._metrics["train"][name].append((totals[0] / totals[1].clamp(min=1)).item())
            return per_completion.mean() / self.current_gradient_accumulation_steps

    return GRPOConfig, SoftPPOTrainer


def reward_functions(reward_fn: RewardFn, terms: list[str], columns: list[str]) -> list[Callable[..., list[float]]]:
    """TRL reward functions from one scorer that returns every term at once: `total` (optimised) and each
    term (weight 0 in `reward_weights`, so TRL logs it as rewards/<term>/mean). The scorer runs once per batch and
    gets the training rows' own `columns` (TRL passes more: its state, logging hooks)."""
    cache: dict[str, Any] = {}

    def scores(completions: list, query: list[str], **passed) -> list[dict[str, float]]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        key = (tuple(query), tuple(texts))
        if cache.get("key") != key:
            cache.update(key=key, scores=reward_fn(query, texts, **{name: passed[name] for name in columns}))
            if len(cache["scores"]) != len(texts) or any("total" not in s for s in cache["scores"]):
                raise ValueError(f"reward_fn must return one dict with a 'total' key per completion "
                                 f"({len(texts)} completions, got {len(cache['scores'])} results)")
        return cache["scores"]

    def term(name: str) -> Callable[..., list[float]]:
        def reward(prompts, completions, **columns) -> list[float]:
            return [float(s[name]) for s in scores(completions, **columns)]

        reward.__name__ = name
        return reward

    return [term(name) for name in ["total", *terms]]


def _history_row(logs: dict[str, float], terms: list[str], num_iterations: int) -> dict[str, float]:
    """One GRPO step's TRL log (`logging_steps = num_iterations`) in the names the rest of the project reads."""
    # TRL logs None for a term undefined on every completion of the step (query specificity with one query parsed)
    row = {f"reward/{name}": logs[f"rewards/{name}/mean"] for name in ["total", *terms]
           if logs[f"rewards/{name}/mean"] is not None}
    row |= {name: logs[name] for name in ("loss", "grad_norm", "kl_forward", "kl_reverse", "clip_fraction")}
    return row | {"completion_tokens": logs["completions/mean_length"],
                  "seconds": logs["step_time"] * num_iterations}


def _validate_queries(train_queries: list[dict[str, Any]]) -> None:
    if not train_queries:
        raise ValueError("train_queries is empty")
    keys = set(train_queries[0])
    for i, row in enumerate(train_queries):
        if not isinstance(row.get("query"), str) or not row["query"].strip():
            raise ValueError(f"train_queries[{i}]: 'query' must be a non-empty string")
        if set(row) != keys:
            raise ValueError(f"train_queries[{i}]: columns {sorted(row)} differ from row 0's {sorted(keys)}")
        if "prompt" in row:
            raise ValueError(f"train_queries[{i}]: 'prompt' is reserved (the trainer builds it from 'query')")


def _run_identity(spec: str, config: FolmTrainConfig, train_queries: list[dict[str, Any]], run_key: str) -> dict:
    """What a finished or interrupted run must match to be reused: base model (a local folder by its files'
    names, sizes and mtimes, so a rebuilt base counts as new), config, training rows, and `run_key`."""
    base = Path(spec)
    files = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(base.iterdir()) if f.is_file()] \
        if base.is_dir() else []
    rows = json.dumps(train_queries, sort_keys=True, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    return {"base_model": spec, "base_files": stable_hash(files), "config": config.model_dump(exclude={"save_every"}),
            "train_queries": stable_hash(rows), "run_key": run_key}


def _last_complete_checkpoint(state_dir: Path) -> str | None:
    """The newest `checkpoint-<step>` the Trainer finished writing: it writes trainer_state.json last, so a folder
    without one was cut off mid-save."""
    complete = [p for p in state_dir.glob("checkpoint-*") if (p / TRAINER_STATE_NAME).is_file()]
    return str(max(complete, key=lambda p: int(p.name.rsplit("-", 1)[1]))) if complete else None


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _peak_memory() -> tuple[float, float | None]:
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    gpu_mb = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return rss_mb, gpu_mb


def _micro_batch(config: FolmTrainConfig, processes: int) -> tuple[int, int]:
    """(completions per forward/backward, micro-batches per optimizer step) so that one optimizer step covers
    all `per_step_queries x group_size` completions of a GRPO step, split evenly across processes."""
    total = config.per_step_queries * config.group_size
    if total % processes:
        raise ValueError(f"per_step_queries x group_size = {total} completions do not split across {processes} "
                         "processes")
    share = total // processes
    size = max(d for d in range(1, min(config.micro_batch_size, share) + 1) if share % d == 0)
    return size, share // size


def build_trainer(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train_queries: list[dict[str, Any]],
    reward_fn: RewardFn,
    config: FolmTrainConfig,
    output_dir: Path,
    callbacks: list[TrainerCallback] = (),
    **overrides,
):
    """(The soft-PPO GRPO trainer for `model`, wrapped in LoRA when configured, and the reward's term names).
    One optimizer step covers a GRPO step's completions; `overrides` go to GRPOConfig (e.g. `logging_steps`)."""
    from datasets import Dataset

    GRPOConfig, SoftPPOTrainer = _trl()
    columns = [name for name in train_queries[0] if name != "query"]
    probe = reward_fn([train_queries[0]["query"]], [""], **{name: [train_queries[0][name]] for name in columns})
    terms = [name for name in probe[0] if name != "total"]  # one probe call names the reward's terms
    prompt = (lambda q: build_messages(q, config.k)) if tokenizer.chat_template else \
        (lambda q: build_prompt_text(q, config.k))
    dataset = Dataset.from_list([{"prompt": prompt(row["query"]), **row} for row in train_queries])
    # torchrun's WORLD_SIZE (under `accelerate launch`): the Trainer's own view exists only once its args do
    micro, accumulation = _micro_batch(config, int(os.environ.get("WORLD_SIZE", "1")))
    args = GRPOConfig(**{
        "output_dir": str(output_dir), "max_steps": config.steps * config.num_iterations, "seed": config.seed,
        "per_device_train_batch_size": micro, "gradient_accumulation_steps": accumulation,
        "steps_per_generation": accumulation, "num_generations": config.group_size,
        "num_iterations": config.num_iterations, "learning_rate": config.learning_rate,
        "lr_scheduler_type": "constant", "weight_decay": config.weight_decay, "max_grad_norm": config.max_grad_norm,
        "epsilon": config.epsilon, "beta": 0.0, "loss_type": "grpo", "scale_rewards": "group",
        "temperature": config.temperature, "top_p": 1.0, "top_k": 0, "max_completion_length": config.max_new_tokens,
        "mask_truncated_completions": False, "reward_weights": [1.0] + [0.0] * len(terms),
        "logging_steps": config.num_iterations, "save_strategy": "steps",
        "save_steps": config.save_every * config.num_iterations, "save_total_limit": 1,
        "use_cpu": resolve_device().type == "cpu", "bf16": False, "fp16": False, "gradient_checkpointing": False,
        "report_to": "none", "remove_unused_columns": False, "log_completions": False, "disable_dropout": True,
        "use_vllm": config.use_vllm, "vllm_mode": "colocate", **overrides})
    if config.lora_rank and not hasattr(model, "peft_config"):
        model = add_lora(model, config.lora_rank, config.lora_alpha or 2 * config.lora_rank)
    return SoftPPOTrainer(model=model, processing_class=tokenizer,
                          reward_funcs=reward_functions(reward_fn, terms, columns), args=args, train_dataset=dataset,
                          callbacks=list(callbacks), beta_forward=config.beta_forward,
                          beta_reverse=config.beta_reverse), terms


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
    callable `reward_fn` cannot: e.g. a hash of the reward's config and index. Under `accelerate launch`
    every process trains its share of each step's completions and the main process alone writes."""
    spec, out_dir = str(model_dir_or_spec), Path(out_dir)
    _validate_queries(train_queries)
    meta = _run_identity(spec, config, train_queries, run_key)
    done = _read_json(out_dir / META_FILE)
    if resume and done and {k: done.get(k) for k in meta} == meta and done.get("steps_done") == config.steps:
        return FolmTrainResult(checkpoint_dir=out_dir, steps=config.steps, resumed_from_step=config.steps,
                               **{k: done[k] for k in ("seconds_per_step", "peak_rss_mb", "peak_gpu_mb", "history")})
    state_dir = out_dir.with_name(f"{out_dir.name}.resume")
    checkpoint = _last_complete_checkpoint(state_dir) if resume else None
    if checkpoint and _read_json(state_dir / RUN_FILE) != meta:
        log.warning("ignoring checkpoint %s: it was made by another run (base, config, data or run_key)", checkpoint)
        checkpoint = None
    model, tokenizer = load_causal_lm(spec)
    step_log = LogCallback(log_fn, lambda logs: _history_row(logs, terms, config.num_iterations), config.num_iterations)
    trainer, terms = build_trainer(model, tokenizer, train_queries, reward_fn, config, state_dir, [step_log])
    if trainer.accelerator.is_main_process and not checkpoint:
        shutil.rmtree(state_dir, ignore_errors=True)
        write_json(state_dir / RUN_FILE, meta)
    trainer.accelerator.wait_for_everyone()
    trainer.train(resume_from_checkpoint=checkpoint)
    history = [_history_row(logs, terms, config.num_iterations) for logs in trainer.state.log_history
               if "loss" in logs]
    rss_mb, gpu_mb = _peak_memory()
    result = FolmTrainResult(
        checkpoint_dir=out_dir, steps=config.steps,
        resumed_from_step=int(checkpoint.rsplit("-", 1)[1]) // config.num_iterations if checkpoint else 0,
        seconds_per_step=sum(r["seconds"] for r in step_log.rows) / len(step_log.rows) if step_log.rows else 0.0,
        peak_rss_mb=rss_mb, peak_gpu_mb=gpu_mb, history=history)
    if trainer.accelerator.is_main_process:
        policy = trainer.accelerator.unwrap_model(trainer.model)
        final = policy.merge_and_unload() if config.lora_rank else policy
        with atomic_dir(out_dir) as tmp:
            final.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            write_json(tmp / META_FILE, {**meta, "steps_done": config.steps,
                                         **result.model_dump(include={"seconds_per_step", "peak_rss_mb",
                                                                       "peak_gpu_mb", "history"})})
        shutil.rmtree(state_dir, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    return result
