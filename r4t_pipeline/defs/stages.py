"""R4T's three stages as assets, per catalog and regime: folm_base (per catalog) -> folm_checkpoint ->
synthetic_targets -> diffusion_checkpoint. Each writes a new version folder, resumes from its own checkpoints
after an interruption and tracks its run in MLflow; a failed run leaves every earlier version in place."""


import dagster as dg

from r4t_pipeline import queries as q
from r4t_pipeline import stack
from r4t_pipeline.catalog import Catalog
from r4t_pipeline.defs.launch import train_diffusion_stage, train_folm_stage
from r4t_pipeline.defs.production import Production, code_version, retry_transient
from r4t_pipeline.defs.resources import MlflowTracking
from r4t_pipeline.io import write_json
from r4t_pipeline.records import CatalogRecord, FileRecord, IndexRecord, ModelRecord, QueryCorpusRecord
from r4t_pipeline.settings import Settings


def folm_base_asset(settings: Settings, name: str):
    cfg = settings.folm

    @dg.asset(key=[name, "folm_base"], group_name=name, kinds={"pytorch"},
              ins={"catalog": dg.AssetIn(key=[name, "catalog"]),
                   "broad_queries": dg.AssetIn(key=[name, "broad_queries"])},
              code_version=code_version(cfg.model_dump(mode="json",
                                                       exclude={"max_train_queries", "train", "train_overrides"}),
                                        settings.rewards.k),
              description="The zero-shot fan-out LM: the pretrained base model (LoRA) or a small LM trained here "
                          "(bootstrap), warm-started on the training split's (set title -> a line per item: its name, "
                          "or the title and its type) pairs.")
    @retry_transient
    def folm_base(context: dg.AssetExecutionContext, mlflow: MlflowTracking, catalog: CatalogRecord,
                  broad_queries: QueryCorpusRecord) -> dg.Output[ModelRecord]:
        production = Production(context, settings, {"catalog": catalog, "broad_queries": broad_queries})
        if reused := production.reuse():
            return reused
        meta: dict = {"base": cfg.base}
        if cfg.base == "pretrained" and not cfg.sft_steps:
            from r4t_pipeline.folm.models import resolve_model_source

            model = resolve_model_source(cfg.base_model)
            with production.writing() as tmp:
                write_json(tmp / stack.BASE_RECORD, {"model": model, "spec": cfg.base_model})
            return production.output(production.record(ModelRecord, model=model), {**meta, "model": model})
        from r4t_pipeline.folm.sft import warm_start_lines, warm_start_pretrained
        from r4t_pipeline.folm.tiny import bootstrap_folm

        items = Catalog.load(catalog.path).items
        name_and_type = dict(zip(items["item_id"], zip(items["name"], items["category"])))
        pairs = q.load_corpus(broad_queries.path, "wscr", "train")
        if cfg.base == "pretrained":  # it knows language already: teach it the intents people write, not keywords
            pairs = q.written_first(pairs)
            spec, shape = cfg.base_model, {"lora_rank": cfg.sft_lora_rank}
        else:
            spec, shape = "bootstrap", cfg.bootstrap_size.model_dump()
        examples = [(query, warm_start_lines(query, [name_and_type[i] for i in ids], cfg.sft_lines))
                    for query, ids in pairs.select("query", "reference_ids").iter_rows()]
        model = str(production.path / "model")
        sft = {"steps": cfg.sft_steps, "lr": cfg.sft_lr, "batch_size": cfg.sft_batch_size}
        with mlflow.run(f"{name}/folm_base", params={"base": spec, **sft, **shape}) as run, \
                production.writing() as tmp:
            if cfg.base == "pretrained":
                losses = warm_start_pretrained(cfg.base_model, examples, tmp / "model", settings.rewards.k,
                                               lora_rank=cfg.sft_lora_rank, log_fn=run.log, **sft)
            else:
                losses = bootstrap_folm(examples, tmp / "model", settings.rewards.k, size=cfg.bootstrap_size,
                                        log_fn=run.log, **sft)
            write_json(tmp / stack.BASE_RECORD, {"model": model, "spec": spec})
        meta.update(sft_pairs=len(examples), sft_loss_first=losses[0], sft_loss_last=losses[-1])
        return production.output(production.record(ModelRecord, model=model), {**meta, "model": model})

    return folm_base


