"""Resources: where the project lives, which MLflow store to use, which device to train on.

Local defaults need no setup; every value can be overridden from the launchpad or, for secrets and deployment
settings, from the environment through `dg.EnvVar` (resolved at launch time, never shown in the UI). A resource
hands its setting to the steps; none changes the process's environment.
"""

import os

import dagster as dg

from mumic_ml.pipeline import TRACKING_URI_ENV
from mumic_ml.project import Project


class ProjectResource(dg.ConfigurableResource):
    """The repository (or any folder laid out like it) whose params.yaml and paths the pipeline uses; the default
    is the working directory Dagster loads the code location in (workspace.yaml)."""

    root: str = "."
    params_file: str = "params.yaml"

    def load(self) -> Project:
        """The project as it is on disk now: a params.yaml edited between runs applies to the next run."""
        return Project.load(self.root, self.params_file)


class MlflowResource(dg.ConfigurableResource):
    """Tracking and registry store; empty `tracking_uri` means MLFLOW_TRACKING_URI, else params.yaml's default."""

    tracking_uri: str = ""

    def track(self, project: Project) -> Project:
        """`project` with its runs and models going to this store (unset: as the environment and params.yaml say)."""
        return project.with_tracking_uri(self.tracking_uri or None)


class ComputeResource(dg.ConfigurableResource):
    """Training device: 'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N'. An unavailable device is an error."""

    device: str = "auto"


def default_resources() -> dict[str, dg.ConfigurableResource]:
    """Embedded defaults: the current folder, MLFLOW_TRACKING_URI (read at launch) or params.yaml's SQLite store,
    auto device."""
    # EnvVar fails at launch when the variable is unset, so it is used only where the environment names a store.
    tracking_uri = dg.EnvVar(TRACKING_URI_ENV) if os.environ.get(TRACKING_URI_ENV) else ""
    return {
        "project": ProjectResource(),
        "mlflow": MlflowResource(tracking_uri=tracking_uri),
        "compute": ComputeResource(),
    }
