"""Test setup: real data from the shared data directory, offline models, isolated artefact roots."""

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
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("R4T_DATA_DIR", str(REPO.parent / "shared" / "data"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
DATA_DIR = Path(os.environ["R4T_DATA_DIR"])
POLYVORE = {"polyvore": {"builtin": "polyvore"}}  # the `catalogs` setting of most graph tests


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """One intra-op thread for a module of tiny models: on the shared 2-core CI machine a second one mostly spins."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    from r4t_pipeline.records import RecordStore
    from r4t_pipeline.settings import load_settings

    root = tmp_path_factory.mktemp("r4t")
    settings = load_settings("smoke", config_path=os.devnull, overrides={"work_dir": str(root), "catalogs": POLYVORE})
    defs = build_definitions(settings)
    result = dg.materialize(list(defs.assets) + list(defs.asset_checks), resources=defs.resources,
                            instance=dg.DagsterInstance.ephemeral())
    records = RecordStore(settings.records_dir)
    return SimpleNamespace(settings=settings, defs=defs, result=result, root=root, records=records,
                           path=lambda asset: Path(records.read(asset).path))


# ---- a throwaway PostgreSQL cluster on loopback (the Debian package `postgresql`; .ci/run installs it) ----------

PG_USER, PG_DATABASE = "dagster", "dagster"


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
                "DAGSTER_POSTGRES_USER": PG_USER, "DAGSTER_POSTGRES_PASSWORD": "unused-trust-auth",
                "DAGSTER_POSTGRES_DB": PG_DATABASE}

    @property
    def url(self) -> str:
        """A SQLAlchemy URL without a password (the cluster trusts loopback)."""
        return f"postgresql+psycopg2://{PG_USER}@127.0.0.1:{self.port}/{PG_DATABASE}"

    def query(self, sql: str) -> list[tuple]:
        import psycopg2

        with psycopg2.connect(host="127.0.0.1", port=self.port, user=PG_USER, dbname=PG_DATABASE) as conn:
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
        run("initdb", "-D", str(cluster / "data"), "-U", PG_USER, "--auth=trust", "-E", "UTF8", "--no-sync")
        # loopback only; durability traded for speed, as befits a throwaway cluster
        options = (f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={cluster} "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        run("pg_ctl", "-D", str(cluster / "data"), "-o", options, "-l", str(cluster / "server.log"), "-w", "-t", "60",
            "start")
    except subprocess.CalledProcessError as err:
        shutil.rmtree(cluster, ignore_errors=True)
        pytest.fail(f"could not start PostgreSQL: {err.stderr.decode(errors='replace')}")
    try:
        run("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", PG_USER, PG_DATABASE)
        yield Server(port)
    finally:
        run("pg_ctl", "-D", str(cluster / "data"), "-m", "immediate", "-w", "stop")
        shutil.rmtree(cluster, ignore_errors=True)
