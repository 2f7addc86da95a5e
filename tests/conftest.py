"""Test setup: real data from the shared data directory, offline models, isolated artefact roots."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("R4T_DATA_DIR", str(REPO.parent / "shared" / "data"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
DATA_DIR = Path(os.environ["R4T_DATA_DIR"])


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA_DIR


@pytest.fixture(scope="session")
def polyvore_catalog(data_dir):
    from r4t_pipeline.sources import load_polyvore

    return load_polyvore(data_dir, allow_download=False)


@pytest.fixture(scope="session")
def minilm_space():
    from r4t_pipeline.encoders import EmbeddingSpace, MiniLMEncoder

    return EmbeddingSpace(MiniLMEncoder(), dim=128)
