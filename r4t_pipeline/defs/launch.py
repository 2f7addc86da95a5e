"""Diffusion training stages in one process or several: in the asset's own process when `train.processes` is 1;
else `accelerate launch` under Dagster Pipes, whose main process logs to the asset's MLflow run and reports the
result back (see `r4t_pipeline.diffusion.launch`). A failed launch fails the asset with the processes' error."""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
import numpy as np

from r4t_pipeline.config import DiffusionTrainConfig
from r4t_pipeline.diffusion.denoiser import DenoiserConfig
from r4t_pipeline.tracking import MlflowRun


def train_diffusion_stage(context: dg.AssetExecutionContext, run: MlflowRun, targets: np.ndarray,
                          conditions: np.ndarray, denoiser: DenoiserConfig, train: DiffusionTrainConfig,
                          out_dir: Path) -> dict[str, float | int]:
    """Train into `out_dir` (resuming an interrupted run) and return the result as metadata: final_loss,
    sigma_data, steps, steps_run, seconds, processes."""
    from r4t_pipeline.diffusion import launch

    if train.processes == 1:
        from r4t_pipeline.diffusion.train import train_diffusion

        result = train_diffusion(targets, conditions, denoiser, train, out_dir, resume=True, log_fn=run.log)
        return {**launch.result_metadata(result), "processes": 1}
    run_dir = launch.prepare(out_dir.with_name(out_dir.name + ".launch"), targets, conditions, denoiser, train,
                             out_dir)
    context.log.info(f"accelerate launch: {train.processes} processes share each batch of {train.batch_size}")
    try:
        completed = dg.PipesSubprocessClient().run(command=launch.command(run_dir, train.processes),
                                                   context=context, env=run.env())
        reported = completed.get_materialize_result().metadata or {}
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return {name: getattr(value, "value", value) for name, value in reported.items()}
