"""What assets hand each other: small typed records pointing at artefacts on disk (the IO manager
pickles these records; the heavy data stays in Parquet, NumPy, FAISS and safetensors files)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Artefact(BaseModel):
    model_config = ConfigDict(frozen=True)
    domain: str
    path: str


class CatalogArtefact(Artefact):
    items: int
    collections: int


class EmbeddingsArtefact(Artefact):
    encoder: str
    dim: int


class IndexArtefact(BaseModel):
    model_config = ConfigDict(frozen=True)
    domain: str
    items_path: str
    collections_path: str
    kind: str


class QueryCorpusArtefact(Artefact):
    counts: dict[str, dict[str, int]]
