"""MLflow logging without Dagster: the `log_fn(step, metrics)` callback the training loops take, for a run the
Dagster resource opened (in its process) or named in the environment (in processes it launched)."""

from __future__ import annotations

import os
import re
import time

RUN_ID_ENV = "MLFLOW_RUN_ID"
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"


class MlflowRun:
    """One MLflow run; `log` is the `log_fn(step, metrics)` callback the library's training loops take."""

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id

    @classmethod
    def from_env(cls) -> MlflowRun | None:
        """The run named by $MLFLOW_RUN_ID in the store at $MLFLOW_TRACKING_URI, if both are set."""
        if not (os.environ.get(RUN_ID_ENV) and os.environ.get(TRACKING_URI_ENV)):
            return None
        from mlflow.tracking import MlflowClient

        return cls(MlflowClient(os.environ[TRACKING_URI_ENV]), os.environ[RUN_ID_ENV])

    def env(self) -> dict[str, str]:
        """What a launched process needs to log into this run (see `from_env`)."""
        return {RUN_ID_ENV: self.run_id, TRACKING_URI_ENV: self.client.tracking_uri}

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(metric_name(k), float(v), now, step)
                                                    for k, v in metrics.items()])

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, path, artifact_path)


def metric_name(name: str) -> str:
    """MLflow refuses names like 'recall@5K' or 'hit@3.5%'."""
    return re.sub(r"[^\w\-. :/]", "_", name)
