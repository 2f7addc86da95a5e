"""MO-DiT+HPPO's branch of the graph (`r4t_pipeline.modit`): per attribute task its data (labels, patterns,
holdout splits, predictor, seed sets), per protocol the four training stages of one model shared by every task,
then the evaluation of every method. Assets read the records on their edges and call the library's runners."""

from pathlib import Path

import dagster as dg

from r4t_pipeline.defs.production import Production, code_version, retry_transient
from r4t_pipeline.defs.resources import MlflowTracking
from r4t_pipeline.io import write_json
from r4t_pipeline.modit import artefacts as layout
from r4t_pipeline.modit.config import STAGES, ModitConfig
from r4t_pipeline.records import FileRecord, ModelRecord, Record
from r4t_pipeline.settings import Settings

GROUP = "modit"
EVALUATION_KEY = layout.EVALUATION.split("/")


def task_key(task: str) -> list[str]:
    return layout.task_asset(task).split("/")


def stage_key(protocol: str, stage: str) -> list[str]:
    return layout.stage_asset(protocol, stage).split("/")


def _shared_ins(cfg: ModitConfig, catalogs: bool = False) -> dict[str, dg.AssetIn]:
    """Every task's data and its catalog's embeddings (and catalog), keyed task__<name>, emb__<catalog>, ..."""
    ins = {f"task__{t.name}": dg.AssetIn(key=task_key(t.name)) for t in cfg.tasks}
    ins |= {f"emb__{d}": dg.AssetIn(key=[d, "item_embeddings"]) for d in cfg.domains}
    if catalogs:
        ins |= {f"cat__{d}": dg.AssetIn(key=[d, "catalog"]) for d in cfg.domains}
    return ins


def _load_shared(inputs: dict[str, Record]):
    from r4t_pipeline.catalog import Catalog
    from r4t_pipeline.embeddings import CatalogEmbeddings
    from r4t_pipeline.modit.tasks import TaskData

    def loaded(prefix: str, load) -> dict:
        return {k.removeprefix(prefix): load(Path(r.path)) for k, r in inputs.items() if k.startswith(prefix)}

    tasks = loaded("task__", lambda p: TaskData.load(p / layout.TASK_DIR))
    return (list(tasks.values()), loaded("emb__", CatalogEmbeddings.load), loaded("cat__", Catalog.load))


def task_asset(settings: Settings, name: str):
    cfg = settings.modit
    task = cfg.task(name)

    @dg.asset(key=task_key(name), group_name=GROUP, kinds={"numpy"},
              ins={"catalog": dg.AssetIn(key=[task.domain, "catalog"]),
                   "item_embeddings": dg.AssetIn(key=[task.domain, "item_embeddings"])},
              code_version=code_version(cfg.versions()[f"task_data/{name}"]),
              description=f"MO-DiT task {name}: {task.domain} items labelled by {task.column!r}, k-means patterns, "
                          "item- and pattern-holdout splits, attribute predictor, seed sets, tail centroids.")
    @retry_transient
    def task_data(context: dg.AssetExecutionContext, catalog: Record, item_embeddings: Record
                  ) -> dg.Output[FileRecord]:
        from r4t_pipeline.catalog import Catalog
        from r4t_pipeline.embeddings import CatalogEmbeddings
        from r4t_pipeline.modit.tasks import build_task_data

        production = Production(context, settings, {"catalog": catalog, "item_embeddings": item_embeddings})
        if reused := production.reuse():
            return reused
        with production.writing() as tmp:
            data = build_task_data(task, Catalog.load(catalog.path), CatalogEmbeddings.load(item_embeddings.path),
                                   cfg, tmp / layout.TASK_DIR)
        meta = data.meta
        return production.output(production.record(FileRecord), {
            "threshold": data.threshold, "predictor_auc": dg.MetadataValue.json(data.predictor_auc),
            **{k: v for k, v in meta.items() if isinstance(v, (int, float, str))},
            **{k: dg.MetadataValue.json(v) for k, v in meta.items() if isinstance(v, dict)}})

    @dg.asset_check(asset=task_data, description="holdout splits disjoint; seeds low-attribute and in one pattern")
    def splits_are_disjoint(task_data: FileRecord) -> dg.AssetCheckResult:
        from r4t_pipeline.modit.tasks import TaskData, check_splits

        problems = check_splits(TaskData.load(Path(task_data.path) / layout.TASK_DIR))
        return dg.AssetCheckResult(passed=not any(problems.values()),
                                   metadata={"violations": {k: v for k, v in problems.items() if v}})

    return task_data, splits_are_disjoint


