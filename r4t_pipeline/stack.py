"""Builds the library's objects from `Settings` (shared by the Dagster layer, the CLI and the benchmark)."""

from __future__ import annotations

import json
from pathlib import Path

from r4t_pipeline.encoders import EmbeddingCache, EmbeddingSpace, build_encoder
from r4t_pipeline.index import VectorIndex
from r4t_pipeline.io import file_sha256
from r4t_pipeline.paths import assets_dir
from r4t_pipeline.retrievers import BestOfN, NoFanout, R4TDiffusion, R4TFolm, Retriever, ZeroShotFanout
from r4t_pipeline.rewards import FanoutScorer, RewardConfig, load_reward_preset
from r4t_pipeline.settings import Settings
from r4t_pipeline.sources import djmix, polyvore
from r4t_pipeline.sources.files import SourceFile

_SPACES: dict[tuple, EmbeddingSpace] = {}


def source_files(domain: str) -> list[SourceFile]:
    return {"polyvore": polyvore.FILES, "djmix": djmix.FILES}[domain]


def embedding_space(settings: Settings, show_progress: bool = False) -> EmbeddingSpace:
    """One loaded encoder per process and configuration (loading MiniLM takes seconds)."""
    cfg = settings.encoder
    key = (cfg.version(), str(settings.root))
    if key not in _SPACES:
        encoder = build_encoder(cfg.kind, model_path=cfg.model_path, architecture=cfg.clip_architecture,
                                pretrained=cfg.clip_pretrained)
        cache = EmbeddingCache(settings.root.parent / "cache" / "embeddings.sqlite")
        _SPACES[key] = EmbeddingSpace(encoder, cfg.dim, cache, cfg.batch_size)
    space = _SPACES[key]
    space.show_progress = show_progress
    return space


# ---- artefact locations (one place, shared by assets, CLI and benchmark) ------------------------------

def folm_base_dir(settings: Settings, domain: str) -> Path:
    return settings.artefact(domain, "folm_base")


def stage_dir(settings: Settings, domain: str, regime: str, stage: str) -> Path:
    """stage: folm | synthetic_targets | diffusion | evaluation"""
    return settings.artefact(domain, regime, stage)


def index_dir(settings: Settings, domain: str, regime: str) -> Path:
    """The regime's database: OAR retrieves collections, WSCR retrieves items."""
    return settings.artefact(domain, "index", "collections" if regime == "oar" else "items")


# ---- loaded objects -------------------------------------------------------------------------------

def reward_config(settings: Settings, regime: str) -> RewardConfig:
    preset = load_reward_preset(settings.rewards.presets[regime])
    if preset.regime != regime:
        raise ValueError(f"reward preset {settings.rewards.presets[regime]!r} is for regime {preset.regime!r}, "
                         f"not {regime!r}")
    return preset.model_copy(update={**settings.rewards.overrides.get(regime, {}), "k": settings.rewards.k})


def reward_files_hash(settings: Settings, regime: str) -> str:
    """Content of the preset file, so that editing it marks the FOLM stale like a config change does."""
    path = assets_dir() / "rewards" / f"{settings.rewards.presets[regime]}.yaml"
    return file_sha256(path) if path.exists() else settings.rewards.presets[regime]


def load_index(settings: Settings, domain: str, regime: str) -> VectorIndex:
    return VectorIndex.load(index_dir(settings, domain, regime))


def fanout_scorer(settings: Settings, domain: str, regime: str) -> FanoutScorer:
    index = load_index(settings, domain, regime)
    return FanoutScorer(embedding_space(settings), index, reward_config(settings, regime))


def load_folm(path: Path | str):
    from r4t_pipeline.folm.models import load_causal_lm

    if not Path(path).exists():
        raise FileNotFoundError(f"no fan-out LM at {path}; materialise the FOLM assets first")
    model, tokenizer = load_causal_lm(str(path))
    return model.eval(), tokenizer


METHODS = ("no_fanout", "zero_shot", "best_of_n", "r4t_folm", "r4t_diffusion")


def build_retriever(settings: Settings, domain: str, regime: str, method: str,
                    sampler: str | None = None, steps: int | None = None) -> Retriever:
    """Any of the five methods over the regime's database, from the materialised artefacts."""
    space, index = embedding_space(settings), load_index(settings, domain, regime)
    k, train = settings.rewards.k, settings.folm.train
    text_kwargs = {"k": k, "temperature": train.temperature, "max_new_tokens": train.max_new_tokens,
                   "batch_size": train.generation_batch_size}
    if method == "no_fanout":
        return NoFanout(space, index)
    if method in ("zero_shot", "best_of_n"):
        model, tokenizer = load_folm(base_model_path(settings, domain))
        if method == "zero_shot":
            return ZeroShotFanout(space, index, model, tokenizer, **text_kwargs)
        scorer = FanoutScorer(space, index, reward_config(settings, regime))
        return BestOfN(space, index, model, tokenizer, scorer=scorer, n=settings.evaluation.best_of_n, **text_kwargs)
    if method == "r4t_folm":
        return R4TFolm(space, index, *load_folm(stage_dir(settings, domain, regime, "folm")), **text_kwargs)
    if method == "r4t_diffusion":
        from r4t_pipeline.diffusion.train import DiffusionRetrieverModel

        path = stage_dir(settings, domain, regime, "diffusion")
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"no diffusion checkpoint at {path}; materialise diffusion_checkpoint first")
        cfg = settings.diffusion
        return R4TDiffusion(space, index, DiffusionRetrieverModel.load(path), sampler or cfg.sampler,
                            steps or cfg.sampler_steps, cfg.guidance)
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


def base_model_path(settings: Settings, domain: str) -> str:
    """The zero-shot FOLM: the bootstrap folder of this domain, or the pretrained model."""
    record = folm_base_dir(settings, domain) / "r4t_base.json"
    if not record.exists():
        raise FileNotFoundError(f"no base FOLM recorded at {record}; materialise {domain}/folm_base first")
    return json.loads(record.read_text())["model"]
