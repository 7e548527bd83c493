"""Launch jobs through the workspace's code location, as the UI does, and wait for each run to finish.

`dagster job execute` runs a job outside any code location: the run has no origin and no repository tag, so the
UI's job pages and Overview timeline never show it. `dagster job launch` only submits to the instance's run queue,
which nothing drains until the daemon runs (`make ui`). This loads workspace.yaml, creates each run the way the UI
does (the job's remote origin, hence the `.dagster/repository` tag) and hands it straight to the run launcher, so
the run executes now in the code location's own server, and this process waits for it.

With `--queue` the run goes to the instance's run queue instead, for a running `dagster-daemon` to start within the
queue's limits: on shared services (deploy/dagster.yaml) one training run at a time, whoever launched the others.
Before anything, the instance's PostgreSQL storage (if it has one) must accept the connection; if not, one line
says which setting to fix instead of Dagster's retries and traceback.

    DAGSTER_HOME=.dagster_home python -m mumic_dagster.launch retrain_job promote_job
    DAGSTER_HOME=/srv/dagster python -m mumic_dagster.launch --queue retrain_job
    DAGSTER_HOME=.dagster_home python -m mumic_dagster.launch -c rollback.yaml promote_job

`-c` takes run config as the launchpad does, e.g. `ops: {promote_challenger: {config: {rollback: true}}}`, or
`execution: {config: {in_process: {}}}` to run every step in the run's own process.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
import yaml
from dagster._core.errors import DagsterUserCodeUnreachableError
from dagster._core.events import DagsterEventType
from dagster._core.remote_representation.external import RemoteJob
from dagster._core.remote_representation.grpc_server_registry import GrpcServerRegistry
from dagster._core.workspace.context import (
    WEBSERVER_GRPC_SERVER_HEARTBEAT_TTL,
    BaseWorkspaceRequestContext,
    WorkspaceProcessContext,
)
from dagster._core.workspace.load_target import WorkspaceFileTarget
from dagster._grpc.constants import GrpcServerCommand
from dagster._utils.error import SerializableErrorInfo

from mumic_ml.pipeline.services import dagster_storage_problem

LAUNCHED_BY_TAG = "mumic/launched_by"
POLL_SECONDS = 1.0
CANCEL_GRACE_SECONDS = 60.0


class LaunchError(Exception):
    """The workspace or a job could not be loaded, so no run was created."""


@dataclass(frozen=True)
class RunOutcome:
    job_name: str
    run_id: str
    status: dg.DagsterRunStatus
    seconds: float
    failures: list[str] = field(default_factory=list)

    @property
    def succeeded(self) -> bool:
        return self.status == dg.DagsterRunStatus.SUCCESS


def launch_jobs(
    instance: dg.DagsterInstance,
    workspace_file: str,
    job_names: Sequence[str],
    *,
    queue: bool = False,
    run_config: Mapping[str, Any] | None = None,
) -> list[RunOutcome]:
    """Run each job in turn, stopping at the first that does not succeed (a later job builds on an earlier one).

    The workspace stays open until the last run ends, because the code location's server executes the runs (with
    `queue`, the daemon's does)."""
    outcomes: list[RunOutcome] = []
    with open_workspace(instance, workspace_file) as workspace:
        remote_jobs = [find_job(workspace, name) for name in job_names]
        for remote_job in remote_jobs:
            run = create_run(workspace, remote_job, run_config)
            where = remote_job.handle.location_name
            how = "queued for" if queue else "launched in"
            print(f"{remote_job.name}: run {run.run_id} {how} code location {where}", flush=True)
            outcome = launch_and_wait(instance, workspace, run, queue=queue)
            print(_summary(outcome), flush=True)
            outcomes.append(outcome)
            if not outcome.succeeded:
                break
    return outcomes


