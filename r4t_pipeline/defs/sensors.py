"""A sensor that rebuilds a domain's catalog, and everything downstream of it, when the domain's source files
change. Off by default: switch it on under Automation in the UI (the daemon of `dagster dev` then runs it).

Each tick reads the size and modification time of every source file (cheap); only when those changed does
it hash the content (`source_fingerprint`, the catalog source's data version). The cursor keeps both per
domain. The first tick records a baseline and requests nothing; a new content hash requests one run of
`<domain>/catalog` and its downstream assets and reports the new data version of `<domain>/catalog_source`,
so the run's lineage records the source content it was built from.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import dagster as dg
from dagster._core.definitions.data_version import DATA_VERSION_TAG

from r4t_pipeline.defs.foundation import source_fingerprint
from r4t_pipeline.io import stable_hash
from r4t_pipeline.settings import Settings
from r4t_pipeline.sources import resolve_data_dir
from r4t_pipeline.stack import source_files

SENSOR_NAME = "catalog_source_sensor"


def source_stat_signature(settings: Settings, domain: str) -> str | None:
    """Hash of (name, size, mtime) of the domain's source files; None when one is missing (nothing to do
    until it is there: the catalog asset reports missing files with where to get them)."""
    data_dir = resolve_data_dir(settings.catalog.data_dir)
    stats = []
    for spec in source_files(domain):
        path = data_dir / spec.domain / spec.name
        if not path.is_file():
            return None
        stat = path.stat()
        stats.append([spec.name, stat.st_size, stat.st_mtime_ns])
    return stable_hash(stats)


def catalog_source_sensor(settings: Settings, assets: Sequence) -> dg.SensorDefinition:
    """`assets`: every asset of the Definitions, to resolve what lies downstream of each catalog."""
    catalogs = {domain: dg.AssetKey([domain, "catalog"]) for domain in settings.domains}
    downstream = {domain: sorted(dg.AssetSelection.assets(key).downstream().resolve(assets))
                  for domain, key in catalogs.items()}

    @dg.sensor(name=SENSOR_NAME, minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.STOPPED,
               target=dg.AssetSelection.assets(*catalogs.values()).downstream(),
               description="Rebuilds a domain's catalog and everything downstream when its source files change.")
    def sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
        seen: dict[str, dict[str, str]] = json.loads(context.cursor) if context.cursor else {}
        state, runs, observations, missing = dict(seen), [], [], []
        for domain in settings.domains:
            stat = source_stat_signature(settings, domain)
            previous = seen.get(domain, {})
            if stat is None:
                missing.append(domain)
                continue
            if previous.get("stat") == stat:
                continue
            fingerprint = source_fingerprint(settings, domain)
            state[domain] = {"stat": stat, "fingerprint": fingerprint}
            if previous.get("fingerprint") == fingerprint:
                continue  # touched, same content
            observations.append(dg.AssetObservation(asset_key=[domain, "catalog_source"],
                                                    tags={DATA_VERSION_TAG: fingerprint}))
            if previous:  # a change since the last tick, not the first tick's baseline
                runs.append(dg.RunRequest(run_key=f"{domain}-{fingerprint}-{stat}", asset_selection=downstream[domain],
                                          tags={"r4t/trigger": SENSOR_NAME, "r4t/domain": domain}))
        if state == seen:
            return dg.SkipReason(f"source files missing for {', '.join(missing)}" if missing
                                 else "catalog sources unchanged")
        return dg.SensorResult(run_requests=runs, asset_events=observations, cursor=json.dumps(state, sort_keys=True))

    return sensor