def stage_assets(settings: Settings, name: str, regime: str) -> list:
    prefix = [name, regime]
    group = f"{name}_{regime}"
    reward = stack.reward_config(settings, regime)
    # RL optimises the reward and synthesis keeps each query's best fan-outs by it: both re-run when it changes
    reward_version = stack.reward_version(settings, regime)
    training_queries = q.learning_rule(regime)  # which training queries RL and synthesis read

    @dg.asset(key=[*prefix, "folm_checkpoint"], group_name=group, kinds={"pytorch", "safetensors"},
              ins={"folm_base": dg.AssetIn(key=[name, "folm_base"]),
                   "broad_queries": dg.AssetIn(key=[name, "broad_queries"]),
                   "embedding_index": dg.AssetIn(key=[name, "embedding_index"])},
              code_version=code_version(settings.folm.version(regime), *reward_version, training_queries),
              description=f"Stage 1: the FOLM tuned by GRPO + soft-PPO on the {regime.upper()} reward.")
    @retry_transient
    def folm_checkpoint(context: dg.AssetExecutionContext, mlflow: MlflowTracking, folm_base: ModelRecord,
                        broad_queries: QueryCorpusRecord, embedding_index: IndexRecord) -> dg.Output[ModelRecord]:
        production = Production(context, settings, {"folm_base": folm_base, "broad_queries": broad_queries,
                                                    "embedding_index": embedding_index})
        if reused := production.reuse():
            return reused
        rows = stack.folm_train_rows(settings, broad_queries.path, regime)
        config = settings.folm.train_for(regime).model_copy(update={"k": reward.k})
        with mlflow.run(f"{name}/{regime}/folm_checkpoint",
                        params={**config.model_dump(), **{f"reward_{k}": v for k, v in reward.model_dump().items()},
                                "base": folm_base.model}) as run:
            trained = train_folm_stage(context, run, settings, regime, embedding_index.for_regime(regime),
                                       folm_base.model, rows, config, production.path, production.version)
        context.log.info(f"{name}/{regime} FOLM: {trained['steps']} steps, {trained['seconds_per_step']} s/step")
        return production.output(production.record(ModelRecord, model=str(production.path)),
                                 {**trained, "train_queries": len(rows)})

    @dg.asset(key=[*prefix, "synthetic_targets"], group_name=group, kinds={"parquet"},
              ins={"folm": dg.AssetIn(key=folm_checkpoint.key),
                   "broad_queries": dg.AssetIn(key=[name, "broad_queries"]),
                   "embedding_index": dg.AssetIn(key=[name, "embedding_index"])},
              code_version=code_version(settings.synth.model_dump(), *reward_version, training_queries),
              description="Stage 2: the tuned FOLM's best fan-outs per training query as K x d targets (Parquet).")
    @retry_transient
    def synthetic_targets(context: dg.AssetExecutionContext, mlflow: MlflowTracking, folm: ModelRecord,
                          broad_queries: QueryCorpusRecord, embedding_index: IndexRecord) -> dg.Output[FileRecord]:
        from r4t_pipeline.synth import synthesize_targets

        production = Production(context, settings, {"folm": folm, "broad_queries": broad_queries,
                                                    "embedding_index": embedding_index})
        if reused := production.reuse():
            return reused
        train = q.learning_queries(broad_queries.path, regime)
        model, tokenizer = stack.load_folm(folm.model)
        scorer = stack.fanout_scorer(settings, regime, embedding_index.for_regime(regime))
        with mlflow.run(f"{name}/{regime}/synthetic_targets", params=settings.synth.model_dump()) as run:
            stats = synthesize_targets(model, tokenizer, scorer, train, settings.synth, production.path,
                                       f"{folm.asset}@{folm.version}", log_fn=run.log)
            run.log(0, {k: v for k, v in stats.items() if isinstance(v, (int, float))})
        sampled = stats["queries"] * settings.synth.samples_per_query
        return production.output(production.record(FileRecord), {
            **{k: round(v, 4) if isinstance(v, float) else v for k, v in stats.items()},
            "kept_fraction": round(stats["rows"] / max(sampled, 1), 4)})

    @dg.asset(key=[*prefix, "diffusion_checkpoint"], group_name=group, kinds={"pytorch", "safetensors"},
              ins={"targets": dg.AssetIn(key=synthetic_targets.key)},
              code_version=code_version(settings.diffusion.version()),
              description="Stage 3: the EDM diffusion transformer generating all K retrieval directions at once.")
    @retry_transient
    def diffusion_checkpoint(context: dg.AssetExecutionContext, mlflow: MlflowTracking,
                             targets: FileRecord) -> dg.Output[ModelRecord]:
        from r4t_pipeline.diffusion.denoiser import DenoiserConfig, parameter_count
        from r4t_pipeline.synth import load_targets

        production = Production(context, settings, {"targets": targets})
        if reused := production.reuse():
            return reused
        cfg = settings.diffusion
        y, conditions, _ = load_targets(targets.path)
        denoiser = DenoiserConfig(**{**DenoiserConfig.preset(cfg.denoiser_preset, y.shape[2], conditions.shape[1])
                                     .to_dict(), **cfg.denoiser_overrides})
        with mlflow.run(f"{name}/{regime}/diffusion_checkpoint",
                        params={**denoiser.to_dict(), **cfg.train.model_dump(mode="json")}) as run:
            trained = train_diffusion_stage(context, run, y, conditions, denoiser, cfg.train, production.path)
        return production.output(production.record(ModelRecord, model=str(production.path)), {
            "parameters": parameter_count(denoiser), "targets": len(y), **trained})

    return [folm_checkpoint, synthetic_targets, diffusion_checkpoint]

