"""The four MO-DiT+HPPO training stages as runner functions on loaded objects (what the Dagster assets call).

Stages 1-3 train the R4T EDM set-diffusion transformer (`train_diffusion`, one query row, condition = task
token + item sequence), each from the previous stage's weights; stage 4 (HPPO) preference-optimises the stage-3
model against itself frozen. One model per protocol, shared by every task and catalog.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from r4t_pipeline.catalog import Catalog
from r4t_pipeline.diffusion.denoiser import DenoiserConfig, parameter_count
from r4t_pipeline.diffusion.train import DiffusionRetrieverModel, train_diffusion
from r4t_pipeline.embeddings import CatalogEmbeddings
from r4t_pipeline.modit import data as stage_data
from r4t_pipeline.modit.config import STAGES, ModitConfig, Stage
from r4t_pipeline.modit.hppo import PreferenceData, task_preferences, train_hppo
from r4t_pipeline.modit.retrieval import ItemSearcher
from r4t_pipeline.modit.tasks import TaskData
from r4t_pipeline.tracking import LogFn


@dataclass
class StageResult:
    stage: str
    protocol: str
    checkpoint_dir: Path
    examples: int
    steps: int
    steps_run: int
    seconds: float
    final_loss: float
    history: list[dict[str, float]] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)  # JSON-able: example counts per task, pool statistics, ...


def denoiser_config(cfg: ModitConfig, dim: int) -> DenoiserConfig:
    """The preset sized for one query row of dimension d, with a position per condition token."""
    base = DenoiserConfig.preset(cfg.denoiser_preset, dim=dim, cond_dim=dim).to_dict()
    return DenoiserConfig(**{**base, "cond_positions": 1 + cfg.sequences.max_items, **cfg.denoiser_overrides})


def embedding_dim(embeddings: dict[str, CatalogEmbeddings]) -> int:
    dims = {domain: emb.dim for domain, emb in embeddings.items()}
    if len(set(dims.values())) != 1:
        raise ValueError(f"MO-DiT trains one model across catalogs, which needs one embedding space; dims: {dims}")
    return next(iter(dims.values()))


def stage_dataset(stage: Stage, protocol: str, tasks: list[TaskData], embeddings: dict[str, CatalogEmbeddings],
                  catalogs: dict[str, Catalog], cfg: ModitConfig) -> stage_data.StageDataset:
    if stage == "raw":
        return stage_data.raw_dataset(catalogs, embeddings, tasks, protocol, cfg.sequences)
    if stage == "ordered":
        return stage_data.ordered_dataset(tasks, embeddings, protocol, cfg.sequences)
    if stage == "tail":
        return stage_data.tail_dataset(tasks, embeddings, protocol, cfg.sequences)
    raise ValueError(f"stage {stage!r} has no supervised dataset; choose one of raw, ordered, tail")


def train_stage(stage: Stage, protocol: str, tasks: list[TaskData], embeddings: dict[str, CatalogEmbeddings],
                cfg: ModitConfig, out_dir: str | Path, *, catalogs: dict[str, Catalog] | None = None,
                init_from: str | Path | None = None, resume: bool = True,
                log_fn: LogFn | None = None) -> StageResult:
    """Train one stage for one protocol into `out_dir`.

    raw: needs `catalogs` (their curated sequences), starts from scratch. ordered, tail: start from `init_from`
    (the previous stage's checkpoint). hppo: `init_from` is the stage-3 checkpoint, both the policy's start and
    the frozen reference; the candidate pool is sampled from it and labelled by search over training items.
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose one of {list(STAGES)}")
    if stage == "raw" and catalogs is None:
        raise ValueError("stage raw reads the catalogs' curated sequences: pass catalogs=")
    if stage != "raw" and init_from is None:
        raise ValueError(f"stage {stage!r} continues the previous stage: pass init_from=<its checkpoint>")
    if protocol not in cfg.protocols:
        raise ValueError(f"unknown protocol {protocol!r}; configured: {cfg.protocols}")
    started = time.perf_counter()
    out_dir = Path(out_dir)
    if stage == "hppo":
        return _train_hppo_stage(protocol, tasks, embeddings, cfg, out_dir, Path(init_from), resume, log_fn, started)
    dataset = stage_dataset(stage, protocol, tasks, embeddings, catalogs or {}, cfg)
    denoiser = denoiser_config(cfg, embedding_dim(embeddings))
    result = train_diffusion(dataset.targets, dataset.conditions, denoiser, getattr(cfg, stage), out_dir,
                             condition_mask=dataset.mask, init_from=None if init_from is None else Path(init_from),
                             resume=resume, log_fn=log_fn)
    every = getattr(cfg, stage).log_every
    history = [{"step": s + 1, "loss": loss} for s, loss in enumerate(result.loss_history) if (s + 1) % every == 0]
    return StageResult(stage, protocol, result.checkpoint_dir, len(dataset), result.steps, result.steps_run,
                       time.perf_counter() - started, result.final_loss, history,
                       {"examples_by_source": dataset.counts(), "parameters": parameter_count(denoiser),
                        "sigma_data": result.sigma_data})


def hppo_preferences(protocol: str, tasks: list[TaskData], embeddings: dict[str, CatalogEmbeddings],
                     cfg: ModitConfig, policy: DiffusionRetrieverModel) -> tuple[PreferenceData, dict]:
    """The labelled hybrid pools and filtered pairs of every task (stage 4's dataset) and their statistics."""
    parts, stats = [], {}
    for task in tasks:
        vectors = embeddings[task.task.domain].items
        searcher = ItemSearcher(vectors, task.database & task.train_items(protocol))
        prefs, stats[task.name] = task_preferences(task, protocol, vectors, policy, searcher, cfg.hppo,
                                                   cfg.sampling, cfg.sequences)
        parts.append(prefs)
    return PreferenceData.concat(parts), stats


def _train_hppo_stage(protocol: str, tasks: list[TaskData], embeddings: dict[str, CatalogEmbeddings],
                      cfg: ModitConfig, out_dir: Path, reference: Path, resume: bool, log_fn: LogFn | None,
                      started: float) -> StageResult:
    policy = DiffusionRetrieverModel.load(reference, cfg.hppo.device)
    prefs, stats = hppo_preferences(protocol, tasks, embeddings, cfg, policy)
    pool_seconds = time.perf_counter() - started
    result = train_hppo(prefs, reference, cfg.hppo, out_dir, resume=resume, log_fn=log_fn)
    return StageResult("hppo", protocol, result.checkpoint_dir, len(prefs), result.steps, result.steps_run,
                       time.perf_counter() - started, result.final_loss, result.history,
                       {"pool": stats, "pool_seconds": round(pool_seconds, 2), "pairs": len(prefs)})
