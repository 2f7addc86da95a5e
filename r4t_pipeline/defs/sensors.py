"""A sensor that rebuilds a catalog, and everything downstream of it, when its source changes: files edited in
place, a folder refreshed, or rows inserted/updated in the database. Off by default: switch it on under
Automation in the UI (the daemon of `dagster dev` then runs it).

Each tick asks every catalog's source for its cheap change signature (file sizes and mtimes; for a database,
the fingerprint query); only when that changed does it compute the source's data version (the files' content
hash; for a database the same fingerprint). The cursor keeps both per catalog. The first tick records a
baseline and requests nothing; a new data version requests one run of `<catalog>/catalog` and its downstream
assets and reports the new data version of `<catalog>/catalog_source`, so the run's lineage records the source
it was built from.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import dagster as dg
from dagster._core.definitions.data_version import DATA_VERSION_TAG

from r4t_pipeline.catalog import CatalogError
from r4t_pipeline.catalogs import CatalogEntry

SENSOR_NAME = "catalog_source_sensor"


def catalog_source_sensor(entries: Mapping[str, CatalogEntry], assets: Sequence) -> dg.SensorDefinition:
    """`assets`: every asset of the Definitions, to resolve what lies downstream of each catalog."""
    catalogs = {name: dg.AssetKey([name, "catalog"]) for name in entries}
    downstream = {name: sorted(dg.AssetSelection.assets(key).downstream().resolve(assets))
                  for name, key in catalogs.items()}

    @dg.sensor(name=SENSOR_NAME, minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.STOPPED,
               target=dg.AssetSelection.assets(*catalogs.values()).downstream(),
               description="Rebuilds a catalog and everything downstream when its source (files or database) "
                           "changes.")
    def sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
        seen: dict[str, dict[str, str]] = json.loads(context.cursor) if context.cursor else {}
        state, runs, observations, unavailable = dict(seen), [], [], []
        for name, entry in entries.items():
            previous = seen.get(name, {})
            try:
                signature = entry.source.change_signature()
                if signature is not None and previous.get("signature") != signature:
                    fingerprint = signature if entry.source.signature_is_data_version else entry.source.data_version()
            except (CatalogError, OSError) as err:  # the database is down, a file is unreadable: try again later
                context.log.warning(f"{name}: source not readable this tick ({err})")
                signature = None
            if signature is None:
                unavailable.append(name)
                continue
            if previous.get("signature") == signature:
                continue
            state[name] = {"signature": signature, "fingerprint": fingerprint}
            if previous.get("fingerprint") == fingerprint:
                continue  # touched, same content
            observations.append(dg.AssetObservation(asset_key=[name, "catalog_source"],
                                                    tags={DATA_VERSION_TAG: fingerprint}))
            if previous:  # a change since the last tick, not the first tick's baseline
                runs.append(dg.RunRequest(run_key=f"{name}-{fingerprint}-{signature}", asset_selection=downstream[name],
                                          tags={"r4t/trigger": SENSOR_NAME, "r4t/catalog": name}))
        if state == seen:
            return dg.SkipReason(f"catalog sources unavailable: {', '.join(unavailable)}" if unavailable
                                 else "catalog sources unchanged")
        return dg.SensorResult(run_requests=runs, asset_events=observations, cursor=json.dumps(state, sort_keys=True))

    return sensor
