"""The Dagster code location: `dagster dev -m r4t_pipeline.definitions` (profile from $R4T_PROFILE)."""

from r4t_pipeline.defs import build_definitions
from r4t_pipeline.settings import load_settings

defs = build_definitions(load_settings())