@contextmanager
def open_workspace(instance: dg.DagsterInstance, workspace_file: str) -> Iterator[BaseWorkspaceRequestContext]:
    """The workspace as `dagster dev` loads it, except that its code servers are waited for on exit, so none
    outlives this command or prints over whatever runs next."""
    registry = GrpcServerRegistry(
        instance_ref=instance.get_ref(),
        server_command=GrpcServerCommand.API_GRPC,
        heartbeat_ttl=WEBSERVER_GRPC_SERVER_HEARTBEAT_TTL,
        startup_timeout=instance.code_server_process_startup_timeout,
        wait_for_processes_on_shutdown=True,
    )
    target = WorkspaceFileTarget(paths=[workspace_file])
    with registry, WorkspaceProcessContext(instance, target, grpc_server_registry=registry) as process_context:
        yield process_context.create_request_context()


def find_job(workspace: BaseWorkspaceRequestContext, job_name: str) -> RemoteJob:
    """The job of that name in whichever code location and repository of the workspace defines it."""
    errors = [f"{name}: {error.to_string()}" for name, error in _location_errors(workspace)]
    if errors:
        raise LaunchError("a code location failed to load:\n" + "\n".join(errors))
    matches = [
        repository.get_full_job(job_name)
        for location in workspace.code_locations
        for repository in location.get_repositories().values()
        if repository.has_job(job_name)
    ]
    if len(matches) != 1:
        places = [f"{job.handle.location_name}/{job.handle.repository_name}" for job in matches]
        raise LaunchError(f"job {job_name!r} must be in exactly one repository of the workspace, found in {places}")
    return matches[0]


def create_run(
    workspace: BaseWorkspaceRequestContext, remote_job: RemoteJob, run_config: Mapping[str, Any] | None = None
) -> dg.DagsterRun:
    """A run created as the UI's launchpad creates one: the remote origin is what the job's Runs tab (through the
    `.dagster/repository` tag it implies) and the Overview timeline select on. `run_config` is the launchpad's."""
    run_config = dict(run_config or {})
    plan = workspace.get_execution_plan(remote_job, run_config, step_keys_to_execute=None, known_state=None)
    return workspace.instance.create_run(
        job_name=remote_job.name,
        run_id=None,
        run_config=run_config,
        status=dg.DagsterRunStatus.NOT_STARTED,
        tags={**remote_job.tags, LAUNCHED_BY_TAG: __name__},
        root_run_id=None,
        parent_run_id=None,
        job_snapshot=remote_job.job_snapshot,
        execution_plan_snapshot=plan.execution_plan_snapshot,
        parent_job_snapshot=remote_job.parent_job_snapshot,
        op_selection=None,
        resolved_op_selection=None,
        step_keys_to_execute=plan.execution_plan_snapshot.step_keys_to_execute,
        asset_selection=None,
        asset_check_selection=None,
        remote_job_origin=remote_job.get_remote_origin(),
        job_code_origin=remote_job.get_python_origin(),
        asset_graph=workspace.asset_graph,
    )


def launch_and_wait(
    instance: dg.DagsterInstance, workspace: BaseWorkspaceRequestContext, run: dg.DagsterRun, *, queue: bool = False
) -> RunOutcome:
    """Launch the run (bypassing the queue, which only the daemon drains), or with `queue` submit it to the queue,
    and poll it until it ends; Ctrl-C cancels the run, queued or running, rather than leave it with nobody
    waiting."""
    started = time.monotonic()
    if queue:
        instance.submit_run(run.run_id, workspace)
    else:
        instance.launch_run(run.run_id, workspace)
    try:
        finished = _poll_until_finished(instance, run.run_id, deadline=None)
    except KeyboardInterrupt:
        try:
            instance.run_coordinator.cancel_run(run.run_id)
        except DagsterUserCodeUnreachableError:
            pass  # the code server got the Ctrl-C too; the run worker interrupts itself
        finished = _poll_until_finished(instance, run.run_id, deadline=time.monotonic() + CANCEL_GRACE_SECONDS)
    return RunOutcome(
        job_name=run.job_name,
        run_id=run.run_id,
        status=finished.status,
        seconds=time.monotonic() - started,
        failures=failure_messages(instance, run.run_id) if finished.status != dg.DagsterRunStatus.SUCCESS else [],
    )


