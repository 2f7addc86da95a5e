"""Resources: MLflow tracking (a small client wrapper; dagster-mlflow's resource is op-centric) and the IO
manager that stores the records on the asset edges as JSON (Dagster's default pickles them, and whoever can
write a pickle can run code in the next run)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import dagster as dg

from r4t_pipeline.io import process_alive
from r4t_pipeline.records import Record, RecordStore
from r4t_pipeline.tracking import MlflowRun, interrupts_deferred


class MlflowTracking(dg.ConfigurableResource):
    """Tracks each asset materialisation as an MLflow run; a failed materialisation leaves it FAILED."""

    tracking_uri: str
    experiment: str = "r4t"
    artifact_location: str | None = None  # None: MLflow's default (./mlruns for a sqlite store)

    @contextlib.contextmanager
    def run(self, name: str, params: dict | None = None, tags: dict | None = None) -> Iterator[MlflowRun]:
        from mlflow.tracking import MlflowClient

        with self._first_use():
            client = MlflowClient(self.tracking_uri)
            experiment = client.get_experiment_by_name(self.experiment)
            experiment_id = experiment.experiment_id if experiment else \
                client.create_experiment(self.experiment, artifact_location=self.artifact_location)
        self.reap()
        owner = {"r4t/host": socket.gethostname(), "r4t/pid": str(os.getpid())}  # lets a later run reap it
        run = None
        try:
            with interrupts_deferred():  # one arriving while MLflow creates the run takes effect once it can be ended
                run = MlflowRun.create(client, experiment_id, name, {**owner, **(tags or {})})
                run.log_params(params or {})
            yield run
        except (KeyboardInterrupt, dg.DagsterExecutionInterruptedError):
            if run is not None:
                run.end("KILLED")
            raise
        except BaseException:
            if run is not None:
                run.end("FAILED")
            raise
        run.end("FINISHED")

    @contextlib.contextmanager
    def _first_use(self) -> Iterator[None]:
        """Concurrent runs on a fresh SQLite store would run MLflow's schema migrations at once (and fail): one
        process at a time creates the store and the experiment."""
        if not self.tracking_uri.startswith("sqlite:///"):
            yield
            return
        lock = Path(self.tracking_uri.removeprefix("sqlite:///") + ".lock")
        lock.parent.mkdir(parents=True, exist_ok=True)
        with open(lock, "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def reap(self) -> list[str]:
        """Mark KILLED the RUNNING runs of this host whose process is gone (killed with no chance to say so)."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.tracking_uri)
        experiment = client.get_experiment_by_name(self.experiment)
        if experiment is None:
            return []
        host = socket.gethostname().replace("'", "")
        running = client.search_runs([experiment.experiment_id],
                                     f"attributes.status = 'RUNNING' and tags.`r4t/host` = '{host}'")
        reaped = [r.info.run_id for r in running if not process_alive(int(r.data.tags.get("r4t/pid", 0)))]
        for run_id in reaped:
            MlflowRun(client, run_id).end("KILLED")
        return reaped


class RecordIOManager(dg.ConfigurableIOManager):
    """Each asset's latest record as `<root>/<asset key path>.json` (the CLI and the service read the same)."""

    root: str

    def handle_output(self, context: dg.OutputContext, obj: Record | None) -> None:
        if obj is None:
            return
        expected = "/".join(context.asset_key.path)
        if obj.asset != expected:
            raise ValueError(f"asset {expected} returned the record of {obj.asset}")
        RecordStore(self.root).write(obj)

    def load_input(self, context: dg.InputContext) -> Record:
        return RecordStore(self.root).read("/".join(context.asset_key.path))
