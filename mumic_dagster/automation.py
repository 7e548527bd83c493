"""When retraining happens: on a schedule, and when a new batch lands in the incoming folder."""

import json

import dagster as dg

from mumic_dagster.jobs import retrain_job
from mumic_dagster.resources import ProjectResource
from mumic_ml.batches import discover_batches
from mumic_ml.config import load_params

_PARAMS = load_params()

retrain_schedule = dg.ScheduleDefinition(
    name="retrain_schedule",
    job=retrain_job,
    cron_schedule=_PARAMS.schedule.retrain_cron,
    execution_timezone=_PARAMS.schedule.timezone,
    description="Periodic retraining on every batch so far (params.yaml: schedule.retrain_cron). Off until "
    "switched on in the UI (Automation tab) or with `dagster schedule start retrain_schedule`.",
)


@dg.sensor(
    name="new_data_sensor",
    job=retrain_job,
    minimum_interval_seconds=60,
    description="Starts retraining when a new or changed batch (a folder with a manifest) appears in the incoming "
    "folder. The cursor remembers each batch's manifest hash, so a batch never triggers twice.",
)
def new_data_sensor(context: dg.SensorEvaluationContext, project: ProjectResource) -> dg.SensorResult:
    seen: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    batches = discover_batches(project.paths().incoming)
    new = {b.batch_id: b.fingerprint for b in batches if seen.get(b.batch_id) != b.fingerprint}
    if not new:
        return dg.SensorResult(skip_reason=dg.SkipReason(f"no new batch among {len(batches)} known"))
    run_key = "batches:" + ",".join(f"{k}@{v[:12]}" for k, v in sorted(new.items()))
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=run_key, tags={"mumic/new_batches": ",".join(sorted(new))})],
        cursor=json.dumps({**seen, **new}, sort_keys=True),
    )
