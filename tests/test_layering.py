"""The package's layering, read from the source: imports (at module level or inside functions) only go down.

No module of the core imports one that imports it back, the orchestration is never imported by the core, and
what needs the pipeline extra (`mumic_ml.pipeline`) is imported only by the steps and the CLI above it. The
Dagster code location loads without the heavy frameworks, which only the steps that use them import.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mumic_ml"
TOP = {"mumic_ml.steps", "mumic_ml.cli", "mumic_ml.__main__"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The package's own modules that `path` imports anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        found |= {name for name in names if name in known or name.startswith("mumic_dagster")}
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    known = set(paths)
    return {name: imported_modules(path, known) - {name, "mumic_ml"} for name, path in paths.items()}


def test_the_core_never_imports_the_orchestration(graph):
    assert {name: sorted(i for i in deps if i.startswith("mumic_dagster")) for name, deps in graph.items()} == {
        name: [] for name in graph
    }


def test_only_the_steps_and_the_cli_import_the_pipeline_extras_modules(graph):
    importers = {
        name
        for name, deps in graph.items()
        if any(dep.startswith("mumic_ml.pipeline.") for dep in deps) and not name.startswith("mumic_ml.pipeline")
    }
    assert importers <= TOP, sorted(importers - TOP)


def test_nothing_below_imports_the_steps_or_the_cli(graph):
    assert {name for name, deps in graph.items() if deps & TOP and name not in TOP} == set()


def test_imports_form_no_cycle(graph):
    visiting, done = set(), set()

    def visit(name: str, trail: list[str]) -> None:
        if name in done:
            return
        assert name not in visiting, " -> ".join([*trail, name])
        visiting.add(name)
        for dep in sorted(graph.get(name, ())):
            visit(dep, [*trail, name])
        visiting.discard(name)
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


def test_the_code_location_loads_without_the_frameworks_its_steps_import():
    """The code server, every run worker and every step process load the definitions first: a step that ingests or
    promotes must not pay for torch, open_clip, Great Expectations and MLflow (about 10 s of CPU per process)."""
    heavy = ["torch", "open_clip", "torchvision", "great_expectations", "mlflow", "dvc"]
    script = (
        f"import json, sys, mumic_dagster.definitions\nprint(json.dumps([m for m in {heavy!r} if m in sys.modules]))"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) == []
