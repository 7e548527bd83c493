"""Jobs: retrain the whole graph, and promote the challenger to champion."""

import dagster as dg

from mumic_dagster.catalogue import CATALOGUE
from mumic_dagster.resources import MlflowResource, ProjectResource
from mumic_ml import steps

# The tag the instance's run queue limits (deploy/dagster.yaml: one run at a time holds the training device); a
# job that trains carries it, so runs from the UI, the schedule, the sensor and `mumic_dagster.launch` all queue.
GPU_TAG, TRAIN = "mumic/gpu", "train"

retrain_job = dg.define_asset_job(
    "retrain_job",
    tags={GPU_TAG: TRAIN},
    # The catalogue follows the champion (champion_sensor), which a retrain does not move.
    selection=dg.AssetSelection.all() - dg.AssetSelection.groups(CATALOGUE),
    description="Ingest new batches, validate, split, fine-tune, evaluate and register behind the gate.",
)


class PromoteConfig(dg.Config):
    """Promote a version (default: the challenger) to champion; `force` skips the not-worse-than-champion rule,
    `rollback` instead puts champion back on the previous champion."""

    version: str = ""
    force: bool = False
    rollback: bool = False


@dg.op
def promote_challenger(
    context: dg.OpExecutionContext, config: PromoteConfig, project: ProjectResource, mlflow: MlflowResource
) -> None:
    outcome = steps.promote_step(
        mlflow.track(project.load()),
        version=config.version or None,
        force=config.force,
        rollback=config.rollback,
    )
    context.log.info(outcome.message)
    if not outcome.moved and not config.rollback:
        raise dg.Failure(description=outcome.message)
    context.add_output_metadata({"champion_version": outcome.champion_version, "message": outcome.message})


@dg.job(description="Move the `champion` alias to the challenger if it is not worse (or roll back).")
def promote_job() -> None:
    promote_challenger()
