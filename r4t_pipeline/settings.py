"""Typed run configuration and the named profiles `smoke` (tests, seconds), `demo` (default, 2-core
CPU, ~30 min for everything) and `paper` (the paper's settings, for a GPU).

One switch selects a profile: $R4T_PROFILE (or `profile:` in the deployment YAML named by $R4T_CONFIG,
default `resources/local.yaml`). The YAML may also override any field, e.g. `rewards: {w_diversity: 0.3}`.
Each stage's section is hashed into its asset's `code_version`, so editing one section marks only that
asset and what depends on it stale.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from r4t_pipeline.io import stable_hash
from r4t_pipeline.paths import REPO_ROOT

Domain = Literal["polyvore", "djmix"]
Regime = Literal["oar", "wscr"]
PROFILE_ENV, CONFIG_ENV = "R4T_PROFILE", "R4T_CONFIG"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def version(self) -> str:
        return stable_hash(self.model_dump(mode="json"))


class CatalogSettings(Section):
    data_dir: str | None = Field(None, description="source data folder; None: $R4T_DATA_DIR, else ./data")
    allow_download: bool = True
    max_collections: dict[str, int | None] = Field(default_factory=lambda: {"polyvore": None, "djmix": None},
                                                   description="per-domain cap (random, fixed seed); None = all")
    seed: int = 0


class EncoderSettings(Section):
    kind: Literal["minilm", "open_clip"] = "minilm"
    dim: int = 128
    model_path: str | None = None
    clip_architecture: str = "ViT-B-32"
    clip_pretrained: str | None = None
    batch_size: int = 256


class IndexSettings(Section):
    kind: Literal["flat", "ivf", "hnsw"] = "flat"
    nlist: int | None = None
    nprobe: int = 16
    hnsw_m: int = 32


class QuerySettings(Section):
    max_template_queries: int = 2000
    max_title_queries: int | None = None
    max_wscr_pairs: int | None = None
    wscr_query_model: str | None = Field(None, description="causal LM naming untitled sets; None: keyword summary")
    seed: int = 0


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    profile: str = "demo"
    work_dir: str = Field(".r4t", description="artefact root; relative paths are under the repository")
    domains: list[Domain] = Field(default_factory=lambda: ["polyvore", "djmix"])
    regimes: list[Regime] = Field(default_factory=lambda: ["oar", "wscr"])
    mlflow_tracking_uri: str | None = Field(None, description="None: $MLFLOW_TRACKING_URI, else sqlite in work_dir")
    catalog: CatalogSettings = CatalogSettings()
    encoder: EncoderSettings = EncoderSettings()
    index: IndexSettings = IndexSettings()
    queries: QuerySettings = QuerySettings()

    @property
    def root(self) -> Path:
        root = Path(os.path.expandvars(self.work_dir)).expanduser()
        return (root if root.is_absolute() else REPO_ROOT / root) / self.profile

    def artefact(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    @property
    def tracking_uri(self) -> str:
        return (self.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
                or f"sqlite:///{self.root.parent / 'mlflow.db'}")


PROFILES: dict[str, dict] = {
    "demo": {
        "catalog": {"max_collections": {"polyvore": None, "djmix": 2500}},
    },
    "smoke": {
        "catalog": {"max_collections": {"polyvore": 60, "djmix": 40}},
        "queries": {"max_template_queries": 60, "max_title_queries": 30, "max_wscr_pairs": 60},
    },
    "paper": {
        "queries": {"max_template_queries": 40000},
    },
}


def deep_merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged


def load_settings(profile: str | None = None, config_path: str | os.PathLike | None = None,
                  overrides: dict | None = None) -> Settings:
    """Profile defaults, then the deployment YAML, then explicit overrides (tests)."""
    path = Path(config_path or os.environ.get(CONFIG_ENV) or REPO_ROOT / "resources" / "local.yaml")
    deployment = yaml.safe_load(path.read_text()) or {} if path.exists() else {}
    name = profile or os.environ.get(PROFILE_ENV) or deployment.pop("profile", None) or "demo"
    deployment.pop("profile", None)
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose one of {sorted(PROFILES)} (set ${PROFILE_ENV})")
    merged = deep_merge(deep_merge(PROFILES[name], deployment), overrides or {})
    return Settings.model_validate({**merged, "profile": name})
