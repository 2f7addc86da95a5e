import json

import pytest

from r4t_pipeline.cli import main


@pytest.fixture
def smoke_config(smoke, tmp_path, monkeypatch):
    config = tmp_path / "deploy.yaml"
    config.write_text(f"profile: smoke\nwork_dir: {smoke.root}\ncatalogs: {{polyvore: {{builtin: polyvore}}}}\n")
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


def one_line_error(capsys, argv: list[str]) -> str:
    """Runs the CLI on bad input: a non-zero exit, and exactly one line on stderr (no traceback)."""
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse refuses options at parse time
        code = exit_.code
    err = capsys.readouterr().err.strip()
    assert code != 0 and "Traceback" not in err, err
    return err.splitlines()[-1]


@pytest.mark.parametrize("argv, message", [
    (["retrieve", " "], "r4t retrieve: the query is empty"),
    (["retrieve", "x", "--domain", "shoes"], "unknown catalog 'shoes'; declared: polyvore"),
    (["retrieve", "x", "--per-direction", "0"], "expected a positive integer, got 0"),
    (["bench", "--batch-sizes", "0"], "argument --batch-sizes: expected a positive integer, got 0"),
    (["bench", "--batch-sizes", "abc"], "argument --batch-sizes: expected a positive integer, got 'abc'"),
    (["bench", "--repeats", "0"], "argument --repeats: expected a positive integer, got 0"),
    (["bench", "--methods", "magic"], "--methods: unknown method(s) ['magic']"),
])
def test_bad_arguments_get_one_line_errors(smoke_config, capsys, argv, message):
    assert message in one_line_error(capsys, argv)


def test_missing_artefacts_and_configuration_get_one_line_errors(smoke_config, capsys, tmp_path, monkeypatch):
    empty = tmp_path / "empty.yaml"
    empty.write_text(f"profile: smoke\nwork_dir: {tmp_path / 'nothing'}\n")
    monkeypatch.setenv("R4T_CONFIG", str(empty))
    line = one_line_error(capsys, ["retrieve", "x", "--method", "diffusion"])
    assert "polyvore/catalog has not been materialised" in line and "dagster asset materialize" in line
    assert "has not been materialised" in one_line_error(capsys, ["bench"])
    monkeypatch.setenv("R4T_CONFIG", str(tmp_path / "typo.yaml"))
    assert "typo.yaml: no such configuration file" in one_line_error(capsys, ["retrieve", "x"])
    empty.write_text("profile: smoke\nindex: {kind: [\n")
    monkeypatch.setenv("R4T_CONFIG", str(empty))
    assert "empty.yaml: malformed YAML at line" in one_line_error(capsys, ["retrieve", "x"])


def test_bench_writes_json_with_medians_and_ratios(smoke_config, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--batch-sizes", "2,4", "--repeats", "2", "--methods", "r4t_folm,r4t_diffusion",
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = report["results"]
    assert set(rows) == {"r4t_folm", "r4t_diffusion_sde256", "r4t_diffusion_heun4"}  # smoke: heun, 4 steps
    assert len(rows["r4t_folm"]["4"]["runs"]) == 2 and rows["r4t_diffusion_heun4"]["2"]["median_seconds"] > 0
    heun = rows["r4t_diffusion_heun4"]["4"]  # the two parts of a batch's time, each a median over the repeats
    assert 0 < heun["fanout_median_seconds"] and 0 < heun["search_median_seconds"] < heun["median_seconds"]
    assert set(report["folm_over_diffusion"]["r4t_diffusion_sde256"]) == {"2", "4"}
    assert report["machine"]["device"] == "cpu" and "| r4t_folm |" in capsys.readouterr().out


def test_expand_reads_the_materialised_modit_branch(smoke, smoke_config, capsys):
    from pathlib import Path

    from r4t_pipeline.modit.tasks import TaskData

    data = TaskData.load(Path(smoke.records.read("modit/polyvore_likes/task_data").path) / "task")
    seeds = data.seed_sets["pattern"]["test"]
    ids = ",".join(str(data.item_ids[n]) for n in seeds.members(0))
    assert main(["expand", "--domain", "polyvore", "--task", "likes", "--seeds", ids, "-k", "4",
                 "--protocol", "pattern", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["task"] == "polyvore_likes" and payload["method"] == "hppo" and len(payload["items"]) == 4
    assert not set(ids.split(",")) & {item["item_id"] for item in payload["items"]}  # seeds are not results
    assert all(isinstance(item["in_pattern"], bool) and "likes" in item for item in payload["items"])
    assert main(["expand", "--domain", "polyvore", "--task", "likes", "--seeds", ids, "--method",
                 "interpolation"]) == 0
    assert "items for" in capsys.readouterr().out


@pytest.mark.parametrize(("argv", "message"), [
    (["--task", "tempo", "--seeds", "x"], "unknown task 'tempo' for domain 'polyvore'"),
    (["--task", "likes", "--seeds", "x1,x2"], "unknown item id(s) ['x1', 'x2']"),
    (["--task", "likes", "--seeds", " , "], "no seed ids given"),
    (["--task", "likes", "--seeds", "x", "--domain", "shop"], "unknown catalog 'shop'"),
])
def test_expand_errors_are_one_line(smoke_config, capsys, argv, message):
    assert main(["expand", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("r4t expand: ") and message in err and len(err.strip().splitlines()) == 1


def test_best_of_n_retrieves_items_reference_free(smoke_config, capsys):
    # WSCR's reward needs the reference set, which a user's query does not have: Best-of-N selects without it
    assert main(["retrieve", "summer linen dress", "--method", "best_of_n", "--regime", "wscr", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["method"] == "best_of_n" and payload["directions"] and payload["merged"]
