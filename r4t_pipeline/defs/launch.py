"""Training stages in one process or several: in the asset's own process when the stage's `processes` is 1;
else `accelerate launch` under Dagster Pipes, whose main process logs to the asset's MLflow run and reports the
result back (see `r4t_pipeline.launch`). A failed launch fails the asset with the processes' error."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np

from r4t_pipeline import launch
from r4t_pipeline.config import DiffusionTrainConfig, FolmTrainConfig
from r4t_pipeline.diffusion.denoiser import DenoiserConfig
from r4t_pipeline.tracking import MlflowRun


def _run_launched(context: dg.AssetExecutionContext, run: MlflowRun, stage: str, run_dir: Path,
                  processes: int) -> dict[str, Any]:
    """Launch `stage` on `run_dir` through Pipes; the metadata its main process reported. `run_dir` is removed."""
    try:
        completed = dg.PipesSubprocessClient().run(command=launch.command(stage, run_dir, processes),
                                                   context=context, env=run.env())
        reported = completed.get_materialize_result().metadata or {}
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return {name: getattr(value, "value", value) for name, value in reported.items()}


def train_diffusion_stage(context: dg.AssetExecutionContext, run: MlflowRun, targets: np.ndarray,
                          conditions: np.ndarray, denoiser: DenoiserConfig, train: DiffusionTrainConfig,
                          out_dir: Path) -> dict[str, float | int]:
    """Train into `out_dir` (resuming an interrupted run) and return the result as metadata: final_loss,
    sigma_data, steps, steps_run, seconds, processes."""
    if train.processes == 1:
        from r4t_pipeline.diffusion.train import train_diffusion

        result = train_diffusion(targets, conditions, denoiser, train, out_dir, resume=True, log_fn=run.log)
        return {**launch.diffusion_metadata(result), "processes": 1}
    run_dir = launch.prepare_diffusion(out_dir.with_name(out_dir.name + ".launch"), targets, conditions, denoiser,
                                       train, out_dir)
    context.log.info(f"accelerate launch: {train.processes} processes share each batch of {train.batch_size}")
    return _run_launched(context, run, "diffusion", run_dir, train.processes)


def train_folm_stage(context: dg.AssetExecutionContext, run: MlflowRun, settings, regime: str, index_path: str,
                     base: str, rows: list[dict[str, Any]], config: FolmTrainConfig, out_dir: Path,
                     run_key: str) -> dict[str, float | int]:
    """GRPO-train the FOLM into `out_dir` (resuming an interrupted run) and return the result as metadata: steps,
    resumed_from_step, seconds_per_step, peak_rss_mb, the learning curve's first and last means, processes."""
    if config.processes == 1:
        from r4t_pipeline import stack
        from r4t_pipeline.folm.grpo import train_folm

        result = train_folm(base, rows, stack.fanout_scorer(settings, regime, index_path), config, out_dir,
                            resume=True, log_fn=run.log, run_key=run_key)
        return {**launch.folm_metadata(result), "processes": 1}
    run_dir = launch.prepare_folm(out_dir.with_name(out_dir.name + ".launch"), settings, regime, index_path, base,
                                  rows, config, out_dir, run_key)
    context.log.info(f"accelerate launch: {config.processes} processes share each step's "
                     f"{config.per_step_queries * config.group_size} completions")
    return _run_launched(context, run, "folm", run_dir, config.processes)
