"""A real Dagster deployment for end-to-end tests and benchmarks: webserver plus daemon.

:func:`running_deployment` writes a ``dagster.yaml`` suited to tests into a fresh
``DAGSTER_HOME`` (:func:`write_dagster_yaml`: a run queue with a concurrency limit, the
``databento`` pool limit, run retries off, telemetry off) and starts what ``dagster dev`` starts,
``dagster-webserver -m dbento_assets.definitions -h 127.0.0.1 -p <free port>`` and ``dagster-daemon
run``, as two subprocesses in one new process group with their own environment
(``DAGSTER_HOME``, ``DBENTO_SOURCE``, ``DBENTO_DATA_DIR`` and, for the Databento source, the fake
gateway of :mod:`dbento_assets_tests.gateway` through :func:`gateway_env`). It waits until the
webserver answers, the code location has loaded and the backfill and run-queue daemons beat,
and always kills the whole process group (webserver, daemon, code servers and run workers) on
the way out, even when the test fails. The backfill daemon looks for work every 30 s; tests may
shorten that period (``backfill_interval_seconds``) so a backfill is picked up and found finished
within seconds, everything else being stock Dagster. :class:`Deployment` talks to the webserver
as the UI does, over GraphQL with plain ``requests``: ``launchPartitionBackfill`` with an asset
selection, partition names, tags and optionally run config; ``reexecutePartitionBackfill`` (the
UI's "Re-execute from failure"); and ``partitionBackfillOrError`` polled until the backfill is
terminal, within a bounded timeout. The readers (:func:`backfill_runs`, :func:`materializations`,
:func:`check_evaluations`, :func:`run_timings`) open a :class:`~dagster.DagsterInstance` on the
same ``DAGSTER_HOME`` and return what the instance recorded per partition.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import yaml
from dagster import AssetKey, DagsterEventType, DagsterInstance, DagsterRun, RunsFilter
from dagster._core.storage.tags import BACKFILL_ID_TAG, PARTITION_NAME_TAG

from dbento_assets.core.months import Month, month_range

DEFAULT_MODULE = "dbento_assets.definitions"
POOL = "databento"
STARTUP_TIMEOUT_SECONDS = 120.0
REQUIRED_DAEMONS = ("BACKFILL", "QUEUED_RUN_COORDINATOR")
TERMINAL_BACKFILL_STATUSES = frozenset(
    {"COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED"}
)
SUCCESS_BACKFILL_STATUSES = frozenset({"COMPLETED", "COMPLETED_SUCCESS"})
LOG_TAIL_CHARS = 6000

LAUNCH_BACKFILL = """
mutation LaunchBackfill($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on Error { message }
    ... on PythonError { stack }
  }
}
"""

REEXECUTE_BACKFILL = """
mutation ReexecuteBackfill($params: ReexecutionParams!) {
  reexecutePartitionBackfill(reexecutionParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on Error { message }
    ... on PythonError { stack }
  }
}
"""

BACKFILL_STATUS = """
query BackfillStatus($id: String!) {
  partitionBackfillOrError(backfillId: $id) {
    __typename
    ... on PartitionBackfill {
      id
      status
      numPartitions
      endTimestamp
      tags { key value }
      error { message }
      assetBackfillData {
        assetBackfillStatuses {
          __typename
          ... on AssetPartitionsStatusCounts {
            assetKey { path }
            numPartitionsTargeted
            numPartitionsInProgress
            numPartitionsMaterialized
            numPartitionsFailed
          }
        }
      }
    }
    ... on Error { message }
  }
}
"""

WORKSPACE_STATUS = """
query WorkspaceStatus {
  workspaceOrError {
    __typename
    ... on Workspace {
      locationEntries {
        name
        loadStatus
        locationOrLoadError {
          __typename
          ... on PythonError { message stack }
        }
      }
    }
    ... on PythonError { message }
  }
}
"""

DAEMON_STATUS = """
query DaemonStatus {
  instance {
    daemonHealth {
      allDaemonStatuses { daemonType healthy required }
    }
  }
}
"""

ASSET_KEYS = """
query AssetKeys {
  assetNodes { assetKey { path } }
}
"""

ASSET_CHECKS = """
query AssetChecks {
  assetNodes {
    assetKey { path }
    assetChecksOrError {
      __typename
      ... on AssetChecks { checks { name } }
    }
  }
}
"""

LAUNCH_RUN = """
mutation LaunchRun($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on Error { message }
    ... on PythonError { stack }
  }
}
"""

DEFAULT_RUN_CONFIG = """
query DefaultRunConfig($selector: PipelineSelector!) {
  runConfigSchemaOrError(selector: $selector) {
    __typename
    ... on RunConfigSchema { rootDefaultYaml }
    ... on Error { message }
    ... on PythonError { message }
  }
}
"""

REEXECUTE_RUN = """
mutation ReexecuteRun($params: ReexecutionParams!) {
  launchRunReexecution(reexecutionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on Error { message }
    ... on PythonError { stack }
  }
}
"""

TERMINATE_RUN = """
mutation TerminateRun($runId: String!) {
  terminateRun(runId: $runId) {
    __typename
    ... on TerminateRunSuccess { run { runId } }
    ... on TerminateRunFailure { message }
    ... on Error { message }
    ... on PythonError { stack }
  }
}
"""

RUN_STATUS = """
query RunStatus($id: ID!) {
  runOrError(runId: $id) {
    __typename
    ... on Run { status }
    ... on Error { message }
  }
}
"""
TERMINAL_RUN_STATUSES = frozenset({"SUCCESS", "FAILURE", "CANCELED"})

CHECK_PARTITION_STATUSES = """
fragment OneDim on AssetCheckPartitionStatus1D {
  __typename
  ... on AssetCheckDefaultPartitionStatuses {
    succeededPartitions
    failedPartitions
    inProgressPartitions
    skippedPartitions
    executionFailedPartitions
  }
}
query CheckPartitionStatuses {
  assetNodes {
    assetKey { path }
    assetChecksOrError {
      __typename
      ... on AssetChecks {
        checks {
          name
          partitionStatuses {
            __typename
            ... on AssetCheckMultiPartitionStatuses {
              ranges { primaryDimStartKey primaryDimEndKey secondaryDim { ...OneDim } }
            }
          }
        }
      }
    }
  }
}
"""
CHECK_STATUS_FIELDS = {
    "succeededPartitions": "SUCCEEDED",
    "failedPartitions": "FAILED",
    "inProgressPartitions": "IN_PROGRESS",
    "skippedPartitions": "SKIPPED",
    "executionFailedPartitions": "EXECUTION_FAILED",
}


class DeploymentError(RuntimeError):
    """The deployment did not start, or answered a request with an error."""


@dataclass(frozen=True)
class DeploymentConfig:
    """The ``dagster.yaml`` settings a test deployment runs with."""

    max_concurrent_runs: int = 2
    """Runs in progress at once (the run queue limit); 2 suits a 2-core machine."""
    databento_pool_limit: int = 2
    """Concurrent ``raw_1s_bars`` steps across all runs (pool ``databento``)."""
    run_buffer: int = 1
    """Runs the queue may start while their download step still waits for a pool slot, so a
    run's process start-up overlaps another run's download (``op_granularity_run_buffer``)."""
    dequeue_interval_seconds: int = 1
    """How often the run queue daemon looks for runs to start."""


def write_dagster_yaml(home: Path, config: DeploymentConfig = DeploymentConfig()) -> Path:
    """Write a ``dagster.yaml`` for tests into ``home`` and return its path.

    The run queue starts at most ``max_concurrent_runs`` runs at once; pools default to
    ``databento_pool_limit`` slots (the code location's only pool is ``databento``), enforced
    per step, and up to ``run_buffer`` extra runs may start and wait for a slot; run retries
    are off so a failed partition stays failed until resumed; telemetry and the first-run tour
    are off.
    """
    home.mkdir(parents=True, exist_ok=True)
    path = home / "dagster.yaml"
    path.write_text(
        "# Written by dbento_assets_tests.deployment for a test deployment.\n"
        "telemetry:\n"
        "  enabled: false\n"
        "nux:\n"
        "  enabled: false\n"
        "run_queue:\n"
        f"  dequeue_interval_seconds: {config.dequeue_interval_seconds}\n"
        "concurrency:\n"
        "  runs:\n"
        f"    max_concurrent_runs: {config.max_concurrent_runs}\n"
        "  pools:\n"
        f"    default_limit: {config.databento_pool_limit}\n"
        "    granularity: op\n"
        f"    op_granularity_run_buffer: {config.run_buffer}\n"
        "run_retries:\n"
        "  enabled: false\n"
    )
    return path


def prepare_instance(home: Path, config: DeploymentConfig = DeploymentConfig()) -> None:
    """Create the instance's storage and set the ``databento`` pool limit.

    ``dagster dev`` creates the storage before it starts the webserver and the daemon; two
    processes creating the same SQLite tables at once would collide. The pool limit is what
    ``dagster instance concurrency set databento <n>`` sets.
    """
    with DagsterInstance.from_config(str(home)) as instance:
        instance.get_runs(limit=1)
        instance.all_logs("00000000-0000-0000-0000-000000000000")
        instance.all_instigator_state()
        instance.event_log_storage.set_concurrency_slots(POOL, config.databento_pool_limit)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def gateway_env(gateway_url: str, ca_file: Path | str, api_key: str) -> dict[str, str]:
    """Environment that points the Databento source at a fake gateway (see gateway.py)."""
    return {
        "DBENTO_SOURCE": "databento",
        "DATABENTO_API_KEY": api_key,
        "DBENTO_GATEWAY": gateway_url,
        "REQUESTS_CA_BUNDLE": str(ca_file),
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }


@dataclass(frozen=True)
class BackfillResult:
    """A backfill as ``partitionBackfillOrError`` reported it at its end."""

    backfill_id: str
    status: str
    num_partitions: int | None
    asset_counts: Mapping[str, Mapping[str, int]]
    tags: Mapping[str, str]
    error: str | None
    wall_seconds: float

    @property
    def succeeded(self) -> bool:
        return self.status in SUCCESS_BACKFILL_STATUSES


@dataclass
class Deployment:
    """A running webserver plus daemon; see the module docstring."""

    home: Path
    url: str
    webserver: subprocess.Popen[bytes]
    daemon: subprocess.Popen[bytes]
    log_path: Path
    session: requests.Session = field(default_factory=requests.Session)

    # ------------------------------------------------------------------ GraphQL

    def graphql(
        self, query: str, variables: Mapping[str, Any] | None = None, timeout: float = 60.0
    ) -> dict[str, Any]:
        """Run one GraphQL operation; raise :class:`DeploymentError` on any error."""
        self._check_alive()
        response = self.session.post(
            f"{self.url}/graphql",
            json={"query": query, "variables": dict(variables or {})},
            timeout=timeout,
        )
        if response.status_code != 200:
            raise DeploymentError(
                f"GraphQL HTTP {response.status_code}: {response.text[:2000]}{self.log_tail()}"
            )
        payload = response.json()
        if payload.get("errors"):
            raise DeploymentError(f"GraphQL errors: {payload['errors']}")
        return payload["data"]

    def asset_keys(self) -> list[AssetKey]:
        """Every asset of the code location, as the UI's asset graph lists them."""
        nodes = self.graphql(ASSET_KEYS)["assetNodes"]
        return sorted(AssetKey(node["assetKey"]["path"]) for node in nodes)

    def asset_checks(self) -> dict[str, list[str]]:
        """The asset checks of the code location: asset (user string) to check names."""
        checks: dict[str, list[str]] = {}
        for node in self.graphql(ASSET_CHECKS)["assetNodes"]:
            answer = node["assetChecksOrError"]
            if answer["__typename"] != "AssetChecks":
                continue
            names = sorted(check["name"] for check in answer["checks"])
            if names:
                checks[AssetKey(node["assetKey"]["path"]).to_user_string()] = names
        return checks

    def check_partition_statuses(self) -> dict[tuple[str, str, str], str]:
        """What the UI shows per check and partition: ``(asset, check, partition)`` to
        ``SUCCEEDED``, ``FAILED``, ``IN_PROGRESS``, ``SKIPPED`` or ``EXECUTION_FAILED`` (a
        partition with no current result is absent). Each check's ``partitionStatuses`` are
        month ranges (the primary dimension) of symbol sets, expanded here."""
        found: dict[tuple[str, str, str], str] = {}
        for node in self.graphql(CHECK_PARTITION_STATUSES)["assetNodes"]:
            answer = node["assetChecksOrError"]
            if answer["__typename"] != "AssetChecks":
                continue
            asset = AssetKey(node["assetKey"]["path"]).to_user_string()
            for check in answer["checks"]:
                for span in (check["partitionStatuses"] or {}).get("ranges") or []:
                    months = month_range(
                        Month.parse(span["primaryDimStartKey"][:7]),
                        Month.parse(span["primaryDimEndKey"][:7]),
                    )
                    for field_name, status in CHECK_STATUS_FIELDS.items():
                        for symbol in span["secondaryDim"].get(field_name) or []:
                            for month in months:
                                found[(asset, check["name"], f"{month.key}|{symbol}")] = status
        return found

    def job_selector(self, job_name: str, key: str = "jobName") -> dict[str, str]:
        location = self.graphql(WORKSPACE_STATUS)["workspaceOrError"]["locationEntries"][0]
        return {
            "repositoryLocationName": location["name"],
            "repositoryName": "__repository__",
            key: job_name,
        }

    def launch_run(
        self, job_name: str, run_config: Mapping[str, Any], tags: Mapping[str, str] | None = None
    ) -> str:
        """Launch a job as the launchpad does (the run queue starts it); return its run id."""
        params = {
            "selector": self.job_selector(job_name),
            "runConfigData": dict(run_config),
            "executionMetadata": {
                "tags": [{"key": k, "value": v} for k, v in (tags or {}).items()]
            },
        }
        answer = self.mutate(LAUNCH_RUN, {"params": params}, "launchRun", "LaunchRunSuccess")
        return str(answer["run"]["runId"])

    def default_run_config(self, job_name: str) -> dict[str, Any]:
        """The config the launchpad's editor starts with for ``job_name``."""
        variables = {"selector": self.job_selector(job_name, "pipelineName")}
        answer = self.graphql(DEFAULT_RUN_CONFIG, variables)["runConfigSchemaOrError"]
        if "rootDefaultYaml" not in answer:
            raise DeploymentError(f"no run config schema for {job_name}: {answer}")
        return dict(yaml.safe_load(answer["rootDefaultYaml"]) or {})

    def reexecute_run(self, run_id: str, strategy: str = "FROM_FAILURE") -> str:
        """Re-execute a finished run (the run page's "Re-execute from failure"); new id."""
        params = {"parentRunId": run_id, "strategy": strategy}
        answer = self.mutate(
            REEXECUTE_RUN, {"params": params}, "launchRunReexecution", "LaunchRunSuccess"
        )
        return str(answer["run"]["runId"])

    def terminate_run(self, run_id: str) -> None:
        """Cancel a run, as the run page's "Terminate" button does."""
        self.mutate(TERMINATE_RUN, {"runId": run_id}, "terminateRun", "TerminateRunSuccess")

    def wait_for_run(self, run_id: str, timeout: float = 180.0) -> str:
        """Poll until the run is terminal; return its status (``SUCCESS``, ``FAILURE``...)."""
        deadline = time.monotonic() + timeout
        while True:
            answer = self.graphql(RUN_STATUS, {"id": run_id})["runOrError"]
            if answer.get("status") in TERMINAL_RUN_STATUSES:
                return answer["status"]
            if time.monotonic() > deadline:
                raise DeploymentError(f"run {run_id} still {answer} after {timeout:.0f} s")
            time.sleep(0.5)

    def launch_backfill(
        self,
        partition_names: Sequence[str],
        assets: Iterable[AssetKey | str] | None = None,
        *,
        tags: Mapping[str, str] | None = None,
        run_config: Mapping[str, Any] | None = None,
        title: str | None = None,
    ) -> str:
        """Launch an asset backfill as the UI's "Materialize" dialog does; return its id.

        ``assets`` defaults to every asset of the code location.
        """
        keys = [AssetKey.from_coercible(a) for a in assets] if assets else self.asset_keys()
        params: dict[str, Any] = {
            "assetSelection": [{"path": key.path} for key in keys],
            "partitionNames": list(partition_names),
            "tags": [{"key": k, "value": v} for k, v in (tags or {}).items()],
        }
        if run_config is not None:
            params["runConfigData"] = dict(run_config)
        if title is not None:
            params["title"] = title
        answer = self.mutate(
            LAUNCH_BACKFILL, {"params": params}, "launchPartitionBackfill", "LaunchBackfillSuccess"
        )
        return str(answer["backfillId"])

    def reexecute_backfill(self, backfill_id: str, strategy: str = "FROM_FAILURE") -> str:
        """Re-execute a finished backfill (the UI's "Re-execute from failure"); new id."""
        params = {"parentRunId": backfill_id, "strategy": strategy}
        answer = self.mutate(
            REEXECUTE_BACKFILL,
            {"params": params},
            "reexecutePartitionBackfill",
            "LaunchBackfillSuccess",
        )
        return str(answer["backfillId"])

    def backfill_status(self, backfill_id: str) -> dict[str, Any]:
        """The raw ``partitionBackfillOrError`` answer."""
        answer = self.graphql(BACKFILL_STATUS, {"id": backfill_id})["partitionBackfillOrError"]
        if answer["__typename"] != "PartitionBackfill":
            raise DeploymentError(f"backfill {backfill_id}: {answer}")
        return answer

    def wait_for_backfill(
        self,
        backfill_id: str,
        timeout: float = 180.0,
        poll_seconds: float = 0.5,
        started_at: float | None = None,
    ) -> BackfillResult:
        """Poll until the backfill reaches a terminal status; raise after ``timeout`` s."""
        start = started_at if started_at is not None else time.monotonic()
        deadline = time.monotonic() + timeout
        while True:
            answer = self.backfill_status(backfill_id)
            if answer["status"] in TERMINAL_BACKFILL_STATUSES:
                return _backfill_result(answer, time.monotonic() - start)
            if time.monotonic() > deadline:
                raise DeploymentError(
                    f"backfill {backfill_id} still {answer['status']} after {timeout:.0f} s: "
                    f"{answer.get('assetBackfillData')}{self.log_tail()}"
                )
            time.sleep(poll_seconds)

    def run_backfill(
        self,
        partition_names: Sequence[str],
        assets: Iterable[AssetKey | str] | None = None,
        *,
        tags: Mapping[str, str] | None = None,
        run_config: Mapping[str, Any] | None = None,
        timeout: float = 180.0,
    ) -> BackfillResult:
        """Launch a backfill and wait for its end."""
        start = time.monotonic()
        backfill_id = self.launch_backfill(
            partition_names, assets, tags=tags, run_config=run_config
        )
        return self.wait_for_backfill(backfill_id, timeout=timeout, started_at=start)

    # ------------------------------------------------------------------ instance

    @contextlib.contextmanager
    def instance(self) -> Iterator[DagsterInstance]:
        """The deployment's instance, opened from its ``DAGSTER_HOME``."""
        with DagsterInstance.from_config(str(self.home)) as instance:
            yield instance

    # ------------------------------------------------------------------ process

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        """The end of the webserver and daemon output, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return f"\n--- webserver and daemon output (tail) ---\n{text[-chars:]}"

    def stop(self) -> None:
        """Stop the whole process group: webserver, daemon, code servers, run workers."""
        stop_process_group(self.webserver, others=[self.daemon])

    def _check_alive(self) -> None:
        for name, process in (("webserver", self.webserver), ("daemon", self.daemon)):
            if process.poll() is not None:
                raise DeploymentError(
                    f"the Dagster {name} exited with code {process.returncode}{self.log_tail()}"
                )

    def mutate(
        self, query: str, variables: Mapping[str, Any], operation: str, success: str
    ) -> dict[str, Any]:
        """Run one GraphQL mutation and return its answer when it is ``success``; raise
        :class:`DeploymentError` with Dagster's message otherwise."""
        result = self.graphql(query, variables)[operation]
        if result["__typename"] != success:
            raise DeploymentError(
                f"{operation} failed: {result.get('__typename')}: {result.get('message')}\n"
                f"{result.get('errors') or ''}{result.get('stack') or ''}"
            )
        return result


def stop_process_group(
    leader: subprocess.Popen[bytes],
    others: Sequence[subprocess.Popen[bytes]] = (),
    grace_seconds: float = 5.0,
) -> None:
    """SIGINT the leader's process group so Dagster shuts down cleanly, then SIGKILL it.

    The group is the one :func:`running_deployment` created (the leader's pid is its id), so
    this reaches the webserver, the daemon, their code servers and every run worker, and
    nothing else.
    """
    pgid = leader.pid
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGINT)
    deadline = time.monotonic() + grace_seconds
    for process in (leader, *others):
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
    # Whatever is left (run workers, code servers, a stuck process) goes now.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    for process in (leader, *others):
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace_seconds)


