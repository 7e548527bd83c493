"""The README's commands, run as written in a copy of the repository: `make demo` on a small demo world, then the
Dagster UI (`make ui`) showing its runs, and `mumic predict` against the champion in the registry. `make repro`
is in test_dvc.py, `make serve` and `make mlflow-ui` in test_serving_safety.py."""

import json
import urllib.request

import dagster as dg
import pytest
from repo_copy import clean_env, copy_repository, free_port, make_target, run_as_written, wait_for
from test_launch import DEMO_REPOSITORY_LABEL, runs_listed_on_job_page
from test_pipeline import SMALL

from mumic_dagster.automation import new_data_sensor
from mumic_dagster.resources import ProjectResource

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_repo(tmp_path_factory):
    root = copy_repository(tmp_path_factory.mktemp("readme") / "repo", SMALL)
    proc = run_as_written(root, ["make", "demo"], timeout=1500)
    assert proc.returncode == 0, f"make demo failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return root, proc.stdout


def test_make_demo_runs_show_on_job_pages_and_the_sensor_then_waits(demo_repo):
    root, output = demo_repo
    assert "champion: version 1" in output
    for job_name in ("retrain_job", "promote_job"):
        [run] = runs_listed_on_job_page(root / ".dagster_home", job_name, DEMO_REPOSITORY_LABEL)
        assert run.status == dg.DagsterRunStatus.SUCCESS and run.remote_job_origin is not None
    assert (root / "mlflow.db").is_file() and (root / "mlartifacts").is_dir()  # the project's own embedded stores
    project = ProjectResource(root=str(root))
    after_demo = new_data_sensor(dg.build_sensor_context(cursor=None, resources={"project": project}))
    assert not after_demo.run_requests


def test_mumic_predict_scores_a_photo_with_the_champion_and_an_extra_class(demo_repo):
    root, _ = demo_repo
    image = next((root / "data" / "incoming" / "demo" / "images").glob("*.png"))
    command = [".venv/bin/mumic", "predict", "--model", "models:/mumic@champion", str(image)]
    proc = run_as_written(root, [*command, "--extra-class", "rooftop pool"])
    assert proc.returncode == 0, proc.stderr
    [row] = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert row["image"] == str(image) and row["labels"] and len(row["scores"]) == len(row["labels"])
    assert row["scores"] == sorted(row["scores"], reverse=True)


def test_make_ui_lists_the_demo_runs_under_the_code_location(demo_repo, tmp_path):
    root, _ = demo_repo
    port, log = free_port(), tmp_path / "ui.log"
    query = """{ runsOrError(filter: {pipelineName: "retrain_job"}) {
        ... on Runs { results { status repositoryOrigin { repositoryLocationName } } } } }"""
    with make_target(root, "ui", port, clean_env(), log) as proc:
        wait_for(f"http://127.0.0.1:{port}/server_info", proc, log)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/graphql",
            data=json.dumps({"query": query}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            runs = json.loads(response.read())["data"]["runsOrError"]["results"]
    assert [run["status"] for run in runs] == ["SUCCESS"]
    assert runs[0]["repositoryOrigin"]["repositoryLocationName"] == "mumic_dagster.definitions"
