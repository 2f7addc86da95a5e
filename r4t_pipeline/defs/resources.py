"""Resources: MLflow tracking (a small client wrapper; dagster-mlflow's resource is op-centric)."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator

import dagster as dg


class MlflowRun:
    """One MLflow run; `log` is the `log_fn(step, metrics)` callback the library's training loops take."""

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(_metric_name(k), float(v), now, step)
                                                    for k, v in metrics.items()])

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, path, artifact_path)


def _metric_name(name: str) -> str:
    """MLflow refuses names like 'recall@5K' or 'hit@3.5%'."""
    return re.sub(r"[^\w\-. :/]", "_", name)


class MlflowTracking(dg.ConfigurableResource):
    """Tracks each asset materialisation as an MLflow run; a failed materialisation leaves it FAILED."""

    tracking_uri: str
    experiment: str = "r4t"
    artifact_location: str | None = None  # None: MLflow's default (./mlruns for a sqlite store)

    @contextlib.contextmanager
    def run(self, name: str, params: dict | None = None, tags: dict | None = None) -> Iterator[MlflowRun]:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.tracking_uri)
        experiment = client.get_experiment_by_name(self.experiment)
        experiment_id = experiment.experiment_id if experiment else \
            client.create_experiment(self.experiment, artifact_location=self.artifact_location)
        run = client.create_run(experiment_id, run_name=name, tags=tags or {})
        client.log_batch(run.info.run_id, params=[Param(k, str(v)[:500]) for k, v in (params or {}).items()])
        try:
            yield MlflowRun(client, run.info.run_id)
        except BaseException:
            client.set_terminated(run.info.run_id, "FAILED")
            raise
        client.set_terminated(run.info.run_id, "FINISHED")