# Runs Dagster's own daemon CLI after shortening the backfill daemon's loop period. The period
# is a module constant (30 s) with no setting; tests shorten it so a backfill is noticed (and
# found finished) within a second or two instead of up to 30 s each way. Nothing else changes.
_DAEMON_WITH_INTERVAL = (
    "import sys\n"
    "import dagster._daemon.controller as controller\n"
    "controller.DEFAULT_DAEMON_INTERVAL_SECONDS = float(sys.argv[1])\n"
    "from dagster._daemon.cli import cli\n"
    "cli(args=sys.argv[2:], obj={}, prog_name='dagster-daemon')\n"
)


def deployment_commands(
    module: str, port: int, backfill_interval_seconds: float | None
) -> tuple[list[str], list[str]]:
    """The webserver and daemon command lines (what ``dagster dev`` runs, as two processes)."""
    webserver = [
        sys.executable,
        "-m",
        "dagster_webserver",
        "-m",
        module,
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
    ]
    daemon_args = ["run", "-m", module]
    if backfill_interval_seconds is None:
        daemon = [sys.executable, "-m", "dagster._daemon", *daemon_args]
    else:
        interval = str(float(backfill_interval_seconds))
        daemon = [sys.executable, "-c", _DAEMON_WITH_INTERVAL, interval, *daemon_args]
    return webserver, daemon


