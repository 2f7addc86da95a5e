"""Operations on a real (on-disk SQLite) Dagster instance: code versions and staleness after a config or a
source change, the catalog sensor, the retraining schedule, retry policies, and what a failed run leaves.

The smoke profile for Polyvore OAR with training shrunk further (TINY), so that the chain from the catalog
to the diffusion checkpoint materialises in about half a minute on 2 cores."""

from __future__ import annotations

import datetime
import gzip
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView, TemporalContext
from dagster._core.definitions.data_version import DATA_VERSION_TAG, CachingStaleStatusResolver, StaleStatus

from r4t_pipeline.catalogs import BUILTINS, catalog_registry
from r4t_pipeline.config import deep_merge
from r4t_pipeline.defs import build_definitions
from r4t_pipeline.defs.schedules import RETRAINING_CRON, SCHEDULE_NAME
from r4t_pipeline.defs.sensors import SENSOR_NAME
from r4t_pipeline.io import file_sha256
from r4t_pipeline.records import RecordStore
from r4t_pipeline.settings import Settings, load_settings

SOURCE, CATALOG = "polyvore/catalog_source", "polyvore/catalog"
FOUNDATION = {CATALOG, "polyvore/item_embeddings", "polyvore/embedding_index", "polyvore/broad_queries",
              "polyvore/folm_base"}
TRAINING = ["polyvore/oar/folm_checkpoint", "polyvore/oar/synthetic_targets", "polyvore/oar/diffusion_checkpoint"]
REPORTING = {"polyvore/oar/evaluation", "latency_benchmark", "evaluation_report"}
MODIT = {*(f"modit/polyvore_{t}/task_data" for t in ("likes", "price")), "modit/evaluation",
         *(f"modit/{p}/{s}" for p in ("item", "pattern") for s in ("raw", "ordered", "tail", "hppo"))}
LONG_ASSETS = ["polyvore/folm_base", *TRAINING]
REWARD_CHANGE = {"rewards": {"overrides": {"oar": {"w_diversity": 0.3}}}}
TINY = {"catalogs": {"polyvore": {"builtin": "polyvore"}}, "regimes": ["oar"],
        "folm": {"sft_steps": 2,
                 "bootstrap_size": {"vocab_size": 300, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                                    "num_layers": 1},
                 "train": {"steps": 1, "group_size": 2, "per_step_queries": 1, "max_new_tokens": 16}},
        "synth": {"samples_per_query": 2, "max_queries": 2, "max_new_tokens": 16, "chunk_queries": 2},
        "diffusion": {"train": {"steps": 2, "checkpoint_every": 1}}}


def key(name: str) -> dg.AssetKey:
    return dg.AssetKey.from_user_string(name)


def copy_sources(data_dir: Path, source: Path, domain: str = "polyvore") -> Path:
    """A writable copy of the domain's source files (the shared data directory is read-only)."""
    (data_dir / domain).mkdir(parents=True, exist_ok=True)
    for spec in BUILTINS[domain][1]:
        shutil.copyfile(source / domain / spec.name, data_dir / domain / spec.name)
    return data_dir


def retitle_first_outfit(data_dir: Path) -> None:
    """A real edit of the source: one outfit title changes."""
    path = data_dir / "polyvore" / "valid_no_dup.json.gz"
    outfits = json.loads(gzip.decompress(path.read_bytes()))
    outfits[0]["name"] += " (retitled)"
    path.write_bytes(gzip.compress(json.dumps(outfits).encode()))


def shared_mlflow_uri(tmp_path_factory) -> str:
    """One MLflow store for the operations tests: creating a fresh SQLite store costs ~10 s of migrations."""
    return f"sqlite:///{tmp_path_factory.getbasetemp() / 'r4t-operations-mlflow.db'}"


def materialise(defs: dg.Definitions, instance: dg.DagsterInstance, selection, **kwargs):
    return dg.materialize(list(defs.assets), selection=selection, resources=defs.resources, instance=instance,
                          **kwargs)


