"""Stage 4, HPPO (hybrid-policy preference optimisation): a hybrid candidate pool per training seed set, labelled
by the online Joint@K / Purity@K of real top-K retrieval, winner/loser pairs kept by a Pareto filter, and
reference-anchored preference optimisation of the diffusion model (Diffusion-DPO, Wallace et al. 2023, for EDM).

The preference loss. For a pair (condition c, winner x_w, loser x_l) draw one noise level sigma and one noise n,
shared by both, and write the EDM-weighted denoising error of a model M as
    e_M(x) = lambda(sigma) * mean ||D_M(x + sigma n; sigma, c) - x||^2          (= `edm_loss`, per sample)
The margin compares the policy theta with the frozen reference (the stage-3 model):
    margin = [e_theta(x_w) - e_ref(x_w)] - [e_theta(x_l) - e_ref(x_l)]
    loss   = -log sigmoid(-beta * margin) = softplus(beta * margin)
A lower denoising error is a higher ELBO, i.e. a higher likelihood, so -beta * margin is the implicit reward gap
of the winner over the loser (Wallace et al.'s T * omega(lambda_t) / 2 are folded into beta; our error is a mean
over the row's dimensions, not a sum). Properties, tested: at theta = ref the margin is 0 and the loss log 2, but
its gradient beta/2 * grad(e_theta(x_w) - e_theta(x_l)) is not 0 in general; it is exactly 0 when the winner
equals the loser (the margin is then 0 for every theta); a gradient step lowers the margin (raises the winner's
likelihood relative to the loser's).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm

from r4t_pipeline.config import NoiseSchedule
from r4t_pipeline.device import resolve_device
from r4t_pipeline.diffusion.edm import EDMPrecond, edm_loss, sample_sigmas
from r4t_pipeline.diffusion.train import CHECKPOINT_FORMAT, DiffusionRetrieverModel, warmup_cosine
from r4t_pipeline.io import atomic_dir, atomic_file, stable_hash
from r4t_pipeline.modit.config import HPPOConfig, SamplingConfig, SequenceConfig
from r4t_pipeline.modit.data import encode_targets, seed_conditions, task_token
from r4t_pipeline.modit.methods import Generator, interpolate, seed_centroids
from r4t_pipeline.modit.retrieval import ItemSearcher, expansion_metrics
from r4t_pipeline.modit.tasks import SeedSets, TaskData
from r4t_pipeline.tracking import LogFn


@dataclass
class CandidatePool:
    queries: np.ndarray  # (m, C, d)
    kinds: list[str]     # C names: seed_centroid, tail_centroid, interp_<lambda>, policy_<n>
    joint: np.ndarray    # (m, C) online Joint@k
    purity: np.ndarray   # (m, C) online Purity@k


def candidate_queries(seeds: SeedSets, data: TaskData, protocol: str, vectors: np.ndarray,
                      policy: DiffusionRetrieverModel | None, cfg: HPPOConfig, sampling: SamplingConfig,
                      sequences: SequenceConfig) -> tuple[np.ndarray, list[str]]:
    """(m, C, d) unit query candidates: the deterministic constructions, then `policy_samples` samples of the
    policy (the stage-3 model)."""
    centroid = seed_centroids(vectors, seeds)
    columns = [centroid[:, None], data.tails[protocol][seeds.pattern][:, None]]
    kinds = ["seed_centroid", "tail_centroid"]
    for lam in cfg.lambdas:
        columns.append(interpolate(centroid, data.directions[protocol], lam)[:, None])
        kinds.append(f"interp_{lam:g}")
    if policy is not None and cfg.policy_samples:
        generator = Generator("policy", None, policy, task_token(data.name), vectors, data.scores[protocol],
                              sampling, sequences)
        columns.append(generator.queries(seeds, seed=cfg.seed * 1000, count=cfg.policy_samples))
        kinds += [f"policy_{n}" for n in range(cfg.policy_samples)]
    return np.concatenate(columns, axis=1).astype(np.float32), kinds


def label_candidates(queries: np.ndarray, seeds: SeedSets, data: TaskData, protocol: str, searcher: ItemSearcher,
                     k: int) -> tuple[np.ndarray, np.ndarray]:
    """Online Joint@k and Purity@k of every candidate: its own top-k over the searcher's items (the training
    items), seeds excluded, scored with training labels only."""
    m, c, _ = queries.shape
    repeated = SeedSets(np.repeat(seeds.positions, c, axis=0), np.repeat(seeds.pattern, c))
    retrieved = searcher.search(queries.reshape(m * c, 1, -1), repeated.positions, k)
    visible = data.positive & data.train_items(protocol)
    metrics = expansion_metrics(retrieved, repeated.pattern, data.patterns, visible, [k])
    return metrics[f"joint@{k}"].reshape(m, c), metrics[f"purity@{k}"].reshape(m, c)


def preference_pairs(joint: np.ndarray, purity: np.ndarray, min_gap: float, per_row: int, pareto: bool,
                     rng: np.random.Generator) -> np.ndarray:
    """(n, 3) rows of (seed set, winner column, loser column): the winner's Joint beats the loser's by at least
    min_gap and, with the Pareto filter, its Purity is not lower. Up to per_row pairs per seed set, drawn
    uniformly from those that qualify."""
    pairs = []
    for row in range(len(joint)):
        better = joint[row][:, None] - joint[row][None, :] >= min_gap - 1e-9
        if pareto:
            better &= purity[row][:, None] >= purity[row][None, :]
        winners, losers = np.nonzero(better)
        if len(winners) > per_row:
            keep = rng.choice(len(winners), per_row, replace=False)
            winners, losers = winners[keep], losers[keep]
        pairs.extend((row, w, loser) for w, loser in zip(winners.tolist(), losers.tolist()))
    return np.array(pairs, np.int64).reshape(-1, 3)


@dataclass
class PreferenceData:
    conditions: np.ndarray  # (n, 1 + max_items, d)
    mask: np.ndarray        # (n, 1 + max_items)
    winners: np.ndarray     # (n, 1, d) in the model's target space (`data.encode_targets`)
    losers: np.ndarray      # (n, 1, d)
    task: np.ndarray        # (n,) task name

    def __len__(self) -> int:
        return len(self.winners)

    @classmethod
    def concat(cls, parts: list[PreferenceData]) -> PreferenceData:
        parts = [p for p in parts if len(p)]
        if not parts:
            raise ValueError("HPPO found no preference pair: every candidate pool was tied or Pareto-filtered")
        return cls(*(np.concatenate([getattr(p, f) for p in parts])
                     for f in ("conditions", "mask", "winners", "losers", "task")))


def task_preferences(data: TaskData, protocol: str, vectors: np.ndarray, policy: DiffusionRetrieverModel | None,
                     searcher: ItemSearcher, cfg: HPPOConfig, sampling: SamplingConfig,
                     sequences: SequenceConfig) -> tuple[PreferenceData, dict[str, Any]]:
    """One task's pool, labels and pairs, plus statistics: mean online Joint/Purity per candidate kind, pairs
    before and after the Pareto filter, and how often each kind wins."""
    seeds = data.seed_sets[protocol]["train"]
    seeds = seeds.subset(np.flatnonzero(data.has_tail[protocol][seeds.pattern]))
    seeds = seeds.sample(cfg.max_seed_sets_per_task, cfg.seed)
    queries, kinds = candidate_queries(seeds, data, protocol, vectors, policy, cfg, sampling, sequences)
    joint, purity = label_candidates(queries, seeds, data, protocol, searcher, cfg.k)
    rng = np.random.default_rng([cfg.seed, 7])
    pairs = preference_pairs(joint, purity, cfg.min_joint_gap, cfg.pairs_per_seed_set, cfg.pareto_filter, rng)
    unfiltered = preference_pairs(joint, purity, cfg.min_joint_gap, 10**6, False, rng)
    conditions, mask = seed_conditions(seeds, task_token(data.name), vectors, data.scores[protocol],
                                       sequences.max_items)
    rows, win, lose = pairs.T
    centroid = seed_centroids(vectors, seeds)[rows]
    prefs = PreferenceData(conditions[rows], mask[rows], encode_targets(queries[rows, win], centroid, sequences.target),
                           encode_targets(queries[rows, lose], centroid, sequences.target),
                           np.full(len(pairs), data.name))
    stats = {"seed_sets": len(seeds), "candidates": kinds,
             "joint_by_kind": dict(zip(kinds, joint.mean(axis=0).round(4).tolist())),
             "purity_by_kind": dict(zip(kinds, purity.mean(axis=0).round(4).tolist())),
             "qualifying_pairs_without_pareto": len(unfiltered),
             "qualifying_pairs_dropped_by_pareto": int(np.sum(purity[unfiltered[:, 0], unfiltered[:, 1]]
                                                              < purity[unfiltered[:, 0], unfiltered[:, 2]])),
             "pairs": len(pairs),
             "winner_kinds": dict(zip(*np.unique(np.array(kinds)[win], return_counts=True))) if len(pairs) else {}}
    stats["winner_kinds"] = {str(k): int(v) for k, v in stats["winner_kinds"].items()}
    return prefs, stats


def dpo_loss(policy: EDMPrecond, reference: EDMPrecond, winners: torch.Tensor, losers: torch.Tensor,
             sigma: torch.Tensor, noise: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor | None,
             beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean softplus(beta * margin) and the per-pair margin (see the module docstring); winners and losers share
    sigma and noise. One policy forward over the 2B rows, one reference forward without gradients."""
    x = torch.cat([winners, losers])
    sigma2, noise2, cond2 = torch.cat([sigma, sigma]), torch.cat([noise, noise]), torch.cat([cond, cond])
    mask2 = None if mask is None else torch.cat([mask, mask])
    e_policy = edm_loss(policy, x, sigma2, noise2, cond2, mask2)
    with torch.no_grad():
        e_reference = edm_loss(reference, x, sigma2, noise2, cond2, mask2)
    gap = e_policy - e_reference
    margin = gap[: len(winners)] - gap[len(winners):]
    return F.softplus(beta * margin).mean(), margin