@contextlib.contextmanager
def running_deployment(
    workdir: Path,
    env: Mapping[str, str],
    *,
    config: DeploymentConfig = DeploymentConfig(),
    module: str = DEFAULT_MODULE,
    backfill_interval_seconds: float | None = None,
    startup_timeout: float = STARTUP_TIMEOUT_SECONDS,
) -> Iterator[Deployment]:
    """Start a webserver and a daemon with their home in ``workdir/dagster_home``.

    This is what ``dagster dev`` starts, as two processes sharing one new process group, which
    is killed as a whole on exit (run workers and code servers included). ``env`` adds to (and
    overrides) this process's environment; set at least ``DBENTO_SOURCE`` and
    ``DBENTO_DATA_DIR``. The processes run in ``workdir`` so no stray ``.env`` file of the
    developer's checkout is read. ``backfill_interval_seconds`` shortens the backfill daemon's
    loop period (Dagster's own is 30 s; None keeps it).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    home = workdir / "dagster_home"
    write_dagster_yaml(home, config)
    prepare_instance(home, config)
    port = free_port()
    child_env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "DAGSTER_HOME": str(home),
        **env,
    }
    webserver_cmd, daemon_cmd = deployment_commands(module, port, backfill_interval_seconds)
    log_path = workdir / "dagster.log"
    with log_path.open("wb") as log:
        common: dict[str, Any] = {
            "cwd": workdir,
            "env": child_env,
            "stdin": subprocess.DEVNULL,
            "stdout": log,
            "stderr": subprocess.STDOUT,
        }
        webserver = subprocess.Popen(webserver_cmd, process_group=0, **common)
        try:
            daemon = subprocess.Popen(daemon_cmd, process_group=webserver.pid, **common)
        except BaseException:
            stop_process_group(webserver)
            raise
    deployment = Deployment(home, f"http://127.0.0.1:{port}", webserver, daemon, log_path)
    try:
        _wait_until_ready(deployment, startup_timeout)
        yield deployment
    finally:
        deployment.session.close()
        deployment.stop()


def _wait_until_ready(deployment: Deployment, timeout: float) -> None:
    """Webserver up, code location loaded, backfill and run-queue daemons beating."""
    deadline = time.monotonic() + timeout
    stage = "webserver"
    last_error = ""
    while time.monotonic() < deadline:
        deployment._check_alive()
        try:
            if stage == "webserver":
                response = deployment.session.get(f"{deployment.url}/server_info", timeout=5)
                if response.status_code == 200:
                    stage = "code location"
                    continue
            elif stage == "code location":
                if _code_location_loaded(deployment):
                    stage = "daemons"
                    continue
            elif _daemons_healthy(deployment):
                return
        except requests.RequestException as exc:
            last_error = str(exc)
        time.sleep(0.25)
    raise DeploymentError(
        f"the Dagster deployment was not ready after {timeout:.0f} s (waiting for the {stage}; "
        f"{last_error}){deployment.log_tail()}"
    )


def _code_location_loaded(deployment: Deployment) -> bool:
    workspace = deployment.graphql(WORKSPACE_STATUS)["workspaceOrError"]
    if workspace["__typename"] != "Workspace":
        raise DeploymentError(f"workspace error: {workspace}")
    entries = workspace["locationEntries"]
    if not entries or any(e["loadStatus"] != "LOADED" for e in entries):
        return False
    for entry in entries:
        error = entry["locationOrLoadError"]
        if error and error["__typename"] == "PythonError":
            raise DeploymentError(
                f"code location {entry['name']} failed to load: {error['message']}\n"
                f"{''.join(error.get('stack') or [])}"
            )
    return True


def _daemons_healthy(deployment: Deployment) -> bool:
    statuses = deployment.graphql(DAEMON_STATUS)["instance"]["daemonHealth"]["allDaemonStatuses"]
    healthy = {s["daemonType"] for s in statuses if s["healthy"]}
    return all(daemon in healthy for daemon in REQUIRED_DAEMONS)


def _backfill_result(answer: Mapping[str, Any], wall_seconds: float) -> BackfillResult:
    counts: dict[str, dict[str, int]] = {}
    data = answer.get("assetBackfillData") or {}
    for status in data.get("assetBackfillStatuses") or []:
        if status.get("__typename") != "AssetPartitionsStatusCounts":
            continue
        key = AssetKey(status["assetKey"]["path"]).to_user_string()
        counts[key] = {
            "targeted": status["numPartitionsTargeted"],
            "in_progress": status["numPartitionsInProgress"],
            "materialized": status["numPartitionsMaterialized"],
            "failed": status["numPartitionsFailed"],
        }
    error = answer.get("error")
    return BackfillResult(
        backfill_id=answer["id"],
        status=answer["status"],
        num_partitions=answer.get("numPartitions"),
        asset_counts=counts,
        tags={t["key"]: t["value"] for t in answer.get("tags") or []},
        error=error["message"] if error else None,
        wall_seconds=wall_seconds,
    )


# ---------------------------------------------------------------------- instance readers


@dataclass(frozen=True)
class Materialization:
    """One ``ASSET_MATERIALIZATION`` event of a run."""

    asset: str
    partition: str | None
    run_id: str
    metadata: Mapping[str, Any]


@dataclass(frozen=True)
class CheckEvaluation:
    """One ``ASSET_CHECK_EVALUATION`` event of a run."""

    asset: str
    check_name: str
    partition: str | None
    passed: bool
    severity: str
    run_id: str


@dataclass(frozen=True)
class RunTiming:
    """How long one run took, from the instance's run record and step stats."""

    run_id: str
    partition: str | None
    status: str
    created: float
    started: float | None
    ended: float | None
    step_seconds: Mapping[str, float]

    @property
    def compute_seconds(self) -> float:
        """The sum of the run's step durations (the partition's pure compute)."""
        return sum(self.step_seconds.values())

    @property
    def run_seconds(self) -> float | None:
        """From the run worker's start to the run's end (includes in-run overhead)."""
        if self.started is None or self.ended is None:
            return None
        return self.ended - self.started