def stale_assets(instance: dg.DagsterInstance, defs: dg.Definitions) -> tuple[dict[str, list[str]], set[str]]:
    """(what Dagster reports STALE, with the reasons; what "materialise stale" must rebuild).

    Dagster 1.13 reports only an asset whose own code version or direct inputs changed; the assets below it
    turn stale one by one as their inputs are rebuilt. What a change invalidates, and what one
    "materialise stale" run rebuilds, is therefore every materialised asset at or below a reported one."""
    graph = defs.resolve_asset_graph()
    view = AssetGraphView(temporal_context=TemporalContext(effective_dt=datetime.datetime.now(datetime.timezone.utc),
                                                           last_event_id=None),
                          instance=instance, asset_graph=graph)
    resolver = CachingStaleStatusResolver(instance, graph, view)
    status = {k: resolver.get_status(k) for k in graph.materializable_asset_keys}
    reported = {k: [cause.reason for cause in resolver.get_stale_causes(k)]
                for k, s in status.items() if s == StaleStatus.STALE}
    below = dg.AssetSelection.assets(*reported).downstream().resolve(graph) if reported else set()
    return ({k.to_user_string(): v for k, v in reported.items()},
            {k.to_user_string() for k in below if status[k] != StaleStatus.MISSING})


def latest_runs(instance: dg.DagsterInstance, names) -> dict[str, str | None]:
    """The run that wrote each asset's latest materialisation."""
    events = {name: instance.get_latest_materialization_event(key(name)) for name in names}
    return {name: event.run_id if event else None for name, event in events.items()}


@dataclass
class Pipeline:
    """Polyvore OAR materialised from the catalog to the diffusion checkpoint on a real instance."""

    root: Path
    data_dir: Path
    instance: dg.DagsterInstance
    overrides: dict

    def settings(self, changes: dict | None = None) -> Settings:
        return load_settings("smoke", config_path=os.devnull, overrides=deep_merge(self.overrides, changes or {}))

    def defs(self, changes: dict | None = None) -> dg.Definitions:
        return build_definitions(self.settings(changes))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("operations")
    sources = copy_sources(root / "data", data_dir)
    (root / "dagster").mkdir()
    instance = dg.DagsterInstance.local_temp(tempdir=str(root / "dagster"), overrides={"telemetry": {"enabled": False}})
    overrides = {**TINY, "work_dir": str(root / "work"), "catalog": {"data_dir": str(sources)},
                 "mlflow_tracking_uri": shared_mlflow_uri(tmp_path_factory)}
    pipe = Pipeline(root, sources, instance, overrides)
    defs = pipe.defs()
    assert materialise(defs, instance, [key(SOURCE)]).success  # observe the source first: lineage starts there
    chain = dg.AssetSelection.assets(key(TRAINING[-1])).upstream() - dg.AssetSelection.assets(key(SOURCE))
    assert materialise(defs, instance, chain).success
    yield pipe
    instance.dispose()


@pytest.fixture(scope="module")
def reward_change(pipeline):
    """Change one reward weight, then "materialise stale" against the same instance."""
    defs = pipeline.defs(REWARD_CHANGE)
    fresh_before = stale_assets(pipeline.instance, pipeline.defs())
    reported, stale = stale_assets(pipeline.instance, defs)
    before = latest_runs(pipeline.instance, FOUNDATION | set(TRAINING))
    result = materialise(defs, pipeline.instance, [key(name) for name in stale])
    return {"defs": defs, "fresh_before": fresh_before, "reported": reported, "stale": stale, "before": before,
            "result": result, "after": latest_runs(pipeline.instance, FOUNDATION | set(TRAINING)),
            "stale_after": stale_assets(pipeline.instance, defs)}


def source_fingerprint(settings, name: str) -> str:
    return catalog_registry(settings)[name].source.data_version()


@pytest.fixture(scope="module")
def smoke_defs(tmp_path_factory) -> dg.Definitions:
    root = tmp_path_factory.mktemp("smoke-defs")
    return build_definitions(load_settings("smoke", config_path=os.devnull, overrides={"work_dir": str(root)}))


# ---- 1. lineage and staleness ------------------------------------------------------------------------------

