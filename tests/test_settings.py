import os
import subprocess
import sys

import pytest

from r4t_pipeline.settings import SettingsError, load_settings


def test_profiles_and_overrides(tmp_path):
    smoke = load_settings("smoke", config_path=os.devnull)
    demo = load_settings("demo", config_path=os.devnull)
    assert smoke.profile == "smoke" and smoke.catalog.max_collections["polyvore"] == 60
    assert demo.encoder.dim == 128 and demo.index.kind == "flat"
    quality = load_settings("quality", config_path=os.devnull)  # the demo with the pretrained FOLM, by LoRA
    assert (quality.folm.base, quality.folm.sft_lora_rank, quality.folm.train.lora_rank) == ("pretrained", 16, 16)
    assert quality.catalog == demo.catalog and quality.folm.train.group_size == demo.folm.train.group_size
    deployment = tmp_path / "deploy.yaml"
    deployment.write_text("profile: smoke\nindex: {kind: hnsw}\n")
    custom = load_settings(config_path=deployment)
    assert custom.profile == "smoke" and custom.index.kind == "hnsw"


def test_section_versions_follow_their_config():
    base = load_settings("smoke", config_path=os.devnull)
    changed = load_settings("smoke", config_path=os.devnull, overrides={"index": {"kind": "ivf"}})
    assert base.index.version() != changed.index.version()
    assert base.encoder.version() == changed.encoder.version()


def test_r4t_denoisers_generate_offsets_from_the_query_unless_told_not_to():
    for profile in ("smoke", "demo", "quality", "paper"):
        settings = load_settings(profile, config_path=os.devnull)
        assert settings.diffusion.train.query_residual, profile
        assert not settings.modit.raw.query_residual  # MO-DiT conditions on seed sequences
    absolute = load_settings("smoke", config_path=os.devnull,
                             overrides={"diffusion": {"train": {"query_residual": False}}})
    assert not absolute.diffusion.train.query_residual
    assert absolute.diffusion.version() != load_settings("smoke", config_path=os.devnull).diffusion.version()


def test_bad_settings_are_rejected_in_one_line(tmp_path):
    with pytest.raises(SettingsError, match="unknown profile 'huge'"):
        load_settings("huge", config_path=os.devnull)
    with pytest.raises(SettingsError, match=r"^settings: encoder.dimm: Extra inputs are not permitted$"):
        load_settings("smoke", config_path=os.devnull, overrides={"encoder": {"dimm": 3}})
    with pytest.raises(SettingsError, match="typo.yaml: no such configuration file"):
        load_settings(config_path=tmp_path / "typo.yaml")  # a mistyped $R4T_CONFIG is an error, not the defaults
    broken = tmp_path / "broken.yaml"
    broken.write_text("profile: smoke\nindex: {kind: [hnsw\n")
    with pytest.raises(SettingsError, match="broken.yaml: malformed YAML at line 3 column 1"):
        load_settings(config_path=broken)
    broken.write_text("- just\n- a list\n")
    with pytest.raises(SettingsError, match="broken.yaml: expected a mapping of settings, got list"):
        load_settings(config_path=broken)
    with pytest.raises(SettingsError, match="query_runtime onnx runs the minilm encoder, not 'open_clip'"):
        load_settings("demo", config_path=os.devnull, overrides={"encoder": {"kind": "open_clip"}})
    with pytest.raises(SettingsError, match="folm: Value error, sft_steps: the bootstrap LM starts from random"):
        load_settings("demo", config_path=os.devnull, overrides={"folm": {"sft_steps": 0}})


def test_loading_the_settings_and_the_cli_help_do_not_import_torch():
    code = "import sys, r4t_pipeline.cli, r4t_pipeline.settings; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False", "settings or the CLI pulled in torch (seconds of start-up for `r4t --help`)"


def test_typed_lines_need_decoding_that_may_repeat_the_title():
    with pytest.raises(ValueError, match="no_repeat_ngram_size"):
        load_settings("smoke", config_path=os.devnull, overrides={"folm": {"sft_lines": "typed"}})
    typed = load_settings("smoke", config_path=os.devnull,
                          overrides={"folm": {"sft_lines": "typed", "train": {"no_repeat_ngram_size": 0}}})
    assert typed.folm.version("oar") != load_settings("smoke", config_path=os.devnull).folm.version("oar")


def test_a_regime_trains_with_its_own_overrides_and_the_other_keeps_its_version():
    def folm(overrides: dict):
        return load_settings("smoke", config_path=os.devnull, overrides={"folm": overrides}).folm

    shared, tuned = folm({}), folm({"train_overrides": {"oar": {"learning_rate": "3e-4"}}})
    assert tuned.train_for("oar").learning_rate == 3e-4 and tuned.train_for("wscr") == shared.train
    assert tuned.version("wscr") == shared.version("wscr") and tuned.version("oar") != shared.version("oar")
    assert (folm({"train": {"learning_rate": 3e-4}}).version("oar") == tuned.version("oar")), \
        "the version follows the configuration the regime trains with, not where it was written"
    with pytest.raises(ValueError, match=r"folm\.train_overrides\.oar: learning_rat: Extra inputs"):
        folm({"train_overrides": {"oar": {"learning_rat": 3e-4}}})
    with pytest.raises(ValueError, match=r"folm\.train_overrides\.wscr: steps: Input should be greater than"):
        folm({"train_overrides": {"wscr": {"steps": 0}}})
    with pytest.raises(ValueError, match="train_overrides"):
        folm({"train_overrides": {"oaar": {"steps": 2}}})