def backfill_runs(instance: DagsterInstance, backfill_id: str) -> list[DagsterRun]:
    """The runs a backfill launched, oldest first."""
    runs = instance.get_runs(RunsFilter(tags={BACKFILL_ID_TAG: backfill_id}))
    return sorted(runs, key=lambda run: run.run_id)


def partition_of(run: DagsterRun) -> str | None:
    """The partition a per-partition run materialized (its ``dagster/partition`` tag)."""
    return run.tags.get(PARTITION_NAME_TAG)


def materializations(instance: DagsterInstance, run_ids: Iterable[str]) -> list[Materialization]:
    """Every materialization the runs recorded."""
    found: list[Materialization] = []
    for run_id in run_ids:
        for entry in instance.all_logs(run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION):
            event = entry.dagster_event
            if event is None:
                continue
            mat = event.event_specific_data.materialization  # type: ignore[union-attr]
            found.append(
                Materialization(
                    asset=mat.asset_key.to_user_string(),
                    partition=mat.partition,
                    run_id=run_id,
                    metadata={k: v.value for k, v in mat.metadata.items()},
                )
            )
    return found


def check_evaluations(instance: DagsterInstance, run_ids: Iterable[str]) -> list[CheckEvaluation]:
    """Every asset check evaluation the runs recorded, with the partition it names."""
    found: list[CheckEvaluation] = []
    for run_id in run_ids:
        for entry in instance.all_logs(run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION):
            event = entry.dagster_event
            if event is None:
                continue
            evaluation = event.event_specific_data
            found.append(
                CheckEvaluation(
                    asset=evaluation.asset_key.to_user_string(),  # type: ignore[union-attr]
                    check_name=evaluation.check_name,  # type: ignore[union-attr]
                    partition=evaluation.partition,  # type: ignore[union-attr]
                    passed=evaluation.passed,  # type: ignore[union-attr]
                    severity=evaluation.severity.value,  # type: ignore[union-attr]
                    run_id=run_id,
                )
            )
    return found


def statuses_said(
    instance: DagsterInstance, run_ids: Iterable[str]
) -> dict[tuple[str, str, str], str]:
    """What the runs' check evaluations said, ``(asset, check, partition)`` to the status the
    UI should show for it (``SUCCEEDED`` or ``FAILED``; the latest run wins)."""
    return {
        (e.asset, e.check_name, str(e.partition)): "SUCCEEDED" if e.passed else "FAILED"
        for e in check_evaluations(instance, run_ids)
    }


def run_timings(instance: DagsterInstance, runs: Iterable[DagsterRun]) -> list[RunTiming]:
    """Run record times and per-step durations of each run."""
    timings: list[RunTiming] = []
    for run in runs:
        record = instance.get_run_record_by_id(run.run_id)
        if record is None:
            continue
        steps = {
            s.step_key: s.end_time - s.start_time
            for s in instance.get_run_step_stats(run.run_id)
            if s.start_time is not None and s.end_time is not None
        }
        timings.append(
            RunTiming(
                run_id=run.run_id,
                partition=partition_of(run),
                status=record.dagster_run.status.value,
                created=record.create_timestamp.timestamp(),
                started=record.start_time,
                ended=record.end_time,
                step_seconds=steps,
            )
        )
    return timings
