"""MO-DiT+HPPO (SPEC §8): pattern-preserving attribute retrieval on the R4T diffusion transformer.

Runners, in pipeline order (each on loaded objects and an output folder):
  build_task_data(task, catalog, embeddings, cfg, out_dir) -> TaskData           per attribute task
  train_stage(stage, protocol, tasks, embeddings, cfg, out_dir, catalogs=, init_from=, resume=, log_fn=)
                                                                                  stages raw, ordered, tail, hppo
  run_modit_evaluation(tasks, embeddings, checkpoints, cfg, out_dir) -> dict     all methods, all cells
  run_modit(catalogs, embeddings, cfg, root)                                       all of the above, in order

The names below load on first use, so that the settings (which hold a `ModitConfig`) import no torch.
"""

from importlib import import_module

_HOMES = {
    "MODIT_PROFILES": "config", "STAGES": "config", "ModitConfig": "config", "modit_config": "config",
    "evaluation_table": "evaluate", "flat_metrics": "evaluate", "run_modit_evaluation": "evaluate",
    "ModitLayout": "pipeline", "run_modit": "pipeline",
    "StageResult": "stages", "train_stage": "stages",
    "TaskData": "tasks", "assert_splits_disjoint": "tasks", "build_task_data": "tasks", "check_splits": "tasks",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_HOMES[name]}"), name)