@dataclass
class HPPOResult:
    checkpoint_dir: Path
    steps: int
    steps_run: int
    seconds: float
    final_loss: float
    history: list[dict[str, float]]


def _fingerprint(prefs: PreferenceData, cfg: HPPOConfig, reference: Path) -> str:
    """What a run depends on: a saved state is resumed only by a run with the same pairs, settings and reference."""
    digest = hashlib.sha256()
    for name in ("conditions", "mask", "winners", "losers"):
        digest.update(np.ascontiguousarray(getattr(prefs, name)).tobytes())
    settings = cfg.model_dump(mode="json", exclude={"checkpoint_every", "log_every", "device"})
    return stable_hash([digest.hexdigest(), settings, str(reference)], length=16)


def train_hppo(prefs: PreferenceData, reference_dir: Path, cfg: HPPOConfig, out_dir: Path, *, resume: bool = True,
               log_fn: LogFn | None = None) -> HPPOResult:
    """Preference-optimise a copy of the stage-3 checkpoint at `reference_dir` against the frozen original.

    Writes a checkpoint in the R4T diffusion format (EMA weights; `DiffusionRetrieverModel.load` reads it).
    While training, the whole state is saved atomically every `checkpoint_every` steps to `<out_dir>.partial/`;
    a rerun with the same pairs and settings resumes from it (and returns at once if `out_dir` is finished).
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    work_dir = out_dir.with_name(out_dir.name + ".partial")
    device = resolve_device(cfg.device)
    if not resume:
        shutil.rmtree(work_dir, ignore_errors=True)
    fingerprint = _fingerprint(prefs, cfg, reference_dir)
    state = None
    for path in (work_dir / "training_state.pt", out_dir / "training_state.pt"):
        if resume and state is None and path.exists():
            saved = torch.load(path, map_location="cpu", weights_only=True)
            state = saved if saved.get("fingerprint") == fingerprint else None

    torch.manual_seed(cfg.seed)
    reference_model = DiffusionRetrieverModel.load(reference_dir, device)
    reference = reference_model.precond.requires_grad_(False).eval()
    noise_schedule: NoiseSchedule = reference_model.noise
    policy = copy.deepcopy(reference).requires_grad_(True).train()
    ema = copy.deepcopy(reference)
    params, ema_params = list(policy.parameters()), list(ema.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.warmup_steps, cfg.steps))
    generator = torch.Generator(device).manual_seed(cfg.seed)
    step, history = 0, []
    if state is not None:
        policy.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        step, history = state["step"], state["history"]

    def training_state() -> dict[str, Any]:
        return {"step": step, "model": policy.state_dict(), "ema": ema.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "generator": generator.get_state(), "torch_rng": torch.get_rng_state(), "history": history,
                "fingerprint": fingerprint, "train": cfg.model_dump(mode="json")}

    tensors = {f: torch.from_numpy(getattr(prefs, f)).to(device) for f in ("conditions", "mask", "winners", "losers")}
    first_step = step
    with tqdm(total=cfg.steps, initial=step, desc="hppo", disable=None) as bar:
        while step < cfg.steps:
            idx = torch.randint(len(prefs), (cfg.batch_size,), generator=generator, device=device)
            winners, losers = tensors["winners"][idx], tensors["losers"][idx]
            sigma = sample_sigmas(noise_schedule, cfg.batch_size, generator, device)
            noise = torch.randn(winners.shape, generator=generator, device=device)
            loss, margin = dpo_loss(policy, reference, winners, losers, sigma, noise, tensors["conditions"][idx],
                                    tensors["mask"][idx], cfg.beta)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=True)
            optimizer.step()
            scheduler.step()
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, params, 1 - decay)
            step += 1
            bar.update(1)
            metrics = {"loss": loss.item(), "reward_margin": -cfg.beta * margin.mean().item(),
                       "preference_accuracy": float((margin < 0).float().mean()), "lr": scheduler.get_last_lr()[0],
                       "grad_norm": float(grad_norm)}
            if step % cfg.log_every == 0 or step == cfg.steps:
                history.append({"step": step, **metrics})
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['preference_accuracy']:.2f}")
                if log_fn is not None:
                    log_fn(step, metrics)
            if step % cfg.checkpoint_every == 0 and step < cfg.steps:
                with atomic_file(work_dir / "training_state.pt") as tmp:
                    torch.save(training_state(), tmp)

    config = json.loads((Path(reference_dir) / "config.json").read_text())
    config.update({"format": CHECKPOINT_FORMAT, "steps": step, "hppo": cfg.model_dump(mode="json"),
                   "reference": str(reference_dir)})
    with atomic_dir(out_dir) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()}, tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        torch.save(training_state(), tmp / "training_state.pt")
    shutil.rmtree(work_dir, ignore_errors=True)
    final = history[-1]["loss"] if history else math.nan
    return HPPOResult(out_dir, step, step - first_step, time.perf_counter() - started, final, history)
