"""`make demo`'s launcher: its runs go through a workspace's code location as the UI's do, so the job's Runs tab
(the `.dagster/repository` tag) and the Overview timeline (the run's remote origin) list them; it waits for each
run, fails when a run fails, and leaves no process behind. Code servers listen on Unix sockets, not on TCP."""

import textwrap
from pathlib import Path

import dagster as dg
import psutil
import pytest
import yaml
from dagster._core.storage.tags import REPOSITORY_LABEL_TAG
from test_pipeline import make_project

from mumic_dagster import launch

REPO = Path(__file__).resolve().parents[1]
DEMO_REPOSITORY_LABEL = "__repository__@mumic_dagster.definitions"  # what the UI filters the repo's job pages on
TINY_LOCATION = textwrap.dedent(
    """
    import dagster as dg

    class Greeting(dg.Config):
        name: str = "world"

    @dg.op
    def say_hello(context, config: Greeting) -> None:
        context.log.info(f"hello {config.name}")

    @dg.op
    def break_down() -> None:
        raise ValueError("the tiny job broke")

    @dg.job
    def tiny_job():
        say_hello()

    @dg.job
    def broken_job():
        break_down()

    defs = dg.Definitions(jobs=[tiny_job, broken_job])
    """
)


@pytest.fixture
def dagster_home(tmp_path, monkeypatch) -> Path:
    """A throwaway instance like `make demo`'s: SQLite, default run coordinator (a queue) and run launcher."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home


@pytest.fixture
def tiny_workspace(tmp_path) -> Path:
    (tmp_path / "tiny_location.py").write_text(TINY_LOCATION)
    workspace = tmp_path / "workspace.yaml"
    workspace.write_text(
        "load_from:\n  - python_file:\n      relative_path: tiny_location.py\n      location_name: tiny\n"
    )
    return workspace


@pytest.fixture
def no_process_left_behind():
    before = {child.pid for child in psutil.Process().children(recursive=True)}
    yield
    left = [c for c in psutil.Process().children(recursive=True) if c.pid not in before and c.is_running()]
    assert not [c for c in left if c.status() != psutil.STATUS_ZOMBIE], [c.cmdline() for c in left]


def runs_listed_on_job_page(home: Path, job_name: str, repository_label: str) -> list[dg.DagsterRun]:
    """The runs the UI's job page shows: its Runs tab filters on job name and repository label."""
    with dg.DagsterInstance.from_config(str(home)) as instance:
        return list(instance.get_runs(dg.RunsFilter(job_name=job_name, tags={REPOSITORY_LABEL_TAG: repository_label})))


def test_a_launched_run_belongs_to_its_code_location(dagster_home, tiny_workspace, no_process_left_behind, capsys):
    assert launch.main(["-w", str(tiny_workspace), "tiny_job"]) == 0
    [run] = runs_listed_on_job_page(dagster_home, "tiny_job", "__repository__@tiny")
    assert run.status == dg.DagsterRunStatus.SUCCESS
    # The Overview timeline places a run by its repository origin and skips runs without one.
    origin = run.remote_job_origin
    assert origin is not None and origin.job_name == "tiny_job"
    assert origin.repository_origin.code_location_origin.location_name == "tiny"
    assert run.tags[launch.LAUNCHED_BY_TAG] == "mumic_dagster.launch"
    assert f"tiny_job: run {run.run_id} SUCCESS" in capsys.readouterr().out


def test_a_failed_run_fails_the_launch_and_stops_the_sequence(
    dagster_home, tiny_workspace, no_process_left_behind, capsys
):
    assert launch.main(["-w", str(tiny_workspace), "broken_job", "tiny_job"]) == 1
    [run] = runs_listed_on_job_page(dagster_home, "broken_job", "__repository__@tiny")
    assert run.status == dg.DagsterRunStatus.FAILURE
    captured = capsys.readouterr()
    assert "step break_down failed: ValueError: the tiny job broke" in captured.out
    assert "not run after the failure: tiny_job" in captured.err
    assert not runs_listed_on_job_page(dagster_home, "tiny_job", "__repository__@tiny")


def test_an_unknown_job_creates_no_run(dagster_home, tiny_workspace, no_process_left_behind, capsys):
    assert launch.main(["-w", str(tiny_workspace), "tiny_job", "no_such_job"]) == 2
    assert "no_such_job" in capsys.readouterr().err
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        assert not instance.get_runs()


def test_run_config_from_a_file_reaches_the_ops_and_the_executor(
    dagster_home, tiny_workspace, tmp_path, no_process_left_behind
):
    config = {"ops": {"say_hello": {"config": {"name": "team"}}}, "execution": {"config": {"in_process": {}}}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    assert launch.main(["-w", str(tiny_workspace), "-c", str(tmp_path / "run.yaml"), "tiny_job"]) == 0
    [run] = runs_listed_on_job_page(dagster_home, "tiny_job", "__repository__@tiny")
    assert run.run_config == config
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        messages = [entry.user_message for entry in instance.all_logs(run.run_id)]
    assert "hello team" in messages
    assert any("in_process" in m or "in process" in m for m in messages), messages


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ops: {say_hello: {config: {nmae: team}}}", "nmae"),
        ("ops: [unclosed", "cannot read run config"),
        ("- a list", "must be a mapping"),
    ],
)
def test_a_bad_run_config_creates_no_run(dagster_home, tiny_workspace, tmp_path, capsys, text, expected):
    (tmp_path / "run.yaml").write_text(text)
    assert launch.main(["-w", str(tiny_workspace), "-c", str(tmp_path / "run.yaml"), "tiny_job"]) == 2
    assert expected in capsys.readouterr().err
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        assert not instance.get_runs()


@pytest.mark.slow
def test_make_demo_workspace_launches_into_the_projects_code_location(
    dagster_home, tmp_path, monkeypatch, no_process_left_behind, capsys
):
    # The repository's own workspace.yaml, as `make demo` uses it; the project is the working directory.
    monkeypatch.chdir(make_project(tmp_path / "project", {"demo": {"n_images": 12}}))
    assert launch.main(["-w", str(REPO / "workspace.yaml"), "promote_job"]) == 1
    [run] = runs_listed_on_job_page(dagster_home, "promote_job", DEMO_REPOSITORY_LABEL)
    assert run.status == dg.DagsterRunStatus.FAILURE
    assert run.remote_job_origin.repository_origin.code_location_origin.location_name == "mumic_dagster.definitions"
    assert "step promote_challenger failed: " in capsys.readouterr().out  # nothing registered yet to promote
