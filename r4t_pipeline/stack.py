"""Builds the library's objects from settings sections and artefact paths (shared by the Dagster layer, the CLI
and the benchmark). Where artefacts live is never derived here: callers pass the paths their records name."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from r4t_pipeline.encoders import EmbeddingCache, EmbeddingSpace, Encoder, build_encoder
from r4t_pipeline.index import VectorIndex
from r4t_pipeline.io import file_sha256
from r4t_pipeline.methods import CATALOG_ASSETS, FANOUT_METHODS
from r4t_pipeline.methods import METHODS as REGISTERED
from r4t_pipeline.paths import assets_dir
from r4t_pipeline.records import Record, RecordStore, check_consistent
from r4t_pipeline.retrievers import (
    BestOfN,
    NoFanout,
    R4TDiffusion,
    R4TFolm,
    Retriever,
    SupervisedDiffusion,
    ZeroShotFanout,
)
from r4t_pipeline.rewards import FanoutScorer, RewardConfig, load_reward_preset
from r4t_pipeline.settings import Settings, with_overrides

_ENCODERS: dict[tuple, Encoder] = {}
_SPACES: dict[tuple, EmbeddingSpace] = {}
METHODS = tuple(REGISTERED)
BASE_RECORD = "r4t_base.json"  # in a folm_base version: which model the zero-shot FOLM is


def embedding_space(settings: Settings, show_progress: bool = False, cached: bool = True,
                    queries: bool = False) -> EmbeddingSpace:
    """One loaded encoder per process and configuration (loading MiniLM takes seconds). `cached=False`: no
    SQLite cache of the embeddings (a service encodes ever-new queries; a write per request only adds latency).
    `queries`: the space answers queries, so its encoder runs in `settings.query_runtime`."""
    cfg = settings.encoder
    cache_path = settings.root.parent / "cache" / "embeddings.sqlite"
    encoder_key = (cfg.version(), onnx_dir(settings) if queries else None)
    if encoder_key not in _ENCODERS:  # one per runtime, shared by the cached and the uncached space
        _ENCODERS[encoder_key] = build_encoder(cfg.kind, model_path=cfg.model_path, architecture=cfg.clip_architecture,
                                               pretrained=cfg.clip_pretrained, onnx_dir=encoder_key[1])
    key = (*encoder_key, str(cache_path) if cached else None)
    if key not in _SPACES:
        _SPACES[key] = EmbeddingSpace(_ENCODERS[encoder_key], cfg.dim, EmbeddingCache(cache_path) if cached else None,
                                      cfg.batch_size)
    space = _SPACES[key]
    space.show_progress = show_progress
    return space


def onnx_dir(settings: Settings) -> str | None:
    """Where the networks exported for ONNX Runtime are kept, when queries are answered there."""
    return str(settings.root.parent / "cache" / "onnx") if settings.query_runtime == "onnx" else None


def reward_config(settings: Settings, regime: str) -> RewardConfig:
    name = settings.rewards.presets[regime]
    config = with_overrides(load_reward_preset(name), {**settings.rewards.overrides.get(regime, {}),
                                                       "k": settings.rewards.k},
                            f"reward preset {name!r} with rewards.overrides.{regime}")
    if config.regime != regime:
        raise ValueError(f"reward preset {name!r} with rewards.overrides.{regime} is for regime {config.regime!r}, "
                         f"not {regime!r}")
    return config


def reward_version(settings: Settings, regime: str) -> tuple[dict, str]:
    """What the regime's reward is, for the code versions of the assets that read it: its configuration and the
    content of its preset file, so that editing the file marks them stale like a config change does."""
    path = assets_dir() / "rewards" / f"{settings.rewards.presets[regime]}.yaml"
    return (reward_config(settings, regime).model_dump(),
            file_sha256(path) if path.exists() else settings.rewards.presets[regime])


def folm_train_rows(settings: Settings, corpus_path: str | Path, regime: str) -> list[dict]:
    """The FOLM's RL training rows: "query", plus "reference_ids" for the WSCR reward (at most
    `folm.max_train_queries`, a seeded sample of `queries.learning_queries`)."""
    from r4t_pipeline.queries import learning_queries

    train = learning_queries(corpus_path, regime)
    if settings.folm.max_train_queries and train.height > settings.folm.max_train_queries:
        train = train.sample(n=settings.folm.max_train_queries, seed=0)
    return train.select(["query"] if regime == "oar" else ["query", "reference_ids"]).to_dicts()


def fanout_scorer(settings: Settings, regime: str, index_path: str | Path) -> FanoutScorer:
    return FanoutScorer(embedding_space(settings), VectorIndex.load(index_path), reward_config(settings, regime))


def load_folm(path: Path | str):
    from r4t_pipeline.folm.models import load_causal_lm

    if not Path(path).exists():
        raise FileNotFoundError(f"no fan-out LM at {path}; materialise the FOLM assets first")
    model, tokenizer = load_causal_lm(str(path))
    return model.eval(), tokenizer


def base_model(folm_base_path: str | Path) -> str:
    """The zero-shot FOLM a folm_base version records: its own folder, or the pretrained model it names."""
    record = Path(folm_base_path) / BASE_RECORD
    if not record.exists():
        raise FileNotFoundError(f"no base FOLM recorded at {record}; materialise folm_base first")
    return json.loads(record.read_text())["model"]


@dataclass(frozen=True)
class RetrieverArtefacts:
    """The artefact paths one catalog and regime's retrievers read (from the records on the asset edges)."""

    index: str                      # the regime's database (a VectorIndex folder)
    base_folm: str | None = None    # the zero-shot FOLM model folder
    folm: str | None = None         # the RL-tuned FOLM model folder
    diffusion: str | None = None    # the diffusion checkpoint folder
    supervised: str | None = None   # the supervised anchor's checkpoint folder


