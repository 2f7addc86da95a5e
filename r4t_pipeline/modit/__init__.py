"""MO-DiT+HPPO (SPEC §8): pattern-preserving attribute retrieval on the R4T diffusion transformer.

Runners, in pipeline order (each on loaded objects and an output folder):
  build_task_data(task, catalog, embeddings, cfg, out_dir) -> TaskData           per attribute task
  train_stage(stage, protocol, tasks, embeddings, cfg, out_dir, catalogs=, init_from=, resume=, log_fn=)
                                                                                  stages raw, ordered, tail, hppo
  run_modit_evaluation(tasks, embeddings, checkpoints, cfg, out_dir) -> dict     all methods, all cells
  run_modit(catalogs, embeddings, cfg, root)                                       all of the above, in order
"""

from r4t_pipeline.modit.config import MODIT_PROFILES, STAGES, ModitConfig, modit_config
from r4t_pipeline.modit.evaluate import evaluation_table, flat_metrics, run_modit_evaluation
from r4t_pipeline.modit.pipeline import ModitLayout, run_modit
from r4t_pipeline.modit.stages import StageResult, train_stage
from r4t_pipeline.modit.tasks import TaskData, assert_splits_disjoint, build_task_data, check_splits

__all__ = [
    "MODIT_PROFILES",
    "STAGES",
    "ModitConfig",
    "ModitLayout",
    "StageResult",
    "TaskData",
    "assert_splits_disjoint",
    "build_task_data",
    "check_splits",
    "evaluation_table",
    "flat_metrics",
    "modit_config",
    "run_modit",
    "run_modit_evaluation",
    "train_stage",
]
