"""The thin Dagster layer over the library: assets, asset checks, resources, a sensor and a schedule."""

from __future__ import annotations

import dagster as dg

from r4t_pipeline.catalogs import catalog_registry
from r4t_pipeline.defs.checks import foundation_checks
from r4t_pipeline.defs.evaluation import evaluation_asset, report_assets
from r4t_pipeline.defs.foundation import foundation_assets
from r4t_pipeline.defs.modit import modit_assets
from r4t_pipeline.defs.resources import MlflowTracking, RecordIOManager
from r4t_pipeline.defs.schedules import retraining_schedule
from r4t_pipeline.defs.sensors import catalog_source_sensor
from r4t_pipeline.defs.stages import folm_base_asset, stage_assets
from r4t_pipeline.defs.supervised import supervised_asset
from r4t_pipeline.settings import Settings


def build_definitions(settings: Settings) -> dg.Definitions:
    entries = catalog_registry(settings)
    assets, checks = [], []
    for name, entry in entries.items():
        assets += foundation_assets(settings, entry)
        checks += foundation_checks(name)
        assets += [folm_base_asset(settings, name), supervised_asset(settings, name)]
        for regime in settings.regimes:
            assets += stage_assets(settings, name, regime)
            assets.append(evaluation_asset(settings, name, regime))
    modit, modit_checks = modit_assets(settings)
    assets += modit + report_assets(settings, list(entries))
    checks += modit_checks
    return dg.Definitions(
        assets=assets,
        asset_checks=checks,
        sensors=[catalog_source_sensor(entries, assets)],
        schedules=[retraining_schedule(list(entries), settings.regimes, assets)],
        # one step at a time: training steps use every core, and the loaded encoder is reused across steps
        executor=dg.in_process_executor,
        resources={"mlflow": MlflowTracking(tracking_uri=settings.tracking_uri, experiment=f"r4t-{settings.profile}",
                                            artifact_location=settings.mlflow_artifact_location),
                   "io_manager": RecordIOManager(root=str(settings.records_dir))},
    )
