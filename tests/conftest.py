"""Test setup: real data from the shared data directory, offline models, isolated artefact roots."""

import os
from pathlib import Path
from types import SimpleNamespace

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


@pytest.fixture(scope="session")
def smoke(tmp_path_factory):
    """The whole asset graph of the smoke profile (Polyvore, both regimes), materialised once through
    Dagster on a real ephemeral instance: later tests read its artefacts."""
    import dagster as dg

    from r4t_pipeline.defs import build_definitions
    from r4t_pipeline.settings import load_settings

    root = tmp_path_factory.mktemp("r4t")
    settings = load_settings("smoke", config_path=root / "none.yaml",
                             overrides={"work_dir": str(root), "domains": ["polyvore"]})
    defs = build_definitions(settings)
    result = dg.materialize(list(defs.assets) + list(defs.asset_checks), resources=defs.resources,
                            instance=dg.DagsterInstance.ephemeral())
    return SimpleNamespace(settings=settings, defs=defs, result=result, root=root)