def _poll_until_finished(instance: dg.DagsterInstance, run_id: str, deadline: float | None) -> dg.DagsterRun:
    while True:
        run = instance.get_run_by_id(run_id)
        if run is None:
            raise LaunchError(f"run {run_id} disappeared from the instance")
        if run.is_finished or (deadline is not None and time.monotonic() > deadline):
            return run
        time.sleep(POLL_SECONDS)


def failure_messages(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    """Why a run failed, step by step, from its event log (the full logs stay in the UI)."""
    messages = []
    for record in instance.all_logs(run_id, of_type={DagsterEventType.STEP_FAILURE, DagsterEventType.RUN_FAILURE}):
        event = record.dagster_event
        if event.event_type == DagsterEventType.STEP_FAILURE:
            data = event.step_failure_data
            if data.user_failure_data and data.user_failure_data.description:
                reason = data.user_failure_data.description
            else:
                reason = _root_cause(data.error) if data.error else event.message
            messages.append(f"step {event.step_key} failed: {reason}")
        elif not messages:  # a run that failed outside any step (a crashed worker, a launch error)
            error = event.event_specific_data.error if event.event_specific_data else None
            messages.append(_root_cause(error) if error else event.message or "run failed")
    return messages


def _location_errors(workspace: BaseWorkspaceRequestContext):
    for name, entry in workspace.get_code_location_entries().items():
        if entry.load_error:
            yield name, entry.load_error


def _root_cause(error: SerializableErrorInfo) -> str:
    """The user's exception rather than Dagster's wrapper around it ("Error occurred while executing op"): the
    exception the code raised, not what it was raised from (a one-line error keeps its one line)."""
    while error.cause is not None and (error.cls_name or "").startswith("Dagster"):
        error = error.cause
    return error.message.strip()


def _summary(outcome: RunOutcome) -> str:
    lines = [f"{outcome.job_name}: run {outcome.run_id} {outcome.status.value} after {outcome.seconds:.0f}s"]
    lines += [f"  {message}" for message in outcome.failures]
    return "\n".join(lines)


def _read_run_config(path: Path) -> dict[str, Any]:
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise LaunchError(f"cannot read run config {path}: {exc}") from exc
    if not isinstance(config, dict):
        raise LaunchError(f"run config {path} must be a mapping, like the launchpad's YAML")
    return config


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mumic_dagster.launch",
        description="Launch jobs through the workspace's code location (as the UI does) and wait for each; "
        "DAGSTER_HOME selects the instance.",
    )
    parser.add_argument("jobs", nargs="+", help="job names, run in this order; stops at the first failure")
    parser.add_argument("-w", "--workspace", default="workspace.yaml", help="workspace file (default: %(default)s)")
    parser.add_argument(
        "--queue",
        action="store_true",
        help="submit each run to the instance's run queue, for a running dagster-daemon to start within the "
        "queue's limits, instead of launching it now",
    )
    parser.add_argument(
        "-c",
        "--config",
        type=Path,
        help="run config YAML for each job, as the launchpad takes it (op config, resources, executor)",
    )
    args = parser.parse_args(argv)
    try:
        run_config = _read_run_config(args.config) if args.config else None
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    home = os.environ.get("DAGSTER_HOME")
    problem = dagster_storage_problem(home) if home else None
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        with dg.DagsterInstance.get() as instance:
            outcomes = launch_jobs(instance, args.workspace, args.jobs, queue=args.queue, run_config=run_config)
    except (LaunchError, dg.DagsterError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    not_run = args.jobs[len(outcomes) :]
    if not_run:
        print(f"not run after the failure: {', '.join(not_run)}", file=sys.stderr)
    return 0 if len(outcomes) == len(args.jobs) and all(o.succeeded for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
