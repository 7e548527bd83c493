"""The README's commands, run as written in a copy of the repository: `make demo` on a small demo world, `mumic
predict` against the champion in the registry, and the two UIs (`make ui`, `make mlflow-ui`) looked at in a real
browser (headless Chromium through Playwright): the asset graph, the evaluation plots and the gate, a run
launched from the UI, the MLflow run's figures and the model card. Screenshots go to reports/ui/. `make repro` is
in test_dvc.py, `make serve` in test_serving_safety.py."""

import json
import time
import urllib.request
from pathlib import Path

import dagster as dg
import pytest
from mlflow.tracking import MlflowClient
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from repo_copy import REPO, copy_repository, make, run_as_written, serving
from test_launch import DEMO_REPOSITORY_LABEL, runs_listed_on_job_page
from test_pipeline import ASSET_NAMES, SMALL

from mumic_dagster.automation import new_data_sensor
from mumic_dagster.resources import ProjectResource

pytestmark = pytest.mark.slow
SCREENSHOTS = REPO / "reports" / "ui"
CHROMIUM = "/usr/bin/chromium"
# Headless and quiet: nothing but the loopback UIs is reachable, and Chromium's own background traffic would only
# fail (and slow the page) on a closed network.
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def demo_repo(tmp_path_factory):
    root = copy_repository(tmp_path_factory.mktemp("readme") / "repo", SMALL)
    proc = run_as_written(root, make("demo"), timeout=1500)
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


@pytest.fixture(scope="module")
def dagster_ui(demo_repo, tmp_path_factory):
    """`make ui` (dagster dev: webserver, daemon, code server) on the demo's instance; its base URL."""
    with serving(demo_repo[0], "ui", "/server_info", tmp_path_factory.mktemp("ui") / "ui.log") as url:
        yield url


@pytest.fixture(scope="module")
def mlflow_ui(demo_repo, tmp_path_factory):
    """`make mlflow-ui` on the demo's own store; its base URL."""
    with serving(demo_repo[0], "mlflow-ui", "/", tmp_path_factory.mktemp("mlflow_ui") / "ui.log") as url:
        yield url


@pytest.fixture(scope="module")
def page():
    """A page of the system's headless Chromium (Playwright cannot download its own browser here)."""
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"the browser tests need {CHROMIUM}: `apt-get install chromium` (.ci/run installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser.new_page(viewport={"width": 1400, "height": 900})
        browser.close()


def screenshot(page, name: str, **kwargs) -> Path:
    """Kept under the repository's (git-ignored) reports/ for a person to look at."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), **kwargs)
    return path


def dismiss_first_visit_dialog(page) -> None:
    """The UI's community pop-up covers the page on a new instance's first visit."""
    skip = page.get_by_role("button", name="Skip")
    try:
        skip.click(timeout=5000)
    except PlaywrightTimeout:
        pass


def test_make_ui_lists_the_demo_runs_under_the_code_location(dagster_ui):
    query = """{ runsOrError(filter: {pipelineName: "retrain_job"}) {
        ... on Runs { results { status repositoryOrigin { repositoryLocationName } } } } }"""
    body = json.dumps({"query": query}).encode()
    request = urllib.request.Request(f"{dagster_ui}/graphql", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        runs = json.loads(response.read())["data"]["runsOrError"]["results"]
    assert [run["status"] for run in runs] == ["SUCCESS"]
    assert runs[0]["repositoryOrigin"]["repositoryLocationName"] == "mumic_dagster.definitions"


def test_the_asset_graph_in_a_browser_shows_every_retrained_asset(dagster_ui, page):
    # The registered model and the label audit are the graph's two ends; their upstream lineages cover it.
    audit_upstream = {"label_audit", "trained_model", "dataset_splits"}
    lineages = {"registered_model": ASSET_NAMES - {"label_audit"}, "label_audit": audit_upstream}
    assert set().union(*lineages.values()) == ASSET_NAMES
    for end, names in lineages.items():
        page.goto(f"{dagster_ui}/assets/{end}?view=lineage&lineageScope=upstream&lineageDepth=10")
        dismiss_first_visit_dialog(page)
        for name in names:
            page.get_by_text(name, exact=True).first.wait_for(timeout=60_000)
        screenshot(page, f"dagster_asset_graph_{end}")


def test_the_evaluation_page_in_a_browser_shows_its_plots_and_the_gate(dagster_ui, page):
    page.goto(f"{dagster_ui}/assets/model_evaluation")
    dismiss_first_visit_dialog(page)
    page.get_by_text("per_class_ap_plot").first.wait_for(timeout=60_000)
    plots = page.get_by_text("[Show Markdown]")
    assert plots.count() >= 2  # per-class AP and the precision-recall curves
    for index in range(plots.count()):
        plots.nth(index).click()
        image = page.get_by_role("dialog").locator("img").first
        image.wait_for(timeout=30_000)
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
        assert image.evaluate("img => img.naturalWidth") > 100
        if index == 0:
            page.wait_for_timeout(1000)  # the dialog fades in
            screenshot(page, "dagster_evaluation_plot")
        page.get_by_role("dialog").get_by_role("button", name="Close").last.click()
        page.get_by_role("dialog").wait_for(state="hidden", timeout=30_000)
    page.goto(f"{dagster_ui}/assets/model_evaluation?view=checks")
    page.get_by_text("evaluation_gate").first.wait_for(timeout=60_000)
    page.get_by_text("Passed").first.wait_for(timeout=60_000)


def test_materializing_from_the_ui_ends_in_a_successful_run(dagster_ui, page, demo_repo):
    root, _ = demo_repo
    page.goto(f"{dagster_ui}/assets/raw_images")
    dismiss_first_visit_dialog(page)
    page.get_by_text("Materialize", exact=True).click(timeout=60_000)  # the button's label
    deadline, runs = time.monotonic() + 300, []
    with dg.DagsterInstance.from_config(str(root / ".dagster_home")) as instance:
        while time.monotonic() < deadline and not (runs and runs[0].is_finished):
            time.sleep(2)
            runs = [r for r in instance.get_runs() if r.asset_selection == {dg.AssetKey("raw_images")}]
    assert [run.status for run in runs] == [dg.DagsterRunStatus.SUCCESS], runs


def test_the_mlflow_run_page_in_a_browser_shows_the_figures(mlflow_ui, page, demo_repo):
    root, _ = demo_repo
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    version = client.get_model_version_by_alias("mumic", "champion")
    run = client.get_run(version.run_id)
    run_page = f"{mlflow_ui}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    page.goto(f"{run_page}/artifacts/figures/training_curves.png")
    image = page.locator("img[alt='figures/training_curves.png']").first
    image.wait_for(timeout=60_000)
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
    page.get_by_text(run.info.run_name).first.wait_for(timeout=30_000)
    screenshot(page, "mlflow_run_figure")


def test_the_mlflow_model_page_in_a_browser_shows_the_champion_and_the_model_card(mlflow_ui, page):
    page.goto(f"{mlflow_ui}/#/models/mumic/versions/1")
    page.get_by_text("@ champion").first.wait_for(timeout=60_000)
    page.get_by_text("mumic version 1").first.wait_for(timeout=30_000)  # the model card's heading
    page.get_by_text("Data version").first.wait_for(timeout=30_000)
    screenshot(page, "mlflow_model_version")
