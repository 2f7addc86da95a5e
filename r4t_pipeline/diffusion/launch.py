"""One diffusion training run in several processes (data parallel, `train_diffusion` under accelerate):

    accelerate launch --multi_gpu --num_processes N -m r4t_pipeline.diffusion.launch RUN_DIR

`prepare` writes RUN_DIR: the arrays (inputs.npz) and what to train (run.json: denoiser, train config, checkpoint
folder, init_from); `command` is the launch line. The main process alone writes the checkpoint, logs to the MLflow
run named by $MLFLOW_RUN_ID and, when Dagster launched it through Pipes, reports the result as the
materialisation's metadata; a failing process fails the launch, and Pipes hands its error to the asset.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import numpy as np

from r4t_pipeline.config import DiffusionTrainConfig
from r4t_pipeline.diffusion.denoiser import DenoiserConfig
from r4t_pipeline.io import atomic_dir

INPUTS, RUN = "inputs.npz", "run.json"


def prepare(run_dir: Path, targets: np.ndarray, conditions: np.ndarray, denoiser: DenoiserConfig,
            train: DiffusionTrainConfig, out_dir: Path, condition_mask: np.ndarray | None = None,
            init_from: Path | None = None) -> Path:
    with atomic_dir(run_dir) as tmp:
        arrays = {"targets": targets, "conditions": conditions}
        np.savez(tmp / INPUTS, **arrays, **({} if condition_mask is None else {"condition_mask": condition_mask}))
        (tmp / RUN).write_text(json.dumps({"denoiser": denoiser.to_dict(), "train": train.model_dump(mode="json"),
                                           "out_dir": str(out_dir), "init_from": init_from and str(init_from)}))
    return Path(run_dir)


def command(run_dir: Path, processes: int) -> list[str]:
    """`accelerate launch` of this module in `processes` processes. Its torchrun launcher (`--multi_gpu`) starts
    them; each takes a GPU, or joins over gloo on the CPU (`train.device`), since `--cpu` alone starts one process
    unless an MPI hostfile is given."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            *(["--multi_gpu"] if processes > 1 else []), "-m", "r4t_pipeline.diffusion.launch", str(run_dir)]


def result_metadata(result) -> dict[str, float | int]:
    return {"final_loss": round(result.final_loss, 6), "sigma_data": round(result.sigma_data, 6),
            "steps": result.steps, "steps_run": result.steps_run, "seconds": round(result.seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    from r4t_pipeline.diffusion.train import train_diffusion
    from r4t_pipeline.tracking import MlflowRun

    (run_dir,) = [Path(a) for a in (argv if argv is not None else sys.argv[1:])]
    spec = json.loads((run_dir / RUN).read_text())
    arrays = np.load(run_dir / INPUTS)
    main_process = int(os.environ.get("RANK", "0")) == 0
    run = MlflowRun.from_env() if main_process else None
    pipes = contextlib.nullcontext()
    if main_process:
        from dagster_pipes import PipesEnvVarParamsLoader, open_dagster_pipes

        if PipesEnvVarParamsLoader().is_dagster_pipes_process():
            pipes = open_dagster_pipes()
    with pipes as session:
        result = train_diffusion(arrays["targets"], arrays["conditions"], DenoiserConfig(**spec["denoiser"]),
                                 DiffusionTrainConfig(**spec["train"]), Path(spec["out_dir"]),
                                 condition_mask=arrays["condition_mask"] if "condition_mask" in arrays else None,
                                 init_from=spec["init_from"] and Path(spec["init_from"]),
                                 log_fn=run.log if run else None)
        if session is not None:
            session.report_asset_materialization(metadata={**result_metadata(result),
                                                           "processes": int(os.environ.get("WORLD_SIZE", "1"))})
    return 0


if __name__ == "__main__":
    sys.exit(main())
