"""Resources: where the project lives, which MLflow store to use, which device to train on.

Local defaults need no setup; every value can be overridden from the launchpad or, for secrets and deployment
settings, from the environment through `dg.EnvVar` (resolved at launch time, never shown in the UI).
"""

import os
from pathlib import Path

import dagster as dg

from mumic_ml.config import Params, load_params
from mumic_ml.steps import ProjectPaths


class ProjectResource(dg.ConfigurableResource):
    """The repository (or any folder laid out like it) whose params.yaml and paths the pipeline uses."""

    root: str = "."
    params_file: str = "params.yaml"

    def params(self) -> Params:
        return load_params(self.root_path / self.params_file)

    @property
    def root_path(self) -> Path:
        return Path(self.root).resolve()

    def paths(self) -> ProjectPaths:
        return ProjectPaths(self.root_path, self.params())


class MlflowResource(dg.ConfigurableResource):
    """Tracking and registry store; empty `tracking_uri` means MLFLOW_TRACKING_URI, else params.yaml's default."""

    tracking_uri: str = ""

    def activate(self) -> None:
        if self.tracking_uri:
            os.environ["MLFLOW_TRACKING_URI"] = self.tracking_uri


class ComputeResource(dg.ConfigurableResource):
    """Training device: 'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N'. An unavailable device is an error."""

    device: str = "auto"


def default_resources() -> dict[str, dg.ConfigurableResource]:
    """Embedded defaults: the current folder, MLFLOW_TRACKING_URI or params.yaml's SQLite store, auto device."""
    return {"project": ProjectResource(), "mlflow": MlflowResource(), "compute": ComputeResource()}
