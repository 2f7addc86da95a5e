"""The PostgreSQL variant of the Dagster instance (docker/dagster.yaml), against a real server: a throwaway
cluster from the system packages on 127.0.0.1, the instance loaded from that very file, and a
materialisation whose run, events and data versions land in PostgreSQL.

Skipped, with the reason, when the PostgreSQL server binaries or dagster-postgres are missing (.ci/run
installs the Debian package `postgresql`)."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest

from r4t_pipeline.defs import build_definitions
from r4t_pipeline.settings import load_settings

REPO = Path(__file__).resolve().parents[1]
USER, DATABASE = "dagster", "dagster"


def postgres_bin_dir() -> Path | None:
    """The newest server installed from the system packages (Debian keeps it off the PATH), else the PATH's."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    initdb = found[-1] if found else shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def run_as_owner() -> list[str] | None:
    """PostgreSQL refuses to run as root: as root, run it as the `postgres` user the package creates."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return None
    runuser = shutil.which("runuser")
    return [runuser, "-u", "postgres", "--"] if runuser else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    port: int

    @property
    def env(self) -> dict[str, str]:
        """What docker/dagster.yaml reads (compose.yaml sets the same variables)."""
        return {"DAGSTER_POSTGRES_HOST": "127.0.0.1", "DAGSTER_POSTGRES_PORT": str(self.port),
                "DAGSTER_POSTGRES_USER": USER, "DAGSTER_POSTGRES_PASSWORD": "unused-trust-auth",
                "DAGSTER_POSTGRES_DB": DATABASE}

    def query(self, sql: str) -> list[tuple]:
        import psycopg2

        with psycopg2.connect(host="127.0.0.1", port=self.port, user=USER, dbname=DATABASE) as conn:
            with conn.cursor() as cursor:
                cursor.execute(sql)
                rows = cursor.fetchall()
        conn.close()
        return rows


@pytest.fixture(scope="module")
def postgres() -> Iterator[Server]:
    pytest.importorskip("dagster_postgres", reason="dagster-postgres is not installed (pyproject dependency)")
    bin_dir, owner = postgres_bin_dir(), run_as_owner()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries not found (apt-get install postgresql)")
    if owner is None:
        pytest.skip("running as root, but there is no `postgres` user or no runuser to start the server as")
    # outside pytest's tmp dir, which only root may enter; owned by the server's user
    cluster = Path(tempfile.mkdtemp(prefix="r4t-postgres-"))
    if owner:
        shutil.chown(cluster, user="postgres")
    port = free_port()

    def run(tool: str, *args: str) -> None:
        subprocess.run([*owner, str(bin_dir / tool), *args], check=True, capture_output=True, timeout=120)

    try:
        run("initdb", "-D", str(cluster / "data"), "-U", USER, "--auth=trust", "-E", "UTF8", "--no-sync")
        # loopback only; durability traded for speed, as befits a throwaway cluster
        options = (f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={cluster} "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        run("pg_ctl", "-D", str(cluster / "data"), "-o", options, "-l", str(cluster / "server.log"), "-w", "-t", "60",
            "start")
    except subprocess.CalledProcessError as err:
        shutil.rmtree(cluster, ignore_errors=True)
        pytest.fail(f"could not start PostgreSQL: {err.stderr.decode(errors='replace')}")
    try:
        run("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", USER, DATABASE)
        yield Server(port)
    finally:
        run("pg_ctl", "-D", str(cluster / "data"), "-m", "immediate", "-w", "stop")
        shutil.rmtree(cluster, ignore_errors=True)


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

        settings = load_settings("smoke", config_path=tmp_path / "none.yaml", overrides={
            "work_dir": str(tmp_path / "work"), "domains": ["polyvore"], "regimes": ["oar"],
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
