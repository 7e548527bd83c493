"""The MLOps side of MuMIC: MLflow tracking (`tracking`) and registry (`registry`), Great Expectations validation
(`validate`).

These modules import the `pipeline` extra (`pip install 'mumic[pipeline]'`) at module level; the rest of `mumic_ml`
imports them only inside the functions that need them, so a plain install imports the whole core. This package
itself imports nothing of the extra, so the CLI can name what is missing.
"""

from __future__ import annotations

# The top-level modules of each extra's distributions (pyproject.toml), as `import` spells them: `pipeline` for
# the embedded default, `services` for PostgreSQL and S3 (docs/deployment.md).
EXTRA_MODULES = frozenset({"dagster", "dvc", "great_expectations", "mlflow"})
SERVICES_EXTRA_MODULES = frozenset({"dagster_postgres", "psycopg", "psycopg2", "dvc_s3", "boto3", "botocore"})
# The variable that names the MLflow tracking store, here so that reading it needs no MLflow.
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"


class ServiceUnavailable(RuntimeError):
    """A shared service cannot be used as configured (`services`); the message is one line that says what to fix.

    Defined here, outside the modules that need the extra, so the CLI can catch it without importing them."""


def missing_extra_module(exc: ModuleNotFoundError) -> tuple[str, str] | None:
    """The extra and its module whose absence raised `exc`; None when something else is missing (a broken install
    of some other package should show its own traceback)."""
    top_level = (exc.name or "").partition(".")[0]
    if top_level in EXTRA_MODULES:
        return "pipeline", top_level
    if top_level in SERVICES_EXTRA_MODULES:
        return "services", top_level
    return None