def stage_asset(settings: Settings, protocol: str, stage: str):
    cfg = settings.modit
    previous = STAGES[STAGES.index(stage) - 1] if stage != STAGES[0] else None
    ins = _shared_ins(cfg, catalogs=stage == "raw")
    if previous:
        ins["init"] = dg.AssetIn(key=stage_key(protocol, previous))
    what = {"raw": "raw-sequence pretraining (continue real curated sequences)",
            "ordered": "metric-ordered continuation pretraining across every task, with a task condition",
            "tail": "tail-centroid fine-tuning (target: the pattern's high-attribute tail centroid)",
            "hppo": "HPPO: hybrid candidate pool labelled by online Joint@K, Pareto-filtered pairs, "
                    "Diffusion-DPO against the frozen stage-3 model"}[stage]

    @dg.asset(key=stage_key(protocol, stage), group_name=GROUP, kinds={"pytorch", "safetensors"}, ins=ins,
              code_version=code_version(cfg.versions()[stage]),
              description=f"MO-DiT stage {STAGES.index(stage) + 1}, {protocol}-holdout: {what}.")
    @retry_transient
    def modit_stage(context: dg.AssetExecutionContext, mlflow: MlflowTracking, **inputs: Record
                    ) -> dg.Output[ModelRecord]:
        from r4t_pipeline.modit.stages import train_stage

        production = Production(context, settings, inputs)
        if reused := production.reuse():
            return reused
        tasks, embeddings, catalogs = _load_shared(inputs)
        init = inputs.get("init")
        params = getattr(cfg, stage).model_dump(mode="json")
        with mlflow.run(f"modit/{protocol}/{stage}", params=params) as run:
            result = train_stage(stage, protocol, tasks, embeddings, cfg, production.path, catalogs=catalogs or None,
                                 init_from=init.model if init else None, resume=True, log_fn=run.log)
        meta = {"examples": result.examples, "steps": result.steps, "steps_run": result.steps_run,
                "final_loss": round(result.final_loss, 5), "seconds": round(result.seconds, 1)}
        meta |= {k: dg.MetadataValue.json(v) if isinstance(v, dict) else v for k, v in result.metadata.items()}
        return production.output(production.record(ModelRecord, model=str(production.path)), meta)

    return modit_stage


def evaluation_asset(settings: Settings):
    cfg = settings.modit
    ins = _shared_ins(cfg) | {f"stage__{p}__{s}": dg.AssetIn(key=stage_key(p, s))
                              for p in cfg.protocols for s in STAGES}

    @dg.asset(key=EVALUATION_KEY, group_name=GROUP, kinds={"json"}, ins=ins,
              code_version=code_version(cfg.versions()["evaluation"]),
              description="MO-DiT+HPPO against its baselines and earlier stages per task x protocol: Joint/Purity/"
                          "Attr@K (mean ± s.e. over test seed sets), paired p-values, frontier plot, generator "
                          "latency per batch of seed sets.")
    @retry_transient
    def modit_evaluation(context: dg.AssetExecutionContext, mlflow: MlflowTracking, **inputs: Record
                         ) -> dg.Output[FileRecord]:
        from r4t_pipeline.modit.evaluate import flat_metrics, modit_latency, run_modit_evaluation

        production = Production(context, settings, inputs)
        if reused := production.reuse():
            return reused
        tasks, embeddings, _ = _load_shared(inputs)
        checkpoints = {p: {s: inputs[f"stage__{p}__{s}"].model for s in STAGES} for p in cfg.protocols}
        batch_sizes, first = settings.evaluation.latency_batch_sizes, tasks[0]
        with mlflow.run("modit/evaluation", params=cfg.evaluation.model_dump()) as run, \
                production.writing() as tmp:
            result = run_modit_evaluation(tasks, embeddings, checkpoints, cfg, tmp / layout.EVALUATION_DIR)
            latency = {"task": first.name, "protocol": cfg.protocols[0], "batch_sizes": batch_sizes,
                       "results": modit_latency(first, embeddings[first.task.domain], checkpoints[cfg.protocols[0]],
                                                cfg, cfg.protocols[0], batch_sizes,
                                                settings.evaluation.latency_repeats,
                                                budget_seconds=settings.evaluation.latency_budget_seconds)}
            write_json(tmp / layout.LATENCY_FILE, latency)
            run.log(0, flat_metrics(result))
        return production.output(production.record(FileRecord), {
            "table": dg.MetadataValue.md(result["table_markdown"]),
            "frontier": dg.MetadataValue.md(f"![frontier](data:image/png;base64,{result['frontier_png']})"),
            "goal": dg.MetadataValue.json(result["goal"]), "seconds": result["seconds"]})

    return modit_evaluation


def modit_assets(settings: Settings) -> tuple[list, list]:
    """The branch's assets and checks; none when no attribute task is configured on a declared catalog."""
    cfg = settings.modit
    if not cfg.tasks:
        return [], []
    assets, checks = [], []
    for task in cfg.tasks:
        asset, check = task_asset(settings, task.name)
        assets.append(asset)
        checks.append(check)
    assets += [stage_asset(settings, p, s) for p in cfg.protocols for s in STAGES]
    assets.append(evaluation_asset(settings))
    return assets, checks
