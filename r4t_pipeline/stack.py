"""Builds the library's objects from `Settings` (shared by the Dagster layer, the CLI and the benchmark)."""

from __future__ import annotations

from r4t_pipeline.encoders import EmbeddingCache, EmbeddingSpace, build_encoder
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
