"""The PostgreSQL variant of the Dagster instance (docker/dagster.yaml), against a real server: a throwaway
cluster from the system packages on 127.0.0.1, the instance loaded from that very file, and a
materialisation whose run, events and data versions land in PostgreSQL.

Skipped, with the reason, when the PostgreSQL server binaries or dagster-postgres are missing (.ci/run
installs the Debian package `postgresql`)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import dagster as dg

from r4t_pipeline.defs import build_definitions
from r4t_pipeline.settings import load_settings

REPO = Path(__file__).resolve().parents[1]


def test_a_materialisation_on_the_postgres_instance_lands_in_postgres(postgres, tmp_path, tmp_path_factory,
                                                                      monkeypatch):
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "docker" / "dagster.yaml", home / "dagster.yaml")
    for name, value in postgres.env.items():
        monkeypatch.setenv(name, value)
    instance = dg.DagsterInstance.from_config(str(home))
    try:
        storages = {type(s).__name__ for s in (instance.run_storage, instance.event_log_storage,
                                               instance.schedule_storage)}
        assert storages == {"PostgresRunStorage", "PostgresEventLogStorage", "PostgresScheduleStorage"}

        settings = load_settings("smoke", config_path=os.devnull, overrides={
            "work_dir": str(tmp_path / "work"), "catalogs": {"polyvore": {"builtin": "polyvore"}}, "regimes": ["oar"],
            # the MLflow store the operations tests share: a fresh SQLite store costs ~10 s of migrations
            "mlflow_tracking_uri": f"sqlite:///{tmp_path_factory.getbasetemp() / 'r4t-operations-mlflow.db'}"})
        defs = build_definitions(settings)
        source, catalog = dg.AssetKey(["polyvore", "catalog_source"]), dg.AssetKey(["polyvore", "catalog"])
        observed = dg.materialize(list(defs.assets), selection=[source], instance=instance, resources=defs.resources)
        built = dg.materialize(list(defs.assets), selection=[catalog], instance=instance, resources=defs.resources)
        assert observed.success and built.success

        # read back from PostgreSQL itself, then through the instance
        statuses = dict(postgres.query("SELECT run_id, status FROM runs"))
        assert statuses == {observed.run_id: "SUCCESS", built.run_id: "SUCCESS"}
        keys = {row[0] for row in postgres.query("SELECT asset_key FROM asset_keys")}
        assert {source.to_string(), catalog.to_string()} <= keys
        materialised = instance.get_latest_materialization_event(catalog)
        assert materialised.run_id == built.run_id
        [observation] = observed.asset_observations_for_node("polyvore__catalog_source")
        lineage = materialised.asset_materialization.tags
        assert lineage["dagster/input_data_version/polyvore/catalog_source"] == observation.tags["dagster/data_version"]
        assert instance.all_instigator_state() == []  # sensors and schedules are off, and stored here too
    finally:
        instance.dispose()
