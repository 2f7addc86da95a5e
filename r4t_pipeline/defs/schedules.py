"""Periodic retraining: once a week, re-materialise every FOLM checkpoint and everything downstream of it
(synthetic targets, diffusion checkpoints, evaluations, latency benchmark, report). Off by default: switch it
on under Automation in the UI.

Each training stage keeps checkpoints, so a retry after a crash resumes instead of starting over.
"""

from __future__ import annotations

from collections.abc import Sequence

import dagster as dg

SCHEDULE_NAME = "weekly_retraining"
RETRAINING_CRON = "0 3 * * 0"  # Sundays 03:00 UTC, when nobody waits for the machine


def retraining_schedule(catalogs: Sequence[str], regimes: Sequence[str], assets: Sequence) -> dg.ScheduleDefinition:
    """`assets`: every asset of the Definitions, to resolve what lies downstream of the FOLM checkpoints."""
    checkpoints = [dg.AssetKey([c, r, "folm_checkpoint"]) for c in catalogs for r in regimes]
    selection = dg.AssetSelection.assets(*checkpoints).downstream()
    keys = sorted(selection.resolve(assets))

    @dg.schedule(name=SCHEDULE_NAME, cron_schedule=RETRAINING_CRON, execution_timezone="UTC", target=selection,
                 default_status=dg.DefaultScheduleStatus.STOPPED,
                 description="Weekly: retrain the FOLM checkpoints and rebuild everything downstream of them.")
    def schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
        return dg.RunRequest(run_key=f"{SCHEDULE_NAME}-{context.scheduled_execution_time:%Y-%m-%dT%H:%M}",
                             asset_selection=keys, tags={"r4t/trigger": SCHEDULE_NAME})

    return schedule
