import json

import pytest

from r4t_pipeline.cli import main


@pytest.fixture
def smoke_config(smoke, tmp_path, monkeypatch):
    config = tmp_path / "deploy.yaml"
    config.write_text(f"profile: smoke\nwork_dir: {smoke.root}\ndomains: [polyvore]\n")
    monkeypatch.setenv("R4T_CONFIG", str(config))
    monkeypatch.delenv("R4T_PROFILE", raising=False)
    return config


def test_retrieve_prints_items_grouped_by_direction(smoke_config, capsys):
    assert main(["retrieve", "bohemian festival style", "--domain", "polyvore", "--method", "diffusion"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("'bohemian festival style' -> 10 directions (r4t_diffusion, polyvore/wscr)")
    assert out.count("(generated direction)") == 10


def test_retrieve_json(smoke_config, capsys):
    assert main(["retrieve", "office essentials", "--method", "no_fanout", "--regime", "oar", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["method"] == "no_fanout" and len(payload["directions"]) == 1
    assert len(payload["directions"][0]["items"]) == 5 and payload["merged"]


def test_bad_arguments_get_one_line_errors(smoke_config, capsys, tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="the query is empty"):
        main(["retrieve", " "])
    with pytest.raises(SystemExit):
        main(["retrieve", "x", "--domain", "shoes"])
    assert "invalid choice: 'shoes'" in capsys.readouterr().err
    empty = tmp_path / "empty.yaml"
    empty.write_text(f"profile: smoke\nwork_dir: {tmp_path / 'nothing'}\n")
    monkeypatch.setenv("R4T_CONFIG", str(empty))
    with pytest.raises(SystemExit, match="no FAISS index at .* materialise the embedding_index asset"):
        main(["retrieve", "x", "--method", "diffusion"])


def test_bench_writes_json_with_medians_and_ratios(smoke_config, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--batch-sizes", "2,4", "--repeats", "2", "--methods", "r4t_folm,r4t_diffusion",
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = report["results"]
    assert set(rows) == {"r4t_folm", "r4t_diffusion_sde256", "r4t_diffusion_heun16"}
    assert len(rows["r4t_folm"]["4"]["runs"]) == 2 and rows["r4t_diffusion_heun16"]["2"]["median_seconds"] > 0
    assert set(report["folm_over_diffusion"]["r4t_diffusion_sde256"]) == {"2", "4"}
    assert report["machine"]["device"] == "cpu" and "| r4t_folm |" in capsys.readouterr().out
