"""MLflow logging without Dagster: the `log_fn(step, metrics)` callback the training loops take, for a run the
Dagster resource opened (in its process) or named in the environment (in processes it launched)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator

LogFn = Callable[[int, dict[str, float]], None]  # log_fn(step, metrics): the one callback every long loop logs to
# log_fn(name, step, metrics), for work made of named parts: a MO-DiT stage ("item/tail"), an evaluated method
NamedLogFn = Callable[[str, int, dict[str, float]], None]
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

    @classmethod
    def create(cls, client, experiment_id: str, name: str, tags: dict) -> MlflowRun:
        """A new RUNNING run. Not deferred here against interrupts, unlike the writes below: an interrupt deferred
        to the end of this call would lose the run before anyone holds it to end it, so the caller defers it."""
        return cls(client, client.create_run(experiment_id, run_name=name, tags=tags).info.run_id)

    def log_params(self, params: dict) -> None:
        """Each value cut to MLflow's 500 characters."""
        from mlflow.entities import Param

        with interrupts_deferred():
            self.client.log_batch(self.run_id, params=[Param(k, str(v)[:500]) for k, v in params.items()])

    def end(self, status: str) -> None:
        """FINISHED, FAILED or KILLED."""
        with interrupts_deferred():
            self.client.set_terminated(self.run_id, status)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        with interrupts_deferred():
            self.client.log_batch(self.run_id, metrics=[Metric(metric_name(k), float(v), now, step)
                                                        for k, v in metrics.items()])

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        with interrupts_deferred():
            self.client.log_artifact(self.run_id, path, artifact_path)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM that arrive inside the block take effect as it ends. For MLflow writes: an interrupt in
    the middle of one leaks its database connection with a SQLite store locked, so marking the run KILLED then
    fails ("database is locked") and the run says RUNNING. Python runs signal handlers in the main thread only,
    so elsewhere there is nothing to defer; nor where a handler was installed outside Python."""
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    if threading.current_thread() is not threading.main_thread() or None in previous.values():
        yield
        return
    arrived: list[int] = []
    for signum in previous:
        signal.signal(signum, lambda received, _frame: arrived.append(received))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(arrived):
            signal.raise_signal(signum)  # now, through the handler that was in place


def metric_name(name: str) -> str:
    """MLflow refuses names like 'recall@5K' or 'hit@3.5%'."""
    return re.sub(r"[^\w\-. :/]", "_", name)
