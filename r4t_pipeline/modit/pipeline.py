"""The whole MO-DiT+HPPO branch in one call (tests, `scripts/modit_run.py`): task data, the four
stages per protocol, the evaluation, in the folder layout `ModitLayout` names. The Dagster assets call the same
runners one by one (`build_task_data`, `train_stage`, `run_modit_evaluation`)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from r4t_pipeline.catalog import Catalog
from r4t_pipeline.embeddings import CatalogEmbeddings
from r4t_pipeline.io import write_json
from r4t_pipeline.modit.config import STAGES, ModitConfig
from r4t_pipeline.modit.evaluate import run_modit_evaluation
from r4t_pipeline.modit.stages import train_stage
from r4t_pipeline.modit.tasks import TaskData, build_task_data
from r4t_pipeline.tracking import NamedLogFn


@dataclass(frozen=True)
class ModitLayout:
    """Where the MO-DiT runners' outputs live under one root folder."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))  # a str works too

    def task(self, name: str) -> Path:
        return self.root / "tasks" / name

    def stage(self, protocol: str, stage: str) -> Path:
        return self.root / protocol / stage

    @property
    def evaluation(self) -> Path:
        return self.root / "evaluation"

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    def checkpoints(self, protocols: list[str]) -> dict[str, dict[str, Path]]:
        """The finished stage checkpoints (those with a config.json) per protocol."""
        return {p: {s: self.stage(p, s) for s in STAGES if (self.stage(p, s) / "config.json").exists()}
                for p in protocols}

    def load_config(self) -> ModitConfig:
        if not self.config.exists():
            raise FileNotFoundError(f"no MO-DiT run at {self.root} (no config.json); run the MO-DiT branch first")
        return ModitConfig.model_validate_json(self.config.read_text())

    def load_task(self, name: str) -> TaskData:
        return TaskData.load(self.task(name))


def run_modit(catalogs: dict[str, Catalog], embeddings: dict[str, CatalogEmbeddings], cfg: ModitConfig,
              root: str | Path, *, resume: bool = True, log_fn: NamedLogFn | None = None,
              device: str = "auto") -> dict:
    """Everything, in order; returns (and writes to root/run.json) the stage times, task metadata, training
    summaries and the evaluation (without its PNG, which is in root/evaluation/frontier.png)."""
    layout = ModitLayout(Path(root))
    missing = sorted(set(cfg.domains) - set(catalogs) | set(cfg.domains) - set(embeddings))
    if missing:
        raise ValueError(f"MO-DiT tasks need the catalog and embeddings of {missing}")
    write_json(layout.config, cfg.model_dump(mode="json"))
    times: dict[str, float] = {}
    started = time.perf_counter()
    tasks = []
    for task in cfg.tasks:
        t0 = time.perf_counter()
        tasks.append(build_task_data(task, catalogs[task.domain], embeddings[task.domain], cfg,
                                     layout.task(task.name)))
        times[f"task_data/{task.name}"] = time.perf_counter() - t0
    stages = {}
    for protocol in cfg.protocols:
        previous = None
        for stage in STAGES:
            name = f"{protocol}/{stage}"
            result = train_stage(stage, protocol, tasks, embeddings, cfg, layout.stage(protocol, stage),
                                 catalogs=catalogs, init_from=previous, resume=resume,
                                 log_fn=None if log_fn is None else lambda s, m, n=name: log_fn(n, s, m))
            previous = result.checkpoint_dir
            times[name] = result.seconds
            stages[name] = {"examples": result.examples, "steps": result.steps, "steps_run": result.steps_run,
                            "final_loss": result.final_loss, "seconds": round(result.seconds, 2),
                            "history_first_last": [result.history[0], result.history[-1]] if result.history else [],
                            **result.metadata}
    t0 = time.perf_counter()
    evaluation = run_modit_evaluation(tasks, embeddings, layout.checkpoints(cfg.protocols), cfg, layout.evaluation,
                                      device)
    times["evaluation"] = time.perf_counter() - t0
    times["total"] = time.perf_counter() - started
    summary = {"times_seconds": {k: round(v, 2) for k, v in times.items()},
               "tasks": {t.name: {**t.meta, "threshold": t.threshold, "predictor_auc": t.predictor_auc}
                         for t in tasks},
               "stages": stages, "evaluation": {k: v for k, v in evaluation.items() if k != "frontier_png"}}
    write_json(layout.root / "run.json", summary)
    return summary