def build_retriever(settings: Settings, regime: str, method: str, artefacts: RetrieverArtefacts,
                    sampler: str | None = None, steps: int | None = None, cached: bool = True,
                    keep_query: bool = False) -> Retriever:
    """Any registered method over the regime's database (`cached`: see `embedding_space`); `keep_query`: the
    query joins a fan-out method's directions (see `Retriever`)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if keep_query and method not in FANOUT_METHODS:
        raise ValueError("no_fanout is the query alone; keep_query applies to the fan-out methods")
    retriever = _retriever(settings, regime, method, artefacts, sampler, steps, cached)
    retriever.keep_query = keep_query
    return retriever


def _retriever(settings: Settings, regime: str, method: str, artefacts: RetrieverArtefacts, sampler: str | None,
               steps: int | None, cached: bool) -> Retriever:
    space, index = embedding_space(settings, cached=cached, queries=True), VectorIndex.load(artefacts.index)
    k, train = settings.rewards.k, settings.folm.train_for(regime)
    text_kwargs = {"k": k, "sampling": train, "batch_size": train.generation_batch_size,
                   "prefix_query": reward_config(settings, regime).prefix_query}
    if method == "no_fanout":
        return NoFanout(space, index)
    if method in ("zero_shot", "best_of_n"):
        model, tokenizer = load_folm(_required(artefacts.base_folm, "folm_base"))
        if method == "zero_shot":
            return ZeroShotFanout(space, index, model, tokenizer, **text_kwargs)
        # reference-free in both regimes (the OAR terms), over the texts this regime's retrievers embed
        selection = FanoutScorer(space, index, reward_config(settings, "oar").model_copy(
            update={"prefix_query": text_kwargs["prefix_query"]}))
        return BestOfN(space, index, model, tokenizer, scorer=selection, n=settings.evaluation.best_of_n,
                       **text_kwargs)
    if method == "r4t_folm":
        return R4TFolm(space, index, *load_folm(_required(artefacts.folm, "folm_checkpoint")), **text_kwargs)
    from r4t_pipeline.diffusion.train import DiffusionRetrieverModel

    supervised = method == "supervised_diffusion"
    path = Path(_required(artefacts.supervised if supervised else artefacts.diffusion,
                          "supervised_diffusion" if supervised else "diffusion_checkpoint"))
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no diffusion checkpoint at {path}; materialise the {method} model first")
    cfg = settings.diffusion
    return (SupervisedDiffusion if supervised else R4TDiffusion)(
        space, index, DiffusionRetrieverModel.load(path, onnx_dir=onnx_dir(settings)), sampler or cfg.sampler,
        steps or cfg.sampler_steps, cfg.guidance)


def latest_artefacts(settings: Settings, catalog: str, regime: str, methods: list[str]
                     ) -> tuple[dict[str, Record], RetrieverArtefacts]:
    """The latest materialised records that retrieving with `methods` needs (from the record store the Dagster IO
    manager writes), refused when they were built from different versions of a common upstream asset."""
    store = RecordStore(settings.records_dir)
    records = {asset: store.read(f"{catalog}/{asset}") for asset in ("catalog", "embedding_index", "broad_queries")}
    for method in methods:
        for asset in REGISTERED[method].assets:
            records[asset] = store.read(f"{catalog}/{asset}" if asset in CATALOG_ASSETS else
                                        f"{catalog}/{regime}/{asset}")
    check_consistent(records.values())
    return records, artefacts_of(regime, records)


def artefacts_of(regime: str, records: dict[str, Record]) -> RetrieverArtefacts:
    """Retriever paths from records keyed by asset name (embedding_index, folm_base, folm_checkpoint, ...)."""
    def model(asset: str) -> str | None:
        return records[asset].model if asset in records else None

    return RetrieverArtefacts(index=records["embedding_index"].for_regime(regime),
                              base_folm=base_model(records["folm_base"].path) if "folm_base" in records else None,
                              folm=model("folm_checkpoint"), diffusion=model("diffusion_checkpoint"),
                              supervised=model("supervised_diffusion"))


def _required(path: str | None, asset: str) -> str:
    if not path:
        raise FileNotFoundError(f"this method needs the {asset} asset; materialise it first")
    return path