CODE_VERSION_CASES = {
    "catalog cap": ({"catalog": {"max_collections": {"polyvore": 50}}}, {CATALOG}),
    "encoder dim": ({"encoder": {"dim": 64}}, {"polyvore/item_embeddings"}),
    "index kind": ({"index": {"kind": "hnsw"}}, {"polyvore/embedding_index"}),
    "query corpus": ({"queries": {"max_template_queries": 50}}, {"polyvore/broad_queries"}),
    "reward weight": (REWARD_CHANGE, {"polyvore/oar/folm_checkpoint", "polyvore/oar/synthetic_targets",
                                      "polyvore/oar/evaluation"}),  # its validation reward and Best-of-N read it
    "RL steps": ({"folm": {"train": {"steps": 3}}}, {"polyvore/oar/folm_checkpoint"}),
    "RL rate of one regime": ({"folm": {"train_overrides": {"oar": {"learning_rate": 1e-3}}}},
                              {"polyvore/oar/folm_checkpoint"}),
    "override restating the shared value": ({"folm": {"train_overrides": {"oar": {"steps": 1}}}}, set()),
    "synthesis": ({"synth": {"samples_per_query": 3}}, {"polyvore/oar/synthetic_targets"}),
    "diffusion steps": ({"diffusion": {"train": {"steps": 3}}},
                        {"polyvore/oar/diffusion_checkpoint", "polyvore/supervised_diffusion"}),
    "evaluation": ({"evaluation": {"max_queries": 3}}, {"polyvore/oar/evaluation"}),
    "serve load": ({"evaluation": {"serve_requests": 7}}, {"latency_benchmark"}),
    "diffusion sampler": ({"diffusion": {"guidance": 0.5}}, {"polyvore/oar/evaluation", "latency_benchmark"}),
    "MO-DiT splits": ({"modit": {"splits": {"seed": 1}}},
                      {"modit/polyvore_likes/task_data", "modit/polyvore_price/task_data"}),
    "MO-DiT tail stage": ({"modit": {"tail": {"steps": 3}}}, {"modit/item/tail", "modit/pattern/tail"}),
    "MO-DiT HPPO beta": ({"modit": {"hppo": {"beta": 50.0}}}, {"modit/item/hppo", "modit/pattern/hppo"}),
    "MO-DiT evaluation": ({"modit": {"evaluation": {"ks": [5, 20]}}}, {"modit/evaluation"}),
}


def code_versions(tmp_path: Path, changes: dict) -> dict[str, str | None]:
    settings = load_settings("smoke", config_path=os.devnull,
                             overrides=deep_merge({**TINY, "work_dir": str(tmp_path)}, changes))
    graph = build_definitions(settings).resolve_asset_graph()
    return {k.to_user_string(): graph.get(k).code_version for k in graph.materializable_asset_keys}


@pytest.mark.parametrize("changes, changed", CODE_VERSION_CASES.values(), ids=CODE_VERSION_CASES.keys())
def test_a_config_change_moves_only_the_code_version_of_the_asset_it_configures(tmp_path, changes, changed):
    baseline, after = code_versions(tmp_path, {}), code_versions(tmp_path, changes)
    assert all(baseline.values()), {k for k, v in baseline.items() if not v}
    assert {name for name in baseline if baseline[name] != after[name]} == changed


def test_a_result_version_bump_moves_only_the_evaluations_of_its_regime(tmp_path, monkeypatch):
    """When what one regime's evaluation returns changes meaning, the other regime's evaluations stay fresh."""
    from r4t_pipeline.evaluation import RESULT_VERSION

    both = {"regimes": ["oar", "wscr"]}
    baseline = code_versions(tmp_path, both)
    monkeypatch.setitem(RESULT_VERSION, "wscr", RESULT_VERSION["wscr"] + 1)
    after = code_versions(tmp_path, both)
    assert {name for name in baseline if baseline[name] != after[name]} == {"polyvore/wscr/evaluation"}


def test_a_reward_weight_change_marks_exactly_the_folm_and_its_downstream_stale(reward_change):
    assert reward_change["fresh_before"] == ({}, set())
    assert reward_change["reported"] == {"polyvore/oar/folm_checkpoint": ["has a new code version"],
                                         "polyvore/oar/synthetic_targets": ["has a new code version"]}
    assert reward_change["stale"] == set(TRAINING)  # not the catalog, the index, the corpus or the base FOLM


