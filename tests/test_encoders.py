import numpy as np
import pytest
from PIL import Image

from r4t_pipeline.encoders import EmbeddingCache, EmbeddingSpace, MiniLMEncoder, OpenClipEncoder, truncate_normalize


class CountingMiniLM(MiniLMEncoder):
    """The real MiniLM encoder, counting how many texts actually reach the model."""

    encoded = 0

    def encode_texts(self, texts, batch_size):
        self.encoded += len(texts)
        return super().encode_texts(texts, batch_size)


def test_truncation_then_normalisation():
    vectors = np.array([[3.0, 4.0, 12.0], [1.0, 0.0, 5.0]], np.float32)
    out = truncate_normalize(vectors, 2)
    np.testing.assert_allclose(out, [[0.6, 0.8], [1.0, 0.0]], atol=1e-6)
    with pytest.raises(ValueError, match="exceeds the encoder's native dim 3"):
        truncate_normalize(vectors, 4)


def test_minilm_embeds_related_texts_closer(minilm_space):
    vectors = minilm_space.encode_queries(["bohemian festival dress", "boho maxi dress for a festival",
                                           "leather laptop bag for the office"])
    assert vectors.shape == (3, 128)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    sims = vectors @ vectors.T
    assert sims[0, 1] > sims[0, 2] + 0.2


def test_minilm_in_onnx_runtime_gives_the_pytorch_embeddings_and_exports_once(tmp_path):
    texts = ["red dress", "a long description of a vintage leather jacket " * 12, "boho", "straw hat for summer"]
    eager, onnx = MiniLMEncoder(), MiniLMEncoder(onnx_dir=tmp_path)
    for batch, batch_size in ((texts[:1], 8), (texts, 3)):  # one text; batches of different lengths, truncated
        np.testing.assert_allclose(onnx.encode_texts(batch, batch_size), eager.encode_texts(batch, batch_size),
                                   atol=1e-5)
    exported = list(tmp_path.glob("*.onnx"))
    assert len(exported) == 1
    written = exported[0].stat().st_mtime_ns
    assert MiniLMEncoder(onnx_dir=tmp_path).onnx.path == exported[0]  # a second process loads the file
    assert exported[0].stat().st_mtime_ns == written and len(list(tmp_path.iterdir())) == 1  # no temp file left


def test_cache_means_unchanged_texts_are_never_reencoded(tmp_path):
    encoder = CountingMiniLM()
    cache = EmbeddingCache(tmp_path / "emb.sqlite")
    texts = ["red dress", "black boots", "red dress"]
    first = EmbeddingSpace(encoder, 64, cache).encode_items(texts)
    assert encoder.encoded == 2  # the duplicate is encoded once
    again = EmbeddingSpace(encoder, 32, cache).encode_items(texts + ["straw hat"])  # new dim, same cache
    assert encoder.encoded == 3  # only the new text
    np.testing.assert_allclose(again[:3], truncate_normalize(first, 32), atol=1e-6)


def test_open_clip_code_path_with_random_weights(tmp_path):
    encoder = OpenClipEncoder("ViT-B-32", pretrained=None, device="cpu")
    space = EmbeddingSpace(encoder, dim=128)
    image = tmp_path / "item.png"
    Image.fromarray((np.random.default_rng(0).random((64, 48, 3)) * 255).astype("uint8")).save(image)
    items = space.encode_items(["red dress", "black boots"], image_paths=[str(image), None])
    text_only = space.encode_queries(["red dress", "black boots"])
    assert items.shape == (2, 128) and encoder.native_dim == 512
    np.testing.assert_allclose(items[1], text_only[1], atol=1e-5)   # no image: its text embedding
    assert not np.allclose(items[0], text_only[0], atol=1e-3)       # image: the image tower
