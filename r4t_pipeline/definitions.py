"""The Dagster code location: `dagster dev -m r4t_pipeline.definitions` (profile from $R4T_PROFILE)."""

import signal
import threading

from r4t_pipeline.defs import build_definitions
from r4t_pipeline.settings import load_settings

# `dagster asset materialize`, `timeout` and `docker stop` end a run with SIGTERM: treat it as Ctrl-C, so that the
# running step stops (checkpointing first), its MLflow run ends KILLED and the Dagster run ends failed, instead of
# the process vanishing mid-write. Dagster's own run workers and code servers map SIGTERM the same way.
if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGTERM, signal.getsignal(signal.SIGINT))

defs = build_definitions(load_settings())