def test_materialise_stale_reruns_only_the_stale_assets(reward_change):
    result, before, after = reward_change["result"], reward_change["before"], reward_change["after"]
    assert result.success
    rerun = {m.asset_key.to_user_string() for m in result.get_asset_materialization_events()}
    assert rerun == set(TRAINING)
    assert {name for name in after if after[name] != before[name]} == set(TRAINING)
    assert all(after[name] == result.run_id for name in TRAINING)
    assert reward_change["stale_after"] == ({}, set())


def test_rematerialising_after_a_reward_change_trains_anew(reward_change):
    meta = {m.asset_key.to_user_string(): m.materialization.metadata
            for m in reward_change["result"].get_asset_materialization_events()}
    assert meta["polyvore/oar/folm_checkpoint"]["resumed_from_step"].value == 0
    # new targets (a new version, even when a one-step tiny FOLM samples the very same fan-outs) train a new model
    assert meta["polyvore/oar/diffusion_checkpoint"]["steps_run"].value == TINY["diffusion"]["train"]["steps"]
    assert not any(m["reused"].value for m in meta.values())


def test_a_catalog_source_change_marks_everything_downstream_of_the_catalog_stale(pipeline, reward_change):
    defs = reward_change["defs"]  # the configuration now in force
    retitle_first_outfit(pipeline.data_dir)
    observed = materialise(defs, pipeline.instance, [key(SOURCE)])
    [observation] = observed.asset_observations_for_node("polyvore__catalog_source")
    assert observation.tags[DATA_VERSION_TAG] == source_fingerprint(pipeline.settings(), "polyvore")
    reported, stale = stale_assets(pipeline.instance, defs)
    assert reported == {CATALOG: ["has a new dependency data version"]}
    assert stale == FOUNDATION | set(TRAINING)


# ---- 2. sensor and schedule ---------------------------------------------------------------------------------

def test_catalog_sensor_requests_the_catalog_and_its_downstream_when_the_source_content_changes(tmp_path, data_dir):
    sources = copy_sources(tmp_path / "data", data_dir)
    settings = load_settings("smoke", config_path=os.devnull,
                             overrides={**TINY, "work_dir": str(tmp_path), "catalog": {"data_dir": str(sources)}})
    defs = build_definitions(settings)
    sensor = defs.get_sensor_def(SENSOR_NAME)
    assert sensor.default_status == dg.DefaultSensorStatus.STOPPED

    def tick(cursor: str | None):
        return sensor.evaluate_tick(dg.build_sensor_context(cursor=cursor, definitions=defs))

    def observed(data) -> list[str]:
        assert all(e.asset_key == key(SOURCE) for e in data.asset_events)
        return [e.tags[DATA_VERSION_TAG] for e in data.asset_events]

    first = tick(None)  # a baseline: the current content is reported, nothing is rebuilt
    original = source_fingerprint(settings, "polyvore")
    assert first.run_requests == [] and observed(first) == [original]
    assert tick(first.cursor).skip_message == "catalog sources unchanged"

    path = sources / "polyvore" / "valid_no_dup.json.gz"
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    touched = tick(first.cursor)  # a new mtime, the same content: hashed, nothing requested
    assert touched.run_requests == [] and observed(touched) == [] and touched.cursor != first.cursor

    retitle_first_outfit(sources)
    changed = tick(touched.cursor)
    [request] = changed.run_requests
    assert {k.to_user_string() for k in request.asset_selection} == \
        FOUNDATION | set(TRAINING) | REPORTING | MODIT | {"polyvore/supervised_diffusion"}
    assert request.tags["r4t/trigger"] == SENSOR_NAME
    assert observed(changed) == [source_fingerprint(settings, "polyvore")] != [original]
    assert tick(changed.cursor).skip_message == "catalog sources unchanged"

    path.unlink()
    assert tick(changed.cursor).skip_message == "catalog sources unavailable: polyvore"


