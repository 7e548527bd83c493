"""When retraining happens: on a schedule, and when a new batch lands in the incoming folder."""

import json
from pathlib import Path

import dagster as dg

from mumic_dagster.jobs import retrain_job
from mumic_dagster.resources import ProjectResource
from mumic_ml.batches import LEDGER, discover_batches
from mumic_ml.io import read_json

# The schedule is fixed when the code location loads, from the project the default `project` resource names (the
# working directory workspace.yaml gives); without its params.yaml the code location fails to load, by design.
_SCHEDULE = ProjectResource().load().params.schedule

retrain_schedule = dg.ScheduleDefinition(
    name="retrain_schedule",
    job=retrain_job,
    cron_schedule=_SCHEDULE.retrain_cron,
    execution_timezone=_SCHEDULE.timezone,
    description="Periodic retraining on every batch so far (params.yaml: schedule.retrain_cron). Off until "
    "switched on in the UI (Automation tab) or with `dagster schedule start retrain_schedule`.",
)


@dg.sensor(
    name="new_data_sensor",
    job=retrain_job,
    minimum_interval_seconds=60,
    description="Starts retraining when a new or changed batch (a folder with a manifest) appears in the incoming "
    "folder. A batch whose manifest hash is in the ingest ledger (batches.json in paths.ingested) is not new, so "
    "switching the sensor on after `make demo` waits for new data; the cursor remembers each batch's manifest hash "
    "it fired for, so a batch never triggers twice.",
)
def new_data_sensor(context: dg.SensorEvaluationContext, project: ProjectResource) -> dg.SensorResult:
    seen: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    loaded = project.load()
    ingested = ingested_fingerprints(loaded.ingested)
    batches = discover_batches(loaded.incoming)
    new = {
        b.batch_id: b.fingerprint
        for b in batches
        if b.fingerprint not in (seen.get(b.batch_id), ingested.get(b.batch_id))
    }
    if not new:
        return dg.SensorResult(
            skip_reason=dg.SkipReason(f"no new batch among {len(batches)} known ({len(ingested)} ingested)")
        )
    run_key = "batches:" + ",".join(f"{k}@{v[:12]}" for k, v in sorted(new.items()))
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=run_key, tags={"mumic/new_batches": ",".join(sorted(new))})],
        cursor=json.dumps({**seen, **new}, sort_keys=True),
    )


def ingested_fingerprints(ingested_dir: Path) -> dict[str, str]:
    """Manifest hash of each batch already ingested: the sensor's baseline, so data a run (or `make demo`) has
    already taken in never counts as new, even when the sensor starts with an empty cursor."""
    ledger_path = ingested_dir / LEDGER
    if not ledger_path.is_file():
        return {}
    return {batch_id: entry["fingerprint"] for batch_id, entry in read_json(ledger_path).items()}
