import numpy as np
import pytest

from r4t_pipeline.index import VectorIndex


@pytest.fixture(scope="module")
def clustered_vectors():
    """Unit vectors in 64 clusters: the shape real item embeddings have (approximate indexes need it)."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(64, 128))
    vectors = centres[rng.integers(0, 64, 8000)] + 0.6 * rng.normal(size=(8000, 128))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def test_flat_is_exact(clustered_vectors):
    index = VectorIndex.build(clustered_vectors, np.arange(len(clustered_vectors)).astype(str), "flat")
    queries = clustered_vectors[:50] + 0.01
    scores, positions = index.search(queries, k=5)
    brute = np.argsort(-(queries @ clustered_vectors.T), axis=1)[:, :5]
    np.testing.assert_array_equal(positions, brute)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_recall_against_exact(clustered_vectors, kind):
    ids = np.arange(len(clustered_vectors)).astype(str)
    exact = VectorIndex.build(clustered_vectors, ids, "flat")
    approx = VectorIndex.build(clustered_vectors, ids, kind, nprobe=16)
    queries = clustered_vectors[::40]
    _, truth = exact.search(queries, 10)
    _, found = approx.search(queries, 10)
    recall = np.mean([len(set(t) & set(f)) / 10 for t, f in zip(truth, found)])
    assert recall >= 0.9, f"{kind} recall@10 = {recall:.3f}"


def test_save_load_and_batched_search(tmp_path, clustered_vectors):
    index = VectorIndex.build(clustered_vectors[:1000], [f"item{i}" for i in range(1000)], "hnsw")
    index.save(tmp_path / "idx")
    loaded = VectorIndex.load(tmp_path / "idx")
    loaded.search_batch = 7  # forces several batches
    a = index.search(clustered_vectors[:30], 4)
    b = loaded.search(clustered_vectors[:30], 4)
    np.testing.assert_array_equal(a[1], b[1])
    assert loaded.ids[b[1][0, 0]] == "item0" and loaded.kind == "hnsw"
    np.testing.assert_array_equal(loaded.vectors, clustered_vectors[:1000])


def test_errors_name_the_problem(tmp_path, clustered_vectors):
    index = VectorIndex.build(clustered_vectors[:10], list("abcdefghij"), "flat")
    with pytest.raises(ValueError, match="query vectors have dim 3, index has dim 128"):
        index.search(np.ones((1, 3)), 2)
    with pytest.raises(FileNotFoundError, match="materialise the embedding_index asset"):
        VectorIndex.load(tmp_path / "nothing")
    with pytest.raises(ValueError, match="unknown index kind 'lsh'"):
        VectorIndex.build(clustered_vectors[:10], list("abcdefghij"), "lsh")