def test_weekly_retraining_schedule_requests_every_folm_and_its_downstream(smoke_defs):
    schedule = smoke_defs.get_schedule_def(SCHEDULE_NAME)
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED
    assert schedule.cron_schedule == RETRAINING_CRON
    sunday = datetime.datetime(2026, 11, 22, 3, tzinfo=datetime.timezone.utc)
    [request] = schedule.evaluate_tick(dg.build_schedule_context(scheduled_execution_time=sunday)).run_requests
    per_regime = ("folm_checkpoint", "synthetic_targets", "diffusion_checkpoint", "evaluation")
    expected = {f"{d}/{r}/{a}" for d in ("polyvore", "djmix") for r in ("oar", "wscr") for a in per_regime}
    assert {k.to_user_string() for k in request.asset_selection} == expected | {"latency_benchmark",
                                                                              "evaluation_report"}
    assert request.run_key == f"{SCHEDULE_NAME}-2026-11-22T03:00"


# ---- 6. failure handling ------------------------------------------------------------------------------------

def test_only_transient_errors_are_retried(smoke_defs):
    from r4t_pipeline.catalog import CatalogError
    from r4t_pipeline.catalogs import SourceUnavailable
    from r4t_pipeline.defs.production import retry_transient

    for name in [*LONG_ASSETS, *(n.replace("polyvore/oar", "djmix/wscr") for n in TRAINING)]:
        assert smoke_defs.get_assets_def(key(name)).op.retry_policy is None, name  # an interrupt is never retried

    def raising(error: BaseException):
        @retry_transient
        def compute():
            raise error
        return compute

    with pytest.raises(dg.RetryRequested):
        raising(SourceUnavailable("db:5432 (items: table 'products'): cannot connect"))()
    with pytest.raises(dg.RetryRequested):
        raising(TimeoutError("read timed out"))()
    for final in (CatalogError("shop.csv (items): duplicate item_id 'a'"), KeyboardInterrupt(), ValueError("bug")):
        with pytest.raises(type(final)):
            raising(final)()


def test_a_failed_run_keeps_the_previous_catalog_and_marks_its_mlflow_run_failed(pipeline, tmp_path):
    from mlflow.tracking import MlflowClient

    corrupt = copy_sources(tmp_path / "corrupt", pipeline.data_dir)
    broken = corrupt / "polyvore" / "valid_no_dup.json.gz"
    broken.write_bytes(broken.read_bytes()[:4096])  # a download cut short
    settings = pipeline.settings({"catalog": {"data_dir": str(corrupt)}})
    record = RecordStore(settings.records_dir).file(CATALOG)
    folder = settings.root / CATALOG
    files_before = {p: file_sha256(p) for p in [record, *folder.rglob("*")] if p.is_file()}
    previous = latest_runs(pipeline.instance, FOUNDATION)

    defs = build_definitions(settings)
    result = materialise(defs, pipeline.instance, dg.AssetSelection.assets(key(CATALOG)).downstream(depth=1),
                         raise_on_error=False)
    assert not result.success
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert failure.step_key == "polyvore__catalog"
    cause = failure.event_specific_data.error.cause  # what the asset raised, inside Dagster's wrapper
    assert cause.cls_name == "CatalogError" and f"{broken}: cannot read" in cause.message
    assert {e.step_key for e in result.all_events if e.event_type_value == "STEP_START"} == {"polyvore__catalog"}
    assert result.get_asset_materialization_events() == []  # its downstream steps never started

    assert {p: file_sha256(p) for p in [record, *folder.rglob("*")] if p.is_file()} == files_before
    assert latest_runs(pipeline.instance, FOUNDATION) == previous  # earlier materialisations intact
    client = MlflowClient(settings.tracking_uri)
    experiment = client.get_experiment_by_name(f"r4t-{settings.profile}")
    [run] = client.search_runs([experiment.experiment_id], f"params.data_dir = '{corrupt}'")
    assert (run.info.run_name, run.info.status) == ("polyvore/catalog", "FAILED")


# ---- 7. data-parallel training ------------------------------------------------------------------------------

