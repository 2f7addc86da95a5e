"""Catalog embeddings: E_c of every item, and one vector per collection (the OAR database)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from r4t_pipeline.catalog import Catalog
from r4t_pipeline.encoders import EmbeddingSpace, l2_normalize
from r4t_pipeline.io import atomic_dir


@dataclass
class CatalogEmbeddings:
    item_ids: np.ndarray
    items: np.ndarray            # (n_items, d), L2-normalised, row i is item_ids[i]
    collection_ids: np.ndarray
    collections: np.ndarray      # (n_collections, d): normalised mean of the collection's item vectors
    encoder: str

    @property
    def dim(self) -> int:
        return self.items.shape[1]

    def save(self, path: str | Path) -> None:
        with atomic_dir(path) as tmp:
            for name in ("item_ids", "items", "collection_ids", "collections"):
                np.save(tmp / f"{name}.npy", getattr(self, name))
            (tmp / "embeddings.json").write_text(json.dumps({"encoder": self.encoder, "dim": self.dim,
                                                             "items": len(self.items),
                                                             "collections": len(self.collections)}))

    @classmethod
    def load(cls, path: str | Path) -> CatalogEmbeddings:
        path = Path(path)
        if not (path / "embeddings.json").exists():
            raise FileNotFoundError(f"no embeddings at {path}; materialise the item_embeddings asset first")
        meta = json.loads((path / "embeddings.json").read_text())
        names = ("item_ids", "items", "collection_ids", "collections")
        arrays = {name: np.load(path / f"{name}.npy") for name in names}
        return cls(**arrays, encoder=meta["encoder"])


def embed_catalog(catalog: Catalog, space: EmbeddingSpace) -> CatalogEmbeddings:
    paths = catalog.items["image_path"].to_list()
    items = space.encode_items(catalog.items["text"].to_list(), paths if any(paths) else None)
    item_ids = catalog.items["item_id"].to_list()
    position = {item_id: row for row, item_id in enumerate(item_ids)}
    collections = np.stack([items[[position[i] for i in ids]].mean(axis=0)
                            for ids in catalog.collections["item_ids"].to_list()])
    return CatalogEmbeddings(np.asarray(item_ids, dtype=str), items,
                             np.asarray(catalog.collections["collection_id"].to_list(), dtype=str),
                             l2_normalize(collections), space.name)
