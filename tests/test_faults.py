"""Fault injection, as a demanding user meets faults: concurrent runs of the same assets, SIGTERM in the middle
of a training stage (the process stops within seconds, nothing is retried, MLflow does not say RUNNING, the
next run resumes), a catalog rebuilt alone under artefacts built from the old one, a killed writer's leftovers.
The runs go through the real `dagster asset materialize` command with a DAGSTER_HOME of their own."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dagster as dg
import pytest
import yaml
from conftest import POLYVORE

from r4t_pipeline.catalog import Catalog
from r4t_pipeline.embeddings import CatalogEmbeddings
from r4t_pipeline.index import VectorIndex
from r4t_pipeline.io import atomic_dir
from r4t_pipeline.layout import ArtefactStore
from r4t_pipeline.records import ArtefactMismatch, RecordStore, check_consistent
from r4t_pipeline.settings import load_settings

REPO = Path(__file__).resolve().parents[1]
FOUNDATION = "polyvore/catalog+"  # the catalog and what it feeds directly, then the index below it
TINY_FOLM = {"sft_steps": 2, "bootstrap_size": {"vocab_size": 300, "hidden_size": 32,
                                                "intermediate_size": 64, "num_heads": 2, "num_layers": 1}}


def deployment(root: Path, **changes) -> Path:
    config = {"profile": "smoke", "work_dir": str(root / "work"), "catalogs": POLYVORE, "regimes": ["oar"],
              "mlflow_tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "folm": TINY_FOLM, **changes}
    path = root / "deploy.yaml"
    path.write_text(yaml.safe_dump(config))
    (root / "home").mkdir(exist_ok=True)
    instance = dg.DagsterInstance.from_config(str(root / "home"))  # the instance exists before runs share it
    instance.get_runs(limit=1)
    instance.dispose()
    return path


def materialize(root: Path, select: str, wait: bool = True) -> subprocess.Popen | subprocess.CompletedProcess:
    env = {**os.environ, "R4T_CONFIG": str(root / "deploy.yaml"), "DAGSTER_HOME": str(root / "home"),
           "PYTHONPATH": str(REPO)}
    env.pop("R4T_PROFILE", None)
    cmd = [sys.executable, "-m", "dagster", "asset", "materialize", "-m", "r4t_pipeline.definitions",
           "--select", select]
    if wait:
        return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    # output to a file: a pipe nobody reads while polling would fill up and stall the run
    log = open(root / f"run-{time.time_ns()}.log", "w+")  # noqa: SIM115 - closed by output_of
    run = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)
    run.log = log
    return run


def output_of(run: subprocess.Popen) -> str:
    run.log.seek(0)
    text = run.log.read()
    run.log.close()
    return text


def settings(root: Path):
    return load_settings(config_path=root / "deploy.yaml")


def test_concurrent_runs_of_the_same_assets_all_succeed_and_leave_loadable_artefacts(tmp_path):
    deployment(tmp_path)
    selection = "polyvore/catalog,polyvore/item_embeddings,polyvore/embedding_index"
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: materialize(tmp_path, selection), range(4)))
    failed = [r for r in results if r.returncode]
    # the exception lines of each failed run, not the tail of its log (which ends with dagster's run summary)
    assert not failed, [(r.returncode, [line for line in (r.stdout + r.stderr).splitlines()
                                         if "Error" in line or "error:" in line][-12:]) for r in failed]
    store = RecordStore(settings(tmp_path).records_dir)
    records = [store.read(f"polyvore/{a}") for a in ("catalog", "item_embeddings", "embedding_index")]
    check_consistent(records)
    catalog = Catalog.load(records[0].path)
    assert CatalogEmbeddings.load(records[1].path).items.shape[0] == catalog.items.height
    assert len(VectorIndex.load(records[2].items_path)) == catalog.items.height
    # the same inputs made the same versions: one folder each, no temp or swapped-out leftovers
    for record in records:
        versions = Path(record.path).parent
        assert sorted(p.name for p in versions.iterdir()) == [record.version, f"{record.version}.json"]


# stage -> (deployment change, its upstream, the checkpoint its run leaves while training, what publishing writes,
#           how its metadata says it went on from a checkpoint); each run long enough to be caught between two
#           checkpoints, short enough to finish when resumed
INTERRUPTIBLE = {
    "grpo": ("polyvore/oar/folm_checkpoint",
             {"folm": {**TINY_FOLM, "train": {"steps": 150, "save_every": 2, "group_size": 2, "per_step_queries": 1,
                                               "max_new_tokens": 16}}},
             "*.resume/checkpoint-*/trainer_state.json", "*/r4t_folm.json",
             lambda meta, steps: 0 < meta["resumed_from_step"].value < steps),
    "diffusion": ("polyvore/oar/diffusion_checkpoint",
                  {"diffusion": {"train": {"steps": 400, "checkpoint_every": 10, "batch_size": 8}}},
                  "*.partial/training_state.pt", "*/model.safetensors",
                  lambda meta, steps: meta["steps"].value == steps and 0 < meta["steps_run"].value < steps),
}


@pytest.mark.parametrize("stage", INTERRUPTIBLE)
def test_sigterm_stops_training_promptly_and_the_next_run_resumes(tmp_path, stage):
    from mlflow.tracking import MlflowClient

    asset, changes, checkpoint, published, went_on = INTERRUPTIBLE[stage]
    deployment(tmp_path, **changes)
    steps = (changes.get("folm") or changes.get("diffusion"))["train"]["steps"]
    upstream = materialize(tmp_path, ",".join(f"*{parent}" for parent in _parents(tmp_path, asset)))
    assert upstream.returncode == 0, upstream.stdout[-3000:] + upstream.stderr[-3000:]
    versions = settings(tmp_path).root.joinpath(*asset.split("/"), "versions")
    run = materialize(tmp_path, asset, wait=False)
    deadline = time.time() + 600
    while not list(versions.glob(checkpoint)):
        assert run.poll() is None and time.time() < deadline, output_of(run)[-3000:]
        time.sleep(0.2)
    run.send_signal(signal.SIGTERM)
    stopped = time.time()
    run.wait(timeout=120)
    output = output_of(run)
    assert time.time() - stopped < 60, "training did not stop promptly on SIGTERM"
    assert run.returncode != 0 and "STEP_UP_FOR_RETRY" not in output, output[-3000:]

    instance = dg.DagsterInstance.from_config(str(tmp_path / "home"))
    [interrupted] = instance.get_runs(limit=1)
    assert interrupted.status in (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [experiment] = [e for e in client.search_experiments() if e.name == "r4t-smoke"]
    runs = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{asset}'")
    assert [r.info.status for r in runs] == ["KILLED"]
    assert not list(versions.glob(published))  # no version was published

    resumed = materialize(tmp_path, asset)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    event = instance.get_latest_materialization_event(dg.AssetKey(asset.split("/")))
    assert went_on(event.asset_materialization.metadata, steps)  # it went on from a checkpoint


def test_an_interrupt_in_the_middle_of_mlflow_logging_still_ends_the_run_killed(tmp_path):
    """Without deferring it, an interrupt inside a write leaves the SQLite store locked: the run stays RUNNING."""
    from mlflow.tracking import MlflowClient

    from r4t_pipeline.defs.resources import MlflowTracking

    tracking = MlflowTracking(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="faults")
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # an earlier test's Dagster may have swapped it
    try:
        for delay in (0.05, 0.1, 0.15, 0.2, 0.25, 0.3):  # a training loop that logs as fast as the store takes it
            with pytest.raises(KeyboardInterrupt), tracking.run("train") as run:
                threading.Timer(delay, os.kill, (os.getpid(), signal.SIGINT)).start()
                deadline = time.time() + 30
                for step in itertools.count():
                    assert time.time() < deadline, "the interrupt never arrived"
                    run.log(step, {f"metric_{i}": float(step) for i in range(8)})
            assert MlflowClient(tracking.tracking_uri).get_run(run.run_id).info.status == "KILLED"
    finally:
        signal.signal(signal.SIGINT, previous)


def test_an_interrupt_while_mlflow_creates_the_run_ends_it_killed(tmp_path, monkeypatch):
    """The interrupt takes effect once the run exists, before any caller holds it: the run itself must end it."""
    from mlflow.tracking import MlflowClient

    from r4t_pipeline.defs.resources import MlflowTracking

    tracking = MlflowTracking(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="faults")
    create_run = MlflowClient.create_run

    def interrupted_while_creating(self, *args, **kwargs):
        run = create_run(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)  # arrives while the run is being created: deferred to the block's end
        return run

    monkeypatch.setattr(MlflowClient, "create_run", interrupted_while_creating)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # an earlier test's Dagster may have swapped it
    try:
        with pytest.raises(KeyboardInterrupt), tracking.run("train", params={"lr": 1e-4}):
            pytest.fail("the interrupt took effect after the run was handed over")
    finally:
        signal.signal(signal.SIGINT, previous)
    client = MlflowClient(tracking.tracking_uri)
    [experiment] = [e for e in client.search_experiments() if e.name == "faults"]
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.status == "KILLED"


def _parents(root: Path, asset: str) -> list[str]:
    from r4t_pipeline.defs import build_definitions

    graph = build_definitions(settings(root)).resolve_asset_graph()
    key = dg.AssetKey(asset.split("/"))
    return sorted(k.to_user_string() for k in graph.get(key).parent_keys)


def test_a_catalog_rebuilt_alone_is_refused_by_retrieval_with_what_to_rematerialise(smoke, tmp_path, capsys,
                                                                                      monkeypatch):
    from r4t_pipeline.cli import main

    config = tmp_path / "deploy.yaml"
    config.write_text(yaml.safe_dump({"profile": "smoke", "work_dir": str(tmp_path / "work"), "catalogs": POLYVORE}))
    monkeypatch.setenv("R4T_CONFIG", str(config))
    # the smoke graph's records (pointing at its artefacts), then a catalog rebuilt alone: a new version
    store = RecordStore(load_settings().records_dir)
    for path in smoke.records.root.rglob("*.json"):
        store.write(smoke.records.read(str(path.relative_to(smoke.records.root).with_suffix(""))))
    catalog = store.read("polyvore/catalog")
    store.write(catalog.model_copy(update={"version": "rebuilt0000000000"}))
    with pytest.raises(ArtefactMismatch, match=r"polyvore/embedding_index was built from polyvore/catalog "
                                               rf"{catalog.version}, but the latest polyvore/catalog is "
                                               r"rebuilt0000000000: re-materialise what lies below it "
                                               r"\(dagster asset materialize .* --select 'polyvore/catalog\*'\)"):
        check_consistent([store.read("polyvore/catalog"), store.read("polyvore/embedding_index")])
    assert main(["retrieve", "summer dress", "--method", "no_fanout"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "re-materialise what lies below it" in err and "Traceback" not in err


def test_a_killed_writers_temp_is_swept_and_a_live_one_is_not(tmp_path):
    store = ArtefactStore(tmp_path)
    versions = store.versions_dir(["c", "catalog"])
    versions.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = os.uname().nodename.replace(".", "_")
    leftover = versions / f".abc.{host}-{dead.pid}.x1y2z3.tmp"
    leftover.mkdir()
    nested = versions / "abc.partial" / f".training_state.pt.{host}-{dead.pid}.q9w8e7.tmp"
    nested.parent.mkdir()
    nested.write_text("half a checkpoint")
    with atomic_dir(versions / "live") as live_tmp:  # a writer of this very process, still writing
        removed = store.prepare(["c", "catalog"], "abc")
        assert live_tmp.exists()
    assert set(removed) == {leftover, nested} and not leftover.exists() and not nested.exists()
    assert (versions / "abc.partial").is_dir()  # the resumable state of the version being built stays


def test_fetch_data_offline_says_what_to_put_where_in_one_line(tmp_path):
    # a proxy on a closed loopback port: the download fails at once, as on a machine without the internet
    env = {**os.environ, "https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
    run = subprocess.run([sys.executable, "-m", "r4t_pipeline.cli", "fetch-data", "--data-dir", str(tmp_path),
                          "--domains", "djmix"], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1, run.stderr
    assert lines[0].startswith("r4t fetch-data: missing source data in") and "djmix-dataset.json.gz" in lines[0]


def test_a_dj_mix_without_an_id_is_refused_naming_file_and_record(tmp_path):
    import gzip
    import json

    from r4t_pipeline.catalog import CatalogError
    from r4t_pipeline.sources import load_djmix

    path = tmp_path / "djmix" / "djmix-dataset.json.gz"
    path.parent.mkdir()
    mixes = [{"id": "m1", "title": "a", "tracklist": [{"id": "t1", "title": "A - B"}]},
             {"title": "no id", "tracklist": [{"id": "t2", "title": "C - D"}]}]
    path.write_bytes(gzip.compress(json.dumps(mixes).encode()))
    with pytest.raises(CatalogError, match=r"djmix-dataset\.json\.gz: mix 1 \(id=None\): has no 'id'"):
        load_djmix(tmp_path, allow_download=False)


def test_a_corrupt_embedding_cache_is_named_with_the_fix(tmp_path):
    from r4t_pipeline.encoders import EmbeddingCache

    path = tmp_path / "embeddings.sqlite"
    path.write_bytes(b"not a database, " * 64)
    with pytest.raises(ValueError, match=rf"{path}: the embedding cache is unreadable .* delete the file"):
        EmbeddingCache(path)
