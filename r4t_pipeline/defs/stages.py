"""R4T's three stages as assets, per domain and regime: folm_base (per domain) -> folm_checkpoint ->
synthetic_targets -> diffusion_checkpoint. Each resumes from its own checkpoints after an interruption
and tracks its run in MLflow; a failed run leaves the previous materialisation in place."""

import time
from pathlib import Path

import dagster as dg
import numpy as np

from r4t_pipeline import queries as q
from r4t_pipeline import stack
from r4t_pipeline.catalog import Catalog
from r4t_pipeline.defs.artefacts import Artefact, CatalogArtefact, IndexArtefact, QueryCorpusArtefact
from r4t_pipeline.defs.foundation import version
from r4t_pipeline.defs.resources import MlflowTracking
from r4t_pipeline.io import file_sha256, stable_hash, write_json
from r4t_pipeline.settings import Settings

# the long stages get one automatic retry; their checkpoints make the retry resume, not restart
LONG_STAGE_RETRY = dg.RetryPolicy(max_retries=1, delay=5)


def _summary(history: list[dict[str, float]], window: int = 5) -> dict[str, float]:
    """First and last `window`-step means of every logged quantity: the learning curve in two numbers."""
    keys = sorted({k for row in history for k in row})
    first, last = history[:window], history[-window:]
    return {f"{k}_{tag}": float(np.mean([r[k] for r in rows if k in r]))
            for k in keys for tag, rows in (("first", first), ("last", last)) if any(k in r for r in rows)}


def folm_base_asset(settings: Settings, domain: str):
    cfg = settings.folm

    @dg.asset(key=[domain, "folm_base"], group_name=domain, kinds={"pytorch"},
              ins={"catalog": dg.AssetIn(key=[domain, "catalog"]),
                   "broad_queries": dg.AssetIn(key=[domain, "broad_queries"])},
              code_version=version(cfg.base, cfg.base_model, cfg.bootstrap_size.model_dump(), cfg.bootstrap_sft_steps,
                                   cfg.bootstrap_lr, settings.rewards.k),
              retry_policy=LONG_STAGE_RETRY,
              description="The zero-shot fan-out LM: the pretrained base model, or (offline bootstrap) a small LM "
                          "warm-started on (set title -> item names) pairs of the training split.")
    def folm_base(context: dg.AssetExecutionContext, mlflow: MlflowTracking, catalog: CatalogArtefact,
                  broad_queries: QueryCorpusArtefact) -> dg.Output[Artefact]:
        out = stack.folm_base_dir(settings, domain)
        meta: dict = {"base": cfg.base}
        if cfg.base == "pretrained":
            from r4t_pipeline.folm.models import resolve_model_source

            model = resolve_model_source(cfg.base_model)
            write_json(out / "r4t_base.json", {"model": model, "spec": cfg.base_model})
            meta["model"] = model
        else:
            from r4t_pipeline.folm.tiny import bootstrap_folm

            names = dict(zip(*Catalog.load(catalog.path).items[["item_id", "name"]].T.values))
            pairs = q.load_corpus(broad_queries.path, "wscr", "train")
            examples = [(query, [names[i] for i in ids if names[i]]) for query, ids in
                        zip(pairs["query"], pairs["reference_ids"])]
            with mlflow.run(f"{domain}/folm_base", params={"sft_steps": cfg.bootstrap_sft_steps,
                                                           **cfg.bootstrap_size.model_dump()}) as run:
                losses = bootstrap_folm(examples, out / "model", settings.rewards.k, cfg.bootstrap_sft_steps,
                                        cfg.bootstrap_size, lr=cfg.bootstrap_lr, log_fn=run.log)
            write_json(out / "r4t_base.json", {"model": str(out / "model"), "spec": "bootstrap"})
            meta.update(model=str(out / "model"), sft_pairs=len(examples), sft_loss_first=losses[0],
                        sft_loss_last=losses[-1])
        return dg.Output(Artefact(domain=domain, path=meta["model"]), metadata=meta)

    return folm_base


