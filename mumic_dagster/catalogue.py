"""The photo catalogue: every photo in `paths.unlabelled` tagged by the current champion, retagged when it moves.

The champion is an alias in the MLflow registry. It moves through `promote_job`, through `mumic promote` outside
Dagster, or through a rollback, and none of these materializes an asset: `registered_model` materializes when a
challenger is registered, before any promotion. So neither an automation condition on `registered_model` nor an
asset sensor follows the champion; `champion_sensor` reads the alias itself and requests `catalogue_job` whenever
it names a model the catalogue was not yet tagged with.
"""

import hashlib
import json
from typing import TYPE_CHECKING

import dagster as dg

from mumic_dagster.assets import OWNERS, registered_model
from mumic_dagster.metadata import clean, markdown_image, table
from mumic_dagster.resources import ComputeResource, MlflowResource, ProjectResource
from mumic_ml.plots import label_histogram
from mumic_ml.project import Project

if TYPE_CHECKING:
    from mumic_ml.pipeline.registry import ModelVersionInfo

CATALOGUE = "catalogue"
# Labels listed in the asset's top-labels table; the histogram shows every tag.
TOP_LABELS = 20


def _champion(project: Project) -> tuple["ModelVersionInfo | None", str | None]:
    """The champion's version and the tracking store it was read from (one that answers, as for the CLI)."""
    from mumic_ml.pipeline.registry import current_champion
    from mumic_ml.pipeline.services import reachable_tracking_location

    uri, _ = reachable_tracking_location(project)
    return current_champion(project.params.mlflow.registered_model, tracking_uri=uri), uri


@dg.asset(deps=[registered_model], group_name=CATALOGUE, owners=OWNERS, kinds={"pytorch", "parquet"})
def catalogue_tags(
    context: dg.AssetExecutionContext, project: ProjectResource, mlflow: MlflowResource, compute: ComputeResource
) -> dg.MaterializeResult:
    """Every photo under `paths.unlabelled` (searched recursively) tagged by the current champion into
    `reports/tags.parquet`: per photo its top labels and scores, every label above the model's tuned threshold,
    and an error for a photo that cannot be read. `champion_sensor` runs it each time the champion moves. Look at
    `label_histogram` and `top_labels`: what the collection holds as the champion sees it, a class that never
    appears, or one that is everywhere. A missing or empty folder materializes with 0 images and says so."""
    from mumic_ml.pipeline.registry import resolve_model_uri
    from mumic_ml.runtime import resolve_device
    from mumic_ml.tagging import list_images, tag_images

    loaded = mlflow.track(project.load())
    champion, tracking_uri = _champion(loaded)
    name = loaded.params.mlflow.registered_model
    if champion is None:
        raise dg.Failure(description=f"model {name!r} has no champion yet: promote one (promote_job, mumic promote)")
    # The version, not the alias: the alias may move while this run tags, and the tags must name one model.
    model_dir = resolve_model_uri(champion.uri, tracking_uri=tracking_uri)
    folder = loaded.unlabelled
    summary = tag_images(
        model_dir,
        list_images(folder) if folder.is_dir() else iter(()),
        loaded.catalogue_tags,
        source=str(folder),
        config=loaded.params.tag,
        device=resolve_device(compute.device),
        replace_other_run=True,  # an unfinished run of an earlier champion is superseded, never mixed in
    )
    note = None
    if not summary.images:
        note = f"no photos to tag: {folder} {'is empty' if folder.is_dir() else 'does not exist'}"
        context.log.info(note)
    context.log.info("tagged %d of %d photos with %s", summary.tagged, summary.images, champion.uri)
    counts = summary.tag_counts
    top_rows = [
        {"label": label, "tagged_images": n, "top_ranked_images": summary.top_label_counts.get(label, 0)}
        for label, n in list(counts.items())[:TOP_LABELS]
    ]
    return dg.MaterializeResult(
        metadata=clean(
            {
                "images": summary.images,
                "tagged": summary.tagged,
                "errors": summary.errors,
                "images_per_s": summary.images_per_s,
                "note": note,
                "champion_version": champion.version,
                "model_uri": champion.uri,
                "label_histogram": markdown_image("images per tag", label_histogram(counts)) if counts else None,
                "top_labels": table(top_rows, ["label", "tagged_images", "top_ranked_images"]),
                "tags": dg.MetadataValue.path(str(summary.out)),
            }
        )
    )


catalogue_job = dg.define_asset_job(
    "catalogue_job",
    selection=[catalogue_tags],
    description="Tag the unlabelled photos with the current champion (started by champion_sensor).",
)


def _champion_key(champion: "ModelVersionInfo") -> str:
    # The source names the logged model, so a registry reset that reuses version numbers still counts as a move.
    return f"{champion.version}:{hashlib.sha256(champion.source.encode()).hexdigest()[:12]}"


@dg.sensor(
    name="champion_sensor",
    job=catalogue_job,
    minimum_interval_seconds=60,
    description="Retags the unlabelled photos (catalogue_job) whenever the champion alias names another model: a "
    "promotion by promote_job or `mumic promote`, or a rollback. The cursor remembers the champion it last "
    "requested a run for.",
)
def champion_sensor(
    context: dg.SensorEvaluationContext, project: ProjectResource, mlflow: MlflowResource
) -> dg.SensorResult:
    champion, _ = _champion(mlflow.track(project.load()))
    if champion is None:
        return dg.SensorResult(skip_reason=dg.SkipReason("no champion yet"))
    last = json.loads(context.cursor) if context.cursor else {}
    key = _champion_key(champion)
    if last.get("champion") == key:
        return dg.SensorResult(skip_reason=dg.SkipReason(f"the catalogue follows champion version {champion.version}"))
    moves = last.get("moves", 0) + 1
    return dg.SensorResult(
        # One key per move: a rollback to a version tagged before is a new move and must run again.
        run_requests=[
            dg.RunRequest(run_key=f"champion-move-{moves}", tags={"mumic/champion_version": str(champion.version)})
        ],
        cursor=json.dumps({"champion": key, "moves": moves}),
    )