def test_a_diffusion_stage_in_two_processes_trains_the_one_process_model_through_pipes(pipeline, tmp_path):
    """`processes: 2`: `accelerate launch` (torchrun; gloo on the CPU) under Dagster Pipes. The run reports its
    metadata back, only its main process logs to MLflow, and its loss curve is the one-process curve."""
    import numpy as np
    import torch
    from mlflow.tracking import MlflowClient

    from r4t_pipeline.config import DiffusionTrainConfig
    from r4t_pipeline.diffusion.denoiser import DenoiserConfig
    from r4t_pipeline.diffusion.train import train_diffusion
    from r4t_pipeline.synth import load_targets

    train = {"steps": 6, "checkpoint_every": 2, "log_every": 1}
    settings = pipeline.settings({"diffusion": {"train": {**train, "processes": 2}}})
    result = materialise(build_definitions(settings), pipeline.instance, [key(TRAINING[-1])])
    assert result.success
    [event] = result.get_asset_materialization_events()
    meta = {k: v.value for k, v in event.materialization.metadata.items()}
    assert (meta["processes"], meta["steps"], meta["steps_run"]) == (2, 6, 6)

    store = RecordStore(settings.records_dir)
    checkpoint = Path(store.read(TRAINING[-1]).model)
    two = torch.load(checkpoint / "training_state.pt", weights_only=True)["loss_history"]
    assert not [p.name for p in checkpoint.parent.iterdir() if p.name.endswith((".partial", ".launch"))]
    y, conditions, _ = load_targets(store.read(TRAINING[1]).path)
    config = json.loads((checkpoint / "config.json").read_text())
    one = train_diffusion(y, conditions, DenoiserConfig(**config["denoiser"]),
                          DiffusionTrainConfig(**{**config["train"], "processes": 1}), tmp_path / "one").loss_history
    np.testing.assert_allclose(two, one, rtol=1e-4)  # the same batches, the gradients averaged over the halves

    client = MlflowClient(settings.tracking_uri)
    experiment = client.get_experiment_by_name(f"r4t-{settings.profile}")
    [run] = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{TRAINING[-1]}'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    logged = sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)
    assert [m.step for m in logged] == list(range(1, 7))  # once per step: the second process logs nothing
    np.testing.assert_allclose([m.value for m in logged], two, rtol=1e-6)
    assert materialise(pipeline.defs(), pipeline.instance, [key(TRAINING[-1])]).success  # as the module found it


def test_a_folm_stage_in_two_processes_splits_each_step_and_writes_once(pipeline):
    """`folm.train.processes: 2`: TRL's GRPO under `accelerate launch` through Pipes. Each process samples and
    trains on its half of every step's completions (the advantages use the whole group's rewards), so the curve
    is the one-process curve in distribution, not sample for sample; the main process alone writes the model and
    logs to MLflow, once per step."""
    from mlflow.tracking import MlflowClient

    from r4t_pipeline.folm.grpo import META_FILE

    settings = pipeline.settings({"folm": {"train": {"processes": 2}}})
    steps = settings.folm.train.steps
    result = materialise(build_definitions(settings), pipeline.instance, [key(TRAINING[0])])
    assert result.success
    [event] = result.get_asset_materialization_events()
    meta = {k: v.value for k, v in event.materialization.metadata.items()}
    assert (meta["processes"], meta["steps"], meta["resumed_from_step"]) == (2, steps, 0)
    folder = Path(RecordStore(settings.records_dir).read(TRAINING[0]).model)
    history = json.loads((folder / META_FILE).read_text())["history"]
    assert len(history) == steps and all(row["completion_tokens"] > 0 for row in history)
    assert not [p.name for p in folder.parent.iterdir() if p.name.endswith((".partial", ".launch", ".resume"))]

    client = MlflowClient(settings.tracking_uri)
    experiment = client.get_experiment_by_name(f"r4t-{settings.profile}")
    [run] = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{TRAINING[0]}'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    logged = sorted(client.get_metric_history(run.info.run_id, "reward/total"), key=lambda m: m.step)
    assert [m.step for m in logged] == list(range(1, steps + 1))  # once per step: the second process logs nothing
    assert [m.value for m in logged] == pytest.approx([row["reward/total"] for row in history])
    assert materialise(pipeline.defs(), pipeline.instance, [key(TRAINING[0])]).success  # as the module found it
