"""The supervised anchor per catalog (`r4t_pipeline.slate`): the R4T denoiser trained directly on the real
training sets (title -> the set's item embeddings), no FOLM; both regimes' evaluations compare against it."""


import dagster as dg

from r4t_pipeline import queries as q
from r4t_pipeline.defs.launch import train_diffusion_stage
from r4t_pipeline.defs.production import Production, code_version, retry_transient
from r4t_pipeline.defs.resources import MlflowTracking
from r4t_pipeline.embeddings import CatalogEmbeddings
from r4t_pipeline.records import EmbeddingsRecord, ModelRecord, QueryCorpusRecord
from r4t_pipeline.settings import Settings
from r4t_pipeline.stack import embedding_space


def supervised_asset(settings: Settings, name: str):
    @dg.asset(key=[name, "supervised_diffusion"], group_name=name, kinds={"pytorch", "safetensors"},
              ins={"broad_queries": dg.AssetIn(key=[name, "broad_queries"]),
                   "item_embeddings": dg.AssetIn(key=[name, "item_embeddings"])},
              code_version=code_version(settings.diffusion.version(), settings.rewards.k),
              description="The supervised anchor: the same denoiser trained on the real training sets' item "
                          "embeddings (prompt-to-slate style), no FOLM.")
    @retry_transient
    def supervised_diffusion(context: dg.AssetExecutionContext, mlflow: MlflowTracking,
                             broad_queries: QueryCorpusRecord, item_embeddings: EmbeddingsRecord
                             ) -> dg.Output[ModelRecord]:
        from r4t_pipeline.diffusion.denoiser import DenoiserConfig, parameter_count
        from r4t_pipeline.slate import supervised_targets

        production = Production(context, settings, {"broad_queries": broad_queries,
                                                    "item_embeddings": item_embeddings})
        if reused := production.reuse():
            return reused
        cfg = settings.diffusion
        pairs = q.load_corpus(broad_queries.path, "wscr", "train")
        emb = CatalogEmbeddings.load(item_embeddings.path)
        targets = supervised_targets(pairs["reference_ids"].to_list(), emb.item_ids, emb.items, settings.rewards.k,
                                     seed=cfg.train.seed)
        conditions = embedding_space(settings).encode_queries(pairs["query"].to_list())
        denoiser = DenoiserConfig(**{**DenoiserConfig.preset(cfg.denoiser_preset, emb.dim, emb.dim).to_dict(),
                                     **cfg.denoiser_overrides})
        with mlflow.run(f"{name}/supervised_diffusion",
                        params={**denoiser.to_dict(), **cfg.train.model_dump(mode="json")}) as run:
            trained = train_diffusion_stage(context, run, targets, conditions, denoiser, cfg.train, production.path)
        return production.output(production.record(ModelRecord, model=str(production.path)), {
            "parameters": parameter_count(denoiser), "training_sets": len(targets), **trained})

    return supervised_diffusion
