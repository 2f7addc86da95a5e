"""A training stage in several processes: `accelerate launch` of this module on a run folder the asset prepared.

    accelerate launch --multi_gpu --num_processes N -m r4t_pipeline.launch {folm|diffusion} RUN_DIR

`prepare_folm` / `prepare_diffusion` write RUN_DIR (run.json, plus inputs.npz for the diffusion arrays); every
process trains from it: `train_folm` (TRL gives each process its share of every GRPO step's completions) or
`train_diffusion` (each process its share of every batch), gradients averaged by DDP. The main process alone
writes the output, logs to the MLflow run named by $MLFLOW_RUN_ID and, when Dagster launched it through Pipes,
reports the result as the materialisation's metadata; a failing process fails the launch, and Pipes hands its
error to the asset.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from r4t_pipeline.config import DiffusionTrainConfig, FolmTrainConfig
from r4t_pipeline.diffusion.denoiser import DenoiserConfig
from r4t_pipeline.io import atomic_dir
from r4t_pipeline.stats import defined_means
from r4t_pipeline.tracking import LogFn, MlflowRun

INPUTS, RUN = "inputs.npz", "run.json"


def command(stage: str, run_dir: Path, processes: int) -> list[str]:
    """`accelerate launch` of `stage` in `processes` processes. Its torchrun launcher (`--multi_gpu`) starts them;
    each takes a GPU, or joins over gloo on the CPU, since `--cpu` alone starts one process unless an MPI hostfile
    is given."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            *(["--multi_gpu"] if processes > 1 else []), "-m", __name__, stage, str(run_dir)]


# ---- FOLM (GRPO) ------------------------------------------------------------------------------------------------

def prepare_folm(run_dir: Path, settings, regime: str, index_path: str, base: str, rows: list[dict[str, Any]],
                 config: FolmTrainConfig, out_dir: Path, run_key: str) -> Path:
    """The settings travel whole: each process rebuilds the reward from them."""
    with atomic_dir(run_dir) as tmp:
        (tmp / RUN).write_text(json.dumps({
            "settings": settings.model_dump(mode="json"), "regime": regime, "index": index_path, "base": base,
            "rows": rows, "config": config.model_dump(mode="json"), "out_dir": str(out_dir), "run_key": run_key}))
    return Path(run_dir)


def folm_metadata(result, window: int = 5) -> dict[str, float | int]:
    """Steps, speed, memory and the learning curve in two numbers per quantity: its first and last `window`-step
    means (over the steps where it is defined: query specificity needs two queries in a step's batch)."""
    curve = dict(sorted((f"{k}_{tag}", round(mean, 4)) for tag, rows in
                        (("first", result.history[:window]), ("last", result.history[-window:]))
                        for k, mean in defined_means(rows).items()))
    return {"steps": result.steps, "resumed_from_step": result.resumed_from_step,
            "seconds_per_step": round(result.seconds_per_step, 3), "peak_rss_mb": round(result.peak_rss_mb), **curve}


def _train_folm(run_dir: Path, log_fn: LogFn | None):
    from r4t_pipeline import stack
    from r4t_pipeline.folm.grpo import train_folm
    from r4t_pipeline.settings import Settings

    spec = json.loads((run_dir / RUN).read_text())
    scorer = stack.fanout_scorer(Settings.model_validate(spec["settings"]), spec["regime"], spec["index"])
    return train_folm(spec["base"], spec["rows"], scorer, FolmTrainConfig(**spec["config"]), Path(spec["out_dir"]),
                      resume=True, log_fn=log_fn, run_key=spec["run_key"])


# ---- diffusion --------------------------------------------------------------------------------------------------

def prepare_diffusion(run_dir: Path, targets: np.ndarray, conditions: np.ndarray, denoiser: DenoiserConfig,
                      train: DiffusionTrainConfig, out_dir: Path, condition_mask: np.ndarray | None = None,
                      init_from: Path | None = None) -> Path:
    with atomic_dir(run_dir) as tmp:
        arrays = {"targets": targets, "conditions": conditions}
        np.savez(tmp / INPUTS, **arrays, **({} if condition_mask is None else {"condition_mask": condition_mask}))
        (tmp / RUN).write_text(json.dumps({"denoiser": denoiser.to_dict(), "train": train.model_dump(mode="json"),
                                           "out_dir": str(out_dir), "init_from": init_from and str(init_from)}))
    return Path(run_dir)


def diffusion_metadata(result) -> dict[str, float | int]:
    return {"final_loss": round(result.final_loss, 6), "sigma_data": round(result.sigma_data, 6),
            "steps": result.steps, "steps_run": result.steps_run, "seconds": round(result.seconds, 1)}


def _train_diffusion(run_dir: Path, log_fn: LogFn | None):
    from r4t_pipeline.diffusion.train import train_diffusion

    spec = json.loads((run_dir / RUN).read_text())
    arrays = np.load(run_dir / INPUTS)
    return train_diffusion(arrays["targets"], arrays["conditions"], DenoiserConfig(**spec["denoiser"]),
                           DiffusionTrainConfig(**spec["train"]), Path(spec["out_dir"]),
                           condition_mask=arrays["condition_mask"] if "condition_mask" in arrays else None,
                           init_from=spec["init_from"] and Path(spec["init_from"]), log_fn=log_fn)


STAGES = {"folm": (_train_folm, folm_metadata), "diffusion": (_train_diffusion, diffusion_metadata)}


# ---- every process ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _session() -> Iterator[tuple[MlflowRun | None, object | None]]:
    """(MLflow run, Pipes session) in the main process, each None where absent; (None, None) in the others."""
    if int(os.environ.get("RANK", "0")) != 0:
        yield None, None
        return
    from dagster_pipes import PipesEnvVarParamsLoader, open_dagster_pipes

    if not PipesEnvVarParamsLoader().is_dagster_pipes_process():
        yield MlflowRun.from_env(), None
        return
    with open_dagster_pipes() as session:
        yield MlflowRun.from_env(), session


def main(argv: list[str] | None = None) -> int:
    stage, run_dir = argv if argv is not None else sys.argv[1:]
    train, metadata = STAGES[stage]
    with _session() as (run, pipes):
        result = train(Path(run_dir), run.log if run else None)
        if pipes is not None:
            pipes.report_asset_materialization(metadata={**metadata(result),
                                                         "processes": int(os.environ.get("WORLD_SIZE", "1"))})
    return 0


if __name__ == "__main__":
    sys.exit(main())
