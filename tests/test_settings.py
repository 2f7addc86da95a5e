import pytest

from r4t_pipeline.settings import load_settings


def test_profiles_and_overrides(tmp_path):
    smoke = load_settings("smoke", config_path=tmp_path / "none.yaml")
    demo = load_settings("demo", config_path=tmp_path / "none.yaml")
    assert smoke.profile == "smoke" and smoke.catalog.max_collections["polyvore"] == 60
    assert demo.encoder.dim == 128 and demo.index.kind == "flat"
    deployment = tmp_path / "deploy.yaml"
    deployment.write_text("profile: smoke\nindex: {kind: hnsw}\n")
    custom = load_settings(config_path=deployment)
    assert custom.profile == "smoke" and custom.index.kind == "hnsw"


def test_section_versions_follow_their_config(tmp_path):
    base = load_settings("smoke", config_path=tmp_path / "none.yaml")
    changed = load_settings("smoke", config_path=tmp_path / "none.yaml", overrides={"index": {"kind": "ivf"}})
    assert base.index.version() != changed.index.version()
    assert base.encoder.version() == changed.encoder.version()


def test_bad_settings_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown profile 'huge'"):
        load_settings("huge", config_path=tmp_path / "none.yaml")
    with pytest.raises(ValueError, match="dimm"):
        load_settings("smoke", config_path=tmp_path / "none.yaml", overrides={"encoder": {"dimm": 3}})