def stage_assets(settings: Settings, domain: str, regime: str) -> list:
    prefix = [domain, regime]
    group = f"{domain}_{regime}"
    reward = stack.reward_config(settings, regime)
    folm_version = version(settings.folm.version(), reward.model_dump(), stack.reward_files_hash(settings, regime))

    @dg.asset(key=[*prefix, "folm_checkpoint"], group_name=group, kinds={"pytorch", "safetensors"},
              ins={"folm_base": dg.AssetIn(key=[domain, "folm_base"]),
                   "broad_queries": dg.AssetIn(key=[domain, "broad_queries"]),
                   "embedding_index": dg.AssetIn(key=[domain, "embedding_index"])},
              code_version=folm_version, retry_policy=LONG_STAGE_RETRY,
              description=f"Stage 1: the FOLM tuned by GRPO + soft-PPO on the {regime.upper()} reward.")
    def folm_checkpoint(context: dg.AssetExecutionContext, mlflow: MlflowTracking, folm_base: Artefact,
                        broad_queries: QueryCorpusArtefact, embedding_index: IndexArtefact) -> dg.Output[Artefact]:
        from r4t_pipeline.folm.grpo import train_folm

        train = q.load_corpus(broad_queries.path, regime, "train")
        if settings.folm.max_train_queries:
            train = train.sample(n=min(settings.folm.max_train_queries, len(train)), random_state=0)
        rows = [{"query": t} for t in train["query"]] if regime == "oar" else \
            [{"query": t, "reference_ids": r} for t, r in zip(train["query"], train["reference_ids"])]
        scorer = stack.fanout_scorer(settings, domain, regime)
        config = settings.folm.train.model_copy(update={"k": reward.k})
        out = stack.stage_dir(settings, domain, regime, "folm")
        with mlflow.run(f"{domain}/{regime}/folm_checkpoint",
                        params={**config.model_dump(), **{f"reward_{k}": v for k, v in reward.model_dump().items()},
                                "base": folm_base.path}) as run:
            result = train_folm(folm_base.path, rows, scorer, config, out, resume=True, log_fn=run.log,
                                run_key=folm_version)  # a reward change retrains, never reuses
        summary = _summary(result.history)
        context.log.info(f"{domain}/{regime} FOLM: {result.steps} steps, {result.seconds_per_step:.2f} s/step")
        return dg.Output(Artefact(domain=domain, path=str(result.checkpoint_dir)), metadata={
            "steps": result.steps, "resumed_from_step": result.resumed_from_step,
            "seconds_per_step": round(result.seconds_per_step, 3), "peak_rss_mb": round(result.peak_rss_mb),
            "train_queries": len(rows), **{k: round(v, 4) for k, v in summary.items()},
            "checkpoint": dg.MetadataValue.path(str(result.checkpoint_dir))})

    @dg.asset(key=[*prefix, "synthetic_targets"], group_name=group, kinds={"parquet"},
              ins={"folm": dg.AssetIn(key=folm_checkpoint.key),
                   "broad_queries": dg.AssetIn(key=[domain, "broad_queries"]),
                   "embedding_index": dg.AssetIn(key=[domain, "embedding_index"])},
              code_version=version(stable_hash(settings.synth.model_dump())), retry_policy=LONG_STAGE_RETRY,
              description="Stage 2: the tuned FOLM's best fan-outs per training query as K x d targets (Parquet).")
    def synthetic_targets(context: dg.AssetExecutionContext, mlflow: MlflowTracking, folm: Artefact,
                          broad_queries: QueryCorpusArtefact, embedding_index: IndexArtefact) -> dg.Output[Artefact]:
        from r4t_pipeline.folm.grpo import META_FILE
        from r4t_pipeline.synth import synthesize_targets

        train = q.load_corpus(broad_queries.path, regime, "train")
        model, tokenizer = stack.load_folm(folm.path)
        folm_id = f"{folm.path}#{file_sha256(Path(folm.path) / META_FILE)[:12]}"  # which training run wrote it
        out = stack.stage_dir(settings, domain, regime, "synthetic_targets")
        with mlflow.run(f"{domain}/{regime}/synthetic_targets", params=settings.synth.model_dump()) as run:
            stats = synthesize_targets(model, tokenizer, stack.fanout_scorer(settings, domain, regime), train,
                                       settings.synth, out, folm_id, log_fn=run.log)
            run.log(0, {k: v for k, v in stats.items() if isinstance(v, (int, float))})
        sampled = stats["queries"] * settings.synth.samples_per_query
        return dg.Output(Artefact(domain=domain, path=str(out)), metadata={
            **{k: round(v, 4) if isinstance(v, float) else v for k, v in stats.items()},
            "kept_fraction": round(stats["rows"] / max(sampled, 1), 4), "path": dg.MetadataValue.path(str(out))})

    @dg.asset(key=[*prefix, "diffusion_checkpoint"], group_name=group, kinds={"pytorch", "safetensors"},
              ins={"targets": dg.AssetIn(key=synthetic_targets.key)},
              code_version=version(settings.diffusion.version()), retry_policy=LONG_STAGE_RETRY,
              description="Stage 3: the EDM diffusion transformer generating all K retrieval directions at once.")
    def diffusion_checkpoint(context: dg.AssetExecutionContext, mlflow: MlflowTracking,
                             targets: Artefact) -> dg.Output[Artefact]:
        from r4t_pipeline.diffusion.denoiser import DenoiserConfig, parameter_count
        from r4t_pipeline.diffusion.train import train_diffusion
        from r4t_pipeline.synth import load_targets

        cfg = settings.diffusion
        y, conditions, _ = load_targets(targets.path)
        denoiser = DenoiserConfig(**{**DenoiserConfig.preset(cfg.denoiser_preset, y.shape[2], conditions.shape[1])
                                     .to_dict(), **cfg.denoiser_overrides})
        out = stack.stage_dir(settings, domain, regime, "diffusion")
        started = time.perf_counter()
        with mlflow.run(f"{domain}/{regime}/diffusion_checkpoint",
                        params={**denoiser.to_dict(), **cfg.train.model_dump(mode="json")}) as run:
            result = train_diffusion(y, conditions, denoiser, cfg.train, out, resume=True, log_fn=run.log)
        return dg.Output(Artefact(domain=domain, path=str(result.checkpoint_dir)), metadata={
            "parameters": parameter_count(denoiser), "targets": len(y), "sigma_data": round(result.sigma_data, 5),
            "final_loss": round(result.final_loss, 5), "steps": result.steps, "steps_run": result.steps_run,
            "seconds": round(time.perf_counter() - started, 1),
            "checkpoint": dg.MetadataValue.path(str(result.checkpoint_dir))})

    return [folm_checkpoint, synthetic_targets, diffusion_checkpoint]

