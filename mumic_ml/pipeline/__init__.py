"""The MLOps side of MuMIC: MLflow tracking (`tracking`) and registry (`registry`), Great Expectations validation
(`validate`).

These modules import the `pipeline` extra (`pip install 'mumic[pipeline]'`) at module level; the rest of `mumic_ml`
imports them only inside the functions that need them, so a plain install imports the whole core. This package
itself imports nothing of the extra, so the CLI can name what is missing.
"""

from __future__ import annotations

INSTALL_EXTRA = "pip install 'mumic[pipeline]'"
# The top-level modules of the extra's distributions (pyproject.toml), as `import` spells them.
EXTRA_MODULES = frozenset({"dagster", "dvc", "great_expectations", "mlflow"})


class ServiceUnavailable(RuntimeError):
    """A shared service cannot be used as configured (`services`); the message is one line that says what to fix.

    Defined here, outside the modules that need the extra, so the CLI can catch it without importing them."""


def missing_extra_module(exc: ModuleNotFoundError) -> str | None:
    """The module of the extra whose absence raised `exc`; None when something else is missing (a broken install
    of some other package should show its own traceback)."""
    top_level = (exc.name or "").partition(".")[0]
    return top_level if top_level in EXTRA_MODULES else None
