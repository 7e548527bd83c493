"""Everything Dagster loads (`workspace.yaml` points here): assets, checks, jobs, schedule, sensors, resources."""

from __future__ import annotations

import dagster as dg

from mumic_dagster import assets, catalogue
from mumic_dagster.automation import new_data_sensor, retrain_schedule
from mumic_dagster.catalogue import catalogue_job, champion_sensor
from mumic_dagster.jobs import promote_job, retrain_job
from mumic_dagster.resources import default_resources

defs = dg.Definitions(
    assets=dg.load_assets_from_modules([assets, catalogue]),
    jobs=[retrain_job, promote_job, catalogue_job],
    schedules=[retrain_schedule],
    sensors=[new_data_sensor, champion_sensor],
    resources=default_resources(),
)
