"""FAISS nearest-neighbour index over L2-normalised vectors (inner product = cosine).

`flat` is exact and the default; `ivf` and `hnsw` trade a little recall for speed on large catalogs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import faiss
import numpy as np

from r4t_pipeline.io import atomic_dir

IndexKind = Literal["flat", "ivf", "hnsw"]

# Exact search switches from FAISS's per-pair SIMD scan to one BLAS matrix product when nq x d reaches this.
# faiss 1.15 set it to 128,000, tuned for dozens of threads; on a few (PR facebookresearch/faiss#5109) BLAS wins
# from nq x d ~ 800 per thread: 80 directions (d = 128) take 3.7 ms instead of 27 ms on one core.
faiss.cvar.distance_compute_blas_threshold = 800 * faiss.omp_get_max_threads()


class VectorIndex:
    """`vectors` are kept beside the FAISS structure: rewards need E_c of retrieved items, and IVF/HNSW
    cannot always reconstruct them."""

    def __init__(self, index: faiss.Index, ids: np.ndarray, vectors: np.ndarray, kind: IndexKind,
                 search_batch: int = 4096):
        if not index.ntotal == len(ids) == len(vectors):
            raise ValueError(f"index holds {index.ntotal} vectors but {len(ids)} ids and {len(vectors)} rows "
                             "were given")
        self.index, self.ids, self.vectors, self.kind = index, np.asarray(ids), vectors, kind
        self.search_batch = search_batch

    @classmethod
    def build(cls, vectors: np.ndarray, ids: np.ndarray | list[str], kind: IndexKind = "flat", *,
              nlist: int | None = None, nprobe: int = 16, hnsw_m: int = 32, ef_search: int = 128,
              seed: int = 0) -> VectorIndex:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        n, dim = vectors.shape
        if kind == "flat":
            index = faiss.IndexFlatIP(dim)
        elif kind == "ivf":
            nlist = nlist or max(1, min(4096, int(4 * np.sqrt(n))))
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.cp.seed = seed
            index.train(vectors)
            index.nprobe = min(nprobe, nlist)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efSearch = ef_search
        else:
            raise ValueError(f"unknown index kind {kind!r}; expected 'flat', 'ivf' or 'hnsw'")
        index.add(vectors)
        return cls(index, np.asarray(ids), vectors, kind)

    @property
    def dim(self) -> int:
        return self.index.d

    def __len__(self) -> int:
        return self.index.ntotal

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, row positions) per query row, searched in batches. Positions index `self.ids`."""
        vectors = np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)
        if vectors.shape[1] != self.dim:
            raise ValueError(f"query vectors have dim {vectors.shape[1]}, index has dim {self.dim}")
        k = min(k, len(self))
        scores = np.empty((len(vectors), k), np.float32)
        positions = np.empty((len(vectors), k), np.int64)
        for start in range(0, len(vectors), self.search_batch):
            stop = start + self.search_batch
            scores[start:stop], positions[start:stop] = self.index.search(vectors[start:stop], k)
        return scores, positions

    def save(self, path: str | Path) -> None:
        with atomic_dir(path) as tmp:
            faiss.write_index(self.index, str(tmp / "index.faiss"))
            np.save(tmp / "ids.npy", self.ids.astype(str))
            np.save(tmp / "vectors.npy", self.vectors)
            (tmp / "index.json").write_text(json.dumps({"kind": self.kind, "dim": self.dim, "size": len(self)}))

    @classmethod
    def load(cls, path: str | Path) -> VectorIndex:
        path = Path(path)
        if not (path / "index.faiss").exists():
            raise FileNotFoundError(f"no FAISS index at {path}; materialise the embedding_index asset first")
        meta = json.loads((path / "index.json").read_text())
        return cls(faiss.read_index(str(path / "index.faiss")), np.load(path / "ids.npy"),
                   np.load(path / "vectors.npy"), meta["kind"])
