"""Everything Dagster loads (`workspace.yaml` points here): assets, checks, jobs, schedule, sensor, resources."""

from __future__ import annotations

import dagster as dg

from mumic_dagster import assets
from mumic_dagster.automation import new_data_sensor, retrain_schedule
from mumic_dagster.jobs import promote_job, retrain_job
from mumic_dagster.resources import default_resources

defs = dg.Definitions(
    assets=dg.load_assets_from_modules([assets]),
    jobs=[retrain_job, promote_job],
    schedules=[retrain_schedule],
    sensors=[new_data_sensor],
    resources=default_resources(),
)
