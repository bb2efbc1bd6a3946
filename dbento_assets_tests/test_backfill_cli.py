"""``dbento build`` (alias ``python -m dbento_assets.backfill``): one run per partition.

The first tests run the command as a user would (a subprocess with ``DAGSTER_HOME``, the demo
source or the fake gateway, and a data folder in a temporary directory) and read the instance
afterwards: one run per partition with its partition tags, built by two processes, every asset
materialized per partition, every asset check result attributed to its partition, the bar
files on disk; a failed download failing its month alone, each month paid for once; Ctrl-C
stopping every process with nothing half done. The others call
:func:`run` (``dbento build``) in this process with definitions built for the test: the
Databento source against the fake HTTPS gateway (a failed month, resuming it with
``--missing-only`` without requesting the other month again, ``--force`` downloading again),
``--select``, the project's own history without ``DAGSTER_HOME`` and every usage error,
each a single line.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import filelock
import pandas as pd
import psutil
import pytest
from dagster import (
    AssetKey,
    DagsterEvent,
    DagsterEventType,
    DagsterInstance,
    DagsterRun,
    DagsterRunStatus,
    RunsFilter,
    instance_for_test,
)

from dbento_assets.assets import DOWNLOAD_POOL, FORCE_TAG
from dbento_assets.backfill import (
    HOST_TAG,
    PID_TAG,
    RANGE_TAG,
    STARTED_TAG,
    _settle_download_pool,
    cancel_orphaned_runs,
)
from dbento_assets.cli import run as dbento
from dbento_assets.core.catalog import Catalog, load_catalog
from dbento_assets.core.months import Month
from dbento_assets.core.storage import ORIGIN_MARKER, BarStore
from dbento_assets.core.timeframes import parse_timeframe
from dbento_assets.definitions import build_definitions
from dbento_assets.io_managers import BarFileIOManager
from dbento_assets.names import RAW_ASSET
from dbento_assets.partitions import Partition, partition_key
from dbento_assets.pool import machine_slot, slot_lock
from dbento_assets.range_job import JOB_NAME
from dbento_assets.resources import DatabentoResource
from dbento_assets.status import render as status_table
from dbento_assets_tests.deployment import (
    DeploymentConfig,
    check_evaluations,
    materializations,
    partition_of,
    write_dagster_yaml,
)
from dbento_assets_tests.gateway import (
    GET_RANGE,
    RECORD_BYTES,
    TEST_KEY,
    FakeGateway,
    Query,
    RecordedRequest,
)
from dbento_assets_tests.test_cache_integrity import serve_bad_data, tmpfs
from dbento_assets_tests.test_databento_dagster import catalog_from

JAN, FEB = Month(2024, 1), Month(2024, 2)
ES_JAN, ES_FEB = str(partition_key(JAN, "ES")), str(partition_key(FEB, "ES"))
STARTED = DagsterRunStatus.STARTED


def run(argv: list[str], *args: object, **kwargs: object) -> int:
    """``dbento build ARGV`` in this process (tests pass ``defs`` and ``instance``)."""
    return dbento(["build", *argv], *args, **kwargs)


def all_runs(instance: DagsterInstance) -> list:
    return sorted(instance.get_runs(RunsFilter()), key=lambda r: r.run_id)


def assert_attributed(instance: DagsterInstance, runs: list, assets: list[str]) -> None:
    """One materialization per asset and partition, each check result with its partition."""
    run_of = {partition_of(r): r.run_id for r in runs}
    mats = materializations(instance, [r.run_id for r in runs])
    assert Counter((m.asset, m.partition) for m in mats) == Counter(
        {(a, p): 1 for a in assets for p in run_of}
    )
    evaluations = check_evaluations(instance, [r.run_id for r in runs])
    assert evaluations, "the assets declare checks; their results must be recorded"
    per_check = Counter((e.asset, e.check_name, e.partition) for e in evaluations)
    checks = {(e.asset, e.check_name) for e in evaluations}
    assert per_check == Counter({(a, c, p): 1 for a, c in checks for p in run_of})
    assert {e.asset for e in evaluations} <= set(assets)
    for evaluation in evaluations:
        assert evaluation.run_id == run_of[evaluation.partition]


def process_ids(instance: DagsterInstance, runs: list) -> dict[str, set[int]]:
    """The process ids each run's events came from."""
    return {
        r.run_id: {e.dagster_event.pid for e in instance.all_logs(r.run_id) if e.dagster_event}
        - {None}
        for r in runs
    }


def command_env(
    tmp_path: Path, config: DeploymentConfig | None = None, **settings: str
) -> dict[str, str]:
    """The environment of a ``dbento build`` subprocess: a fresh instance, data in tmp_path."""
    home = tmp_path / "dagster_home"
    write_dagster_yaml(home, config or DeploymentConfig())
    return {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "DBENTO_DATA_DIR": str(tmp_path / "data"),
        **settings,
    }


def build_command(args: list[str], tmp_path: Path, env: dict[str, str], **popen: Any) -> Any:
    """``python -m dbento_assets.backfill ARGS`` (``dbento build``) in tmp_path."""
    command = [sys.executable, "-m", "dbento_assets.backfill", *args]
    return subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen
    )


def finished(process: Any, timeout: float = 300) -> tuple[int, list[str], str]:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:  # with its build processes, when it leads a process group of its own
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            process.kill()
        raise
    return process.returncode, out.decode().splitlines(), err.decode()


def test_command_materializes_each_month_in_its_own_run(tmp_path):
    # Two build processes (DBENTO_RANGE_WORKERS), one partition each.
    env = command_env(tmp_path, DBENTO_SOURCE="demo", DBENTO_RANGE_WORKERS="2")
    args = ["--symbol", "ES", "--start", "2024-01", "--end", "2024-02"]
    code, lines, err = finished(build_command(args, tmp_path, env))

    assert code == 0, "\n".join(lines) + err
    assert sorted(line.split()[:2] for line in lines[:2]) == [[ES_JAN, "ok"], [ES_FEB, "ok"]]
    assert lines[2].startswith("Done in ")
    assert "2 partition(s), 2 built, 0 skipped (already built), 0 failed; " in lines[2]
    assert "rows in 8 file(s)" in lines[2] and "Databento cost $0.0000." in lines[2]
    store = BarStore.at(tmp_path / "data")
    with DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        runs = all_runs(instance)
        assert sorted(partition_of(r) for r in runs) == [ES_JAN, ES_FEB]
        assert {r.status.value for r in runs} == {"SUCCESS"}
        assert {r.tags[RANGE_TAG] for r in runs} == {"ES 2024-01..2024-02"}
        pids = process_ids(instance, runs)
        assert all(len(p) == 1 for p in pids.values())  # each run in one process...
        assert len(set.union(*pids.values())) == 2  # ...and each in its own
        assets = ["bars_15s", "bars_1min", "bars_30s", RAW_ASSET]
        assert_attributed(instance, runs, assets)
        for mat in materializations(instance, [r.run_id for r in runs]):
            parsed = Partition.from_key(mat.partition)
            month, symbol = parsed.month, parsed.symbol
            name = mat.asset.removeprefix("bars_")
            path = (
                store.raw_path(symbol, month)
                if mat.asset == RAW_ASSET
                else store.aggregated_path(symbol, month, parse_timeframe(name))
            )
            assert mat.metadata["path"] == str(path.path)
            assert len(store.read(path)) == mat.metadata["dagster/row_count"] > 0


BOTH = ["--symbol", "ES,NQ", "--start", "2024-01", "--end", "2024-02"]
BOTH_PARTITIONS = [str(partition_key(m, s)) for s in ("ES", "NQ") for m in (JAN, FEB)]


def gateway_env(tmp_path: Path, pool_limit: int = 2) -> dict[str, str]:
    """``dbento build`` against the fake gateway (the ``gateway`` fixture's environment):
    one attempt per request, two build processes, ``pool_limit`` downloads at a time."""
    return command_env(
        tmp_path,
        DeploymentConfig(databento_pool_limit=pool_limit),
        DBENTO_SOURCE="databento",
        DATABENTO_API_KEY=TEST_KEY,
        DBENTO_RETRY_ATTEMPTS="1",
        DBENTO_RANGE_WORKERS="2",
    )


def asked_for(call: RecordedRequest) -> str:
    """The partition a ``get_range`` request was for (``ES.v.0`` is ES)."""
    month = Month.parse(call.fields["start"][:7])
    return str(partition_key(month, call.fields["symbols"].split(".")[0]))


def bought(gateway: FakeGateway, since: int = 0) -> Counter[str]:
    """Answered ohlcv-1s ``get_range`` requests from the ``since``-th on, per partition."""
    return Counter(
        asked_for(c)
        for c in gateway.calls(GET_RANGE)[since:]
        if c.fault is None and c.fields.get("schema") == "ohlcv-1s"
    )


def stored(tmp_path: Path) -> dict[str, str]:
    """SHA-256 of every file under the data folder (notes and markers included)."""
    data = tmp_path / "data"
    return {
        str(p.relative_to(data)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(data.rglob("*"))
        if p.is_file()
    }


def test_build_processes_share_a_range_and_a_failed_download_fails_its_month_alone(
    gateway, tmp_path
):
    gateway.fail("500", endpoint=GET_RANGE)  # the first download to arrive, past its retries
    env = gateway_env(tmp_path)
    code, lines, err = finished(build_command(BOTH, tmp_path, env))

    (failed,) = [asked_for(c) for c in gateway.calls(GET_RANGE) if c.fault == "500"]
    said = {line.split()[0]: line.split()[1] for line in lines if "|" in line.split()[0]}
    assert code == 1, "\n".join(lines) + err
    assert said == {p: ("FAILED" if p == failed else "ok") for p in BOTH_PARTITIONS}
    assert bought(gateway) == Counter(p for p in BOTH_PARTITIONS if p != failed)
    before = stored(tmp_path)

    code, lines, err = finished(build_command([*BOTH, "--missing-only"], tmp_path, env))
    assert code == 0, "\n".join(lines) + err
    assert bought(gateway) == Counter(BOTH_PARTITIONS)  # every month paid for once
    after = stored(tmp_path)
    assert {k: after[k] for k in before if "refused" not in k} == {
        k: v for k, v in before.items() if "refused" not in k
    }  # nothing built before was touched
    with DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        statuses = Counter((partition_of(r), r.status.value) for r in all_runs(instance))
    assert statuses == Counter(
        {(p, "SUCCESS"): 1 for p in BOTH_PARTITIONS} | {(failed, "FAILURE"): 1}
    )


def test_build_processes_keep_to_the_download_pools_limit(gateway, tmp_path):
    # The pool `databento` at one slot: the second process waits for it, so the first
    # download is held at the gate for 10 s without a partner, and no two ever overlap.
    gateway.gate(GET_RANGE, parties=2, timeout=10)
    env = gateway_env(tmp_path, pool_limit=1)
    code, lines, err = finished(build_command(BOTH, tmp_path, env))
    assert code == 0, "\n".join(lines) + err
    assert gateway.max_in_flight[GET_RANGE] == 1
    assert bought(gateway) == Counter(BOTH_PARTITIONS)
    with DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        pids = process_ids(instance, all_runs(instance))
    assert len(set.union(*pids.values())) == 2  # built by two processes all the same


def test_a_step_dagster_lets_through_with_the_pools_slot_taken_waits_for_it(gateway, tmp_path):
    # Dagster's claim of a slot on SQLite is a read, then a write: two processes claiming at
    # the same moment can both take the last one. The step also needs the slot's lock file
    # on this machine; held here, as by such a twin, the build's download waits for it.
    env = gateway_env(tmp_path, pool_limit=1)
    with DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        _settle_download_pool(instance)
        twin = slot_lock(instance, DOWNLOAD_POOL, 0)
        twin.acquire()
        try:
            process = build_command(["--symbol", "ES", "--start", "2024-01"], tmp_path, env)
            deadline = time.monotonic() + 120
            while not any(
                "waiting for a slot of the databento pool" in (r.user_message or "")
                for run in all_runs(instance)
                for r in instance.all_logs(run.run_id)
            ):
                assert process.poll() is None and time.monotonic() < deadline, finished(process)
                time.sleep(0.2)
            time.sleep(2.0)  # time enough to start a download, were it not held
            assert gateway.calls(GET_RANGE) == [] and process.poll() is None
        finally:
            twin.release()
    code, lines, err = finished(process)
    assert code == 0, "\n".join(lines) + err
    assert bought(gateway) == Counter([ES_JAN])


def test_the_pools_slots_on_this_machine_number_its_limit_or_are_left_to_dagster(tmp_path):
    write_dagster_yaml(tmp_path / "home", DeploymentConfig(databento_pool_limit=2))
    said: list[str] = []
    with DagsterInstance.from_config(str(tmp_path / "home")) as instance:
        _settle_download_pool(instance)
        entered, release = threading.Event(), threading.Event()

        def second_step() -> None:  # in a thread: a step that waited would not hang the test
            with machine_slot(instance, DOWNLOAD_POOL, said.append):
                entered.set()
                release.wait(30)

        second = threading.Thread(target=second_step, daemon=True)
        with machine_slot(instance, DOWNLOAD_POOL, said.append):
            second.start()
            assert entered.wait(30), "a second step waits although the limit is 2"
            for i in (0, 1):  # both slots held, so a third step would wait
                with pytest.raises(filelock.Timeout):
                    slot_lock(instance, DOWNLOAD_POOL, i).acquire(timeout=0)
            assert (
                said == []
                and not (tmp_path / "home" / ".dbento-pools" / "databento-2.lock").exists()
            )
            release.set()
            second.join(30)
        # A DAGSTER_HOME that cannot take the lock files (read-only, or as here, a file in
        # the way) leaves the limit to Dagster instead of failing the download.
        shutil.rmtree(tmp_path / "home" / ".dbento-pools")
        (tmp_path / "home" / ".dbento-pools").write_text("not a folder")
        with machine_slot(instance, DOWNLOAD_POOL, said.append):
            assert said and "left to Dagster alone" in said[0]


def test_the_download_pool_gets_its_slots_before_build_processes_claim_them(tmp_path):
    # On a new instance Dagster sets a pool's slots up when a step first claims one; build
    # processes claiming at the same moment would each do it. The command does it first,
    # and leaves a limit set by hand as it is.
    write_dagster_yaml(tmp_path / "new", DeploymentConfig(databento_pool_limit=1))
    with DagsterInstance.from_config(str(tmp_path / "new")) as instance:
        assert instance.event_log_storage.get_concurrency_info(DOWNLOAD_POOL).slot_count == 0
        _settle_download_pool(instance)
        assert instance.event_log_storage.get_concurrency_info(DOWNLOAD_POOL).slot_count == 1
        instance.event_log_storage.set_concurrency_slots(DOWNLOAD_POOL, 3)
        _settle_download_pool(instance)
        assert instance.event_log_storage.get_concurrency_info(DOWNLOAD_POOL).slot_count == 3


def held(gateway: FakeGateway, process: Any, downloads: int) -> None:
    """Wait until ``downloads`` requests are held at the gateway's ``get_range`` gate."""
    deadline = time.monotonic() + 120
    while gateway.in_flight.get(GET_RANGE, 0) < downloads:
        assert process.poll() is None and time.monotonic() < deadline, finished(process)
        time.sleep(0.1)


def two_downloads_held(
    gateway: FakeGateway, tmp_path: Path, **popen: Any
) -> tuple[dict[str, str], Any]:
    """A ``dbento build`` of BOTH (two build processes), once each process's first download
    is held at the gateway: its environment and its process."""
    gateway.gate(GET_RANGE, parties=3, timeout=120)
    env = gateway_env(tmp_path)
    process = build_command(BOTH, tmp_path, env, **popen)
    held(gateway, process, 2)
    return env, process


def let_go(gateway: FakeGateway) -> int:
    """Open the gate, wait for the requests it held to end; the number of requests so far."""
    gateway.release(GET_RANGE)
    while gateway.in_flight.get(GET_RANGE, 0):
        time.sleep(0.05)
    return len(gateway.calls(GET_RANGE))


def half_done(tmp_path: Path) -> list[str]:
    """Temporary files and stored months under the data folder."""
    return [f for f in stored(tmp_path) if ".part" in f or ".tmp" in f or f.endswith(".parquet")]


def ignore_ctrl_c() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize(
    ("sig", "group", "ignored"),
    # SIGINT to the command alone: test_a_build_process_whose_run_ends_after_a_stop_...
    [(signal.SIGINT, True, False), (signal.SIGTERM, False, False), (signal.SIGINT, True, True)],
    ids=["ctrl-c", "sigterm-to-the-command", "ctrl-c-to-a-command-started-in-the-background"],
)
def test_a_stopped_build_stops_every_process_and_leaves_nothing_half_done(
    gateway, tmp_path, sig, group, ignored
):
    # Ctrl-C in a terminal signals the whole group; kill or a supervisor the command alone,
    # which passes it on. A shell starts a command in the background (`cmd &` in a script)
    # ignoring SIGINT: only its build processes stop then, and the command must still tell
    # the partitions they did not reach as stopped, not as failed.
    popen: dict[str, Any] = {"preexec_fn": ignore_ctrl_c} if ignored else {}
    env, process = two_downloads_held(gateway, tmp_path, start_new_session=True, **popen)
    if group:
        os.killpg(process.pid, sig)
    else:
        os.kill(process.pid, sig)
    code, lines, err = finished(process, timeout=90)
    since = let_go(gateway)

    text = "\n".join(lines) + err
    assert code == 1, text
    assert "0 built, 0 skipped (already built), 0 failed, 2 stopped" in text
    (during,) = [line for line in text.splitlines() if "while building" in line]
    assert ES_JAN in during and ES_FEB in during, text
    assert "Stopped (interrupted, or its run was cancelled) before 2 partition(s)" in text
    # Each stopped partition's line names its run and how long it ran, as any other's does.
    said = {line.split()[0]: line.split() for line in lines if line.startswith("20")}
    with DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        runs = all_runs(instance)
        for run in runs:
            words = said[partition_of(run)]
            assert words[1] == "STOPPED" and float(words[2]) > 0, text
            assert words[-1] == run.run_id, text
        # Each process's run in progress ended (Dagster records a run interrupted in a step
        # as failed) and no process started another partition.
        assert sorted(partition_of(r) for r in runs) == [ES_JAN, ES_FEB]
        assert all(r.status.value in ("FAILURE", "CANCELED") for r in runs), text
    assert half_done(tmp_path) == []

    code, lines, err = finished(build_command(BOTH, tmp_path, env))
    assert code == 0, "\n".join(lines) + err
    assert bought(gateway, since) == Counter(BOTH_PARTITIONS)


def test_a_build_process_whose_run_ends_after_a_stop_starts_no_other_partition(gateway, tmp_path):
    # A signal to the command alone reaches its build processes 5 s later. Their downloads
    # are let go at once, so their runs end before that; they must not start their next
    # partition, whose download the passed-on interrupt would cut after it was paid for.
    env, process = two_downloads_held(gateway, tmp_path)
    os.kill(process.pid, signal.SIGINT)
    since = let_go(gateway)
    code, lines, err = finished(process, timeout=90)

    text = "\n".join(lines) + err
    assert code == 1, text
    first = bought(gateway)
    assert sorted(first.values()) == [1, 1], text  # one month per process, nothing more
    assert len(gateway.calls(GET_RANGE)) == since
    assert "Stopped (interrupted, or its run was cancelled) before 2 partition(s)" in text
    with DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        assert sorted(partition_of(r) for r in all_runs(instance)) == sorted(first)
    assert not [f for f in half_done(tmp_path) if not f.endswith(".parquet")]

    code, lines, err = finished(build_command([*BOTH, "--missing-only"], tmp_path, env))
    assert code == 0, "\n".join(lines) + err
    assert bought(gateway) == Counter(BOTH_PARTITIONS)  # the rest bought, each month once


def test_a_killed_build_leaves_no_run_holding_a_download_slot(gateway, tmp_path):
    # One download slot, held by a run whose process is then killed (SIGKILL: nothing can
    # clean up). The next build cancels that run and frees its slot; without that it would
    # wait for the slot for ever.
    gateway.gate(GET_RANGE, parties=2, timeout=120)  # one slot: no second download comes
    env = gateway_env(tmp_path, pool_limit=1)
    process = build_command(BOTH, tmp_path, env, start_new_session=True)
    held(gateway, process, 1)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    since = let_go(gateway)
    with DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        left = [r.run_id for r in all_runs(instance) if not r.is_finished]
    assert left  # the killed run (and the one waiting for its slot) still say started

    code, lines, err = finished(build_command(BOTH, tmp_path, env), timeout=240)
    assert code == 0, "\n".join(lines) + err
    cancelled = [line.split()[2] for line in lines if line.startswith("Cancelled run ")]
    assert sorted(cancelled) == sorted(left)
    with DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        statuses = {r.run_id: r.status.value for r in all_runs(instance)}
    assert {statuses[run_id] for run_id in left} == {"CANCELED"}
    assert bought(gateway, since) == Counter(BOTH_PARTITIONS)
    assert not [f for f in half_done(tmp_path) if not f.endswith(".parquet")]


def test_only_runs_whose_build_process_is_gone_are_cancelled(tmp_path):
    me = psutil.Process()
    ended = subprocess.Popen(["true"])
    ended.wait()
    zombie = subprocess.Popen(["true"])  # ended, not yet waited for
    while psutil.Process(zombie.pid).status() != psutil.STATUS_ZOMBIE:
        time.sleep(0.01)
    processes = {  # pid, start time, cancelled
        "this process": (me.pid, me.create_time(), False),
        "an earlier version's run of this process": (me.pid, None, False),
        "a process that ended": (ended.pid, me.create_time(), True),
        "a zombie": (zombie.pid, psutil.Process(zombie.pid).create_time(), True),
        "an earlier process under this pid": (me.pid, me.create_time() - 60, True),
    }
    with instance_for_test() as instance:
        for name, (pid, started, _) in processes.items():
            tags = {HOST_TAG: socket.gethostname(), PID_TAG: str(pid), "name": name}
            if started is not None:
                tags[STARTED_TAG] = str(started)
            instance.add_run(
                DagsterRun(job_name="build", run_id=str(uuid.uuid4()), tags=tags, status=STARTED)
            )
        # Re-executed from a killed build's run (Dagster copies its tags), now running here.
        copied = {HOST_TAG: socket.gethostname(), PID_TAG: str(ended.pid), STARTED_TAG: "0"}
        processes["a re-execution running here"] = (ended.pid, None, False)
        running_here = DagsterRun(
            job_name="build",
            run_id=str(uuid.uuid4()),
            tags={**copied, "name": "a re-execution running here"},
            status=STARTED,
        )
        instance.add_run(running_here)
        instance.report_dagster_event(  # its step, logged by this process
            DagsterEvent(
                DagsterEventType.STEP_START.value, "build", step_key="raw_1s_bars", pid=me.pid
            ),
            running_here.run_id,
        )
        cancelled = {run.tags["name"] for run in cancel_orphaned_runs(instance)}
        statuses = {r.tags["name"]: r.status for r in instance.get_runs()}
    zombie.wait()
    assert cancelled == {name for name, (*_, gone) in processes.items() if gone}
    assert statuses == {
        name: DagsterRunStatus.CANCELED if gone else STARTED
        for name, (*_, gone) in processes.items()
    }


def test_a_killed_dagster_asset_materialize_leaves_no_download_slot_held(gateway, tmp_path):
    # Dagster's own command killed during its download: its run holds the pool's only slot,
    # and carries no build tags. The next build tells from the run's events that its process
    # is gone, cancels it and frees the slot; without that it would wait for ever.
    gateway.gate(GET_RANGE, parties=2, timeout=120)
    env = gateway_env(tmp_path, pool_limit=1)
    command = [sys.executable, "-m", "dagster", "asset", "materialize", "-m", "dbento_assets"]
    killed = subprocess.Popen(
        [*command, "--select", RAW_ASSET, "--partition", ES_JAN],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    held(gateway, killed, 1)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait(timeout=30)
    since = let_go(gateway)
    with DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        (left,) = [r.run_id for r in all_runs(instance) if not r.is_finished]

    args = ["--partition", ES_FEB, "--select", RAW_ASSET]
    code, lines, err = finished(build_command(args, tmp_path, env), timeout=240)
    assert code == 0, "\n".join(lines) + err
    assert [line.split()[2] for line in lines if line.startswith("Cancelled run ")] == [left]
    assert bought(gateway, since) == Counter([ES_FEB])


def test_a_build_waiting_for_a_download_slot_says_so_and_stops_on_ctrl_c(gateway, tmp_path):
    # The pool's only slot is held by a run elsewhere (another machine, another command):
    # the build says what it waits for and a Ctrl-C stops it before its run starts (Dagster's
    # own wait for a slot hears no interrupt).
    env = gateway_env(tmp_path, pool_limit=1)
    with DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        storage = instance.event_log_storage
        storage.set_concurrency_slots(DOWNLOAD_POOL, 1)
        claim = storage.claim_concurrency_slot(DOWNLOAD_POOL, "run-elsewhere", "raw")
        assert claim.is_claimed
    process = build_command(["--partition", ES_JAN], tmp_path, env)
    said = ""
    deadline = time.monotonic() + 120
    while "Waiting for a download slot" not in said:
        assert process.poll() is None and time.monotonic() < deadline, said
        if select.select([process.stderr], [], [], 0.5)[0]:
            said += process.stderr.readline().decode()
    os.kill(process.pid, signal.SIGINT)
    code, lines, err = finished(process, timeout=60)

    assert code == 1, "\n".join(lines) + err
    assert "slot(s) are held by run(s) run-elsewhere" in said
    assert "Stopped (interrupted, or its run was cancelled) before 1 partition(s)" in "\n".join(
        lines
    )
    assert gateway.calls(GET_RANGE) == []
    with DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        assert all_runs(instance) == []  # its run never started


def gone(pid: int) -> bool:
    """The process ended (a zombie nobody reaps counts as ended)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_build_processes_of_a_command_killed_alone_start_no_other_partition(gateway, tmp_path):
    # SIGKILL to the command alone (not its group): its build processes end their runs in
    # progress, then stop instead of building the rest unwatched.
    env, process = two_downloads_held(gateway, tmp_path)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    let_go(gateway)
    with DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        pids = set.union(*process_ids(instance, all_runs(instance)).values())
    deadline = time.monotonic() + 120
    while not all(gone(pid) for pid in pids):
        assert time.monotonic() < deadline, f"build processes {pids} still running"
        time.sleep(0.2)

    first = bought(gateway)
    assert sorted(first.values()) == [1, 1]  # the months in progress, nothing more
    with DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        runs = all_runs(instance)
    assert sorted((partition_of(r), r.status.value) for r in runs) == [
        (p, "SUCCESS") for p in sorted(first)
    ]
    assert not [f for f in half_done(tmp_path) if not f.endswith(".parquet")]


@pytest.fixture
def gateway_defs(gateway: FakeGateway, tmp_path):
    return build_definitions(databento=gateway_resource(gateway, tmp_path))


def gateway_resource(gateway: FakeGateway, tmp_path: Path, **settings: Any) -> DatabentoResource:
    """The Databento source on the test gateway, data under ``tmp_path/data``, two attempts."""
    return DatabentoResource(
        source="databento",
        api_key=TEST_KEY,
        gateway=gateway.url,
        data_dir=str(tmp_path / "data"),
        retry_attempts=2,
        retry_backoff_seconds=0.0,
        **settings,
    )


def get_ranges(gateway: FakeGateway) -> Counter[str]:
    """Successful ohlcv-1s ``get_range`` requests per month (``YYYY-MM`` of the start)."""
    return Counter(
        pd.Timestamp(r.fields["start"]).strftime("%Y-%m")
        for r in gateway.calls(GET_RANGE)
        if r.fault is None and r.fields.get("schema") == "ohlcv-1s"
    )


def test_failed_month_resumes_with_missing_only_and_force_downloads_again(
    gateway, gateway_defs, tmp_path, monkeypatch
):
    argv = ["--symbol", "ES", "--start", "2024-01", "--end", "2024-02"]
    with instance_for_test() as instance:
        # Both attempts of the first download fail: that month fails, the next one succeeds.
        gateway.fail("500", endpoint=GET_RANGE, times=2)
        out = io.StringIO()
        status = run(argv, out, io.StringIO(), defs=gateway_defs, instance=instance)
        lines = out.getvalue().splitlines()
        assert status == 1, out.getvalue()
        assert lines[0].split()[:2] == [ES_JAN, "FAILED"]
        assert (
            lines[1]
            .strip()
            .startswith("SourceError: timeseries.get_range for ES 2024-01 failed 2 times")
        ), lines[1]
        assert lines[2].split()[:2] == [ES_FEB, "ok"]
        assert "1 built, 0 skipped (already built), 1 failed" in lines[3]
        assert lines[4].startswith(f"Failed: {ES_JAN}.") and "--missing-only" in lines[4]
        assert get_ranges(gateway) == Counter({"2024-02": 1})
        # dbento status: the month that failed before any check is not shown as never tried.
        monkeypatch.setenv("DBENTO_SOURCE", "databento")
        monkeypatch.setenv("DBENTO_DATA_DIR", str(tmp_path / "data"))
        table = status_table(instance, ["ES"]).splitlines()
        assert next(li for li in table if li.startswith("2024-01")).split()[1:] == [
            "0/4",
            "files,",
            "last",
            "run",
            "failed",
        ]
        assert "4/4 files, pass" in next(li for li in table if li.startswith("2024-02"))

        out = io.StringIO()
        status = run([*argv, "--missing-only"], out, defs=gateway_defs, instance=instance)
        assert status == 0, out.getvalue()
        assert [line.split()[:2] for line in out.getvalue().splitlines()[:2]] == [
            [ES_JAN, "ok"],
            [ES_FEB, "skipped"],
        ]
        assert get_ranges(gateway) == Counter({"2024-01": 1, "2024-02": 1})

        out = io.StringIO()
        status = run([*argv, "--force"], out, defs=gateway_defs, instance=instance)
        assert status == 0, out.getvalue()
        assert get_ranges(gateway) == Counter({"2024-01": 2, "2024-02": 2})
        forced = [r for r in all_runs(instance) if r.tags.get(FORCE_TAG) == "true"]
        assert sorted(partition_of(r) for r in forced) == [ES_JAN, ES_FEB]
        for mat in materializations(instance, [r.run_id for r in forced]):
            if mat.asset == RAW_ASSET:
                assert mat.metadata["forced"] is True
        assets = [k.to_user_string() for k in gateway_defs.resolve_all_asset_keys()]
        assert_attributed(instance, forced, assets)


def test_force_vendor_1m_buys_only_the_1_minute_bars_again(gateway, tmp_path):
    defs = build_definitions(databento=gateway_resource(gateway, tmp_path, vendor_check=True))

    def schemas() -> Counter[str]:
        return Counter(c.fields.get("schema") for c in gateway.calls(GET_RANGE))

    with instance_for_test() as instance:
        for argv, words in (
            (["--force", "--force-vendor-1m"], "give --force or --force-vendor-1m"),
            (["--force-vendor-1m", "--missing-only"], "--force-vendor-1m and --missing-only"),
        ):
            err = io.StringIO()
            status = run(["--partition", ES_JAN, *argv], io.StringIO(), err, defs=defs)
            assert status == 2 and words in err.getvalue(), err.getvalue()
        assert run(["--partition", ES_JAN], io.StringIO(), defs=defs, instance=instance) == 0
        assert schemas() == Counter({"ohlcv-1s": 1, "ohlcv-1m": 1})

        out = io.StringIO()
        argv = ["--partition", ES_JAN, "--force-vendor-1m"]
        assert run(argv, out, defs=defs, instance=instance) == 0, out.getvalue()
        assert schemas() == Counter({"ohlcv-1s": 1, "ohlcv-1m": 2})
        (forced,) = [r for r in all_runs(instance) if r.tags.get(FORCE_TAG) == "vendor-1m"]
        (raw,) = [m for m in materializations(instance, [forced.run_id]) if m.asset == RAW_ASSET]
        assert raw.metadata["forced"] is False and raw.metadata["vendor_1m_forced"] is True


def charged(gateway: FakeGateway, month: Month, schema: str) -> float:
    """What the gateway charges for ES's ``schema`` in ``month`` (the data it serves now)."""
    es = load_catalog().instrument("ES")
    query = Query(
        es.dataset, (es.request_symbol,), schema, es.stype_in, month.start_ns, month.end_ns
    )
    return len(gateway.answer(query)[0]) * RECORD_BYTES / 2**30 * gateway.price_per_gb


def test_the_summary_counts_every_dollar_paid(gateway, tmp_path):
    # The 1-minute bars of the cross-check, and a download paid for and then refused by its
    # checks, are money spent too: the summary's cost is what the gateway charged.
    defs = build_definitions(databento=gateway_resource(gateway, tmp_path, vendor_check=True))
    with instance_for_test() as instance:
        out = io.StringIO()
        assert run(["--partition", ES_JAN], out, defs=defs, instance=instance) == 0
        paid = charged(gateway, JAN, "ohlcv-1s") + charged(gateway, JAN, "ohlcv-1m")
        assert f"Databento cost ${paid:,.4f}." in out.getvalue(), out.getvalue()

        serve_bad_data(gateway)  # February's 1-second bars fail their checks
        out = io.StringIO()
        assert run(["--partition", ES_FEB], out, defs=defs, instance=instance) == 1
        assert gateway.schemas(GET_RANGE)[-1] == "ohlcv-1s"  # bought, then refused
        assert f"Databento cost ${charged(gateway, FEB, 'ohlcv-1s'):,.4f}." in out.getvalue()


def test_a_month_paid_for_and_not_stored_is_counted_once(gateway, tmp_path):
    # The download is paid, then its raw file does not fit on the full data disk (the DBN
    # cache is elsewhere): the failed build still counts what it paid, and the build that
    # stores the month from the download cache once there is room pays and counts nothing.
    disk = tmpfs(tmp_path / "data-disk", "32m")
    data = next(disk) / "data"
    try:
        resource = DatabentoResource(
            source="databento",
            api_key=TEST_KEY,
            gateway=gateway.url,
            data_dir=str(data),
            cache_dir=str(tmp_path / "cache"),
            retry_backoff_seconds=0.0,
        )
        defs = build_definitions(databento=resource)
        filler = data.parent / "filler"
        with filler.open("wb") as f:  # all but 8 KiB of the disk
            os.posix_fallocate(f.fileno(), 0, os.statvfs(data.parent).f_bavail * 4096 - 8192)
        with instance_for_test() as instance:
            out = io.StringIO()
            assert run(["--partition", ES_JAN], out, defs=defs, instance=instance) == 1
            assert "No space left" in out.getvalue(), out.getvalue()
            paid = charged(gateway, JAN, "ohlcv-1s")
            assert f"Databento cost ${paid:,.4f}." in out.getvalue(), out.getvalue()
            filler.unlink()
            out = io.StringIO()
            assert run(["--partition", ES_JAN], out, defs=defs, instance=instance) == 0
            assert "Databento cost $0.0000." in out.getvalue(), out.getvalue()
        assert gateway.schemas(GET_RANGE) == ["ohlcv-1s"]  # bought once
    finally:
        disk.close()


def test_the_summary_counts_1_minute_bars_refused_or_bought_without_their_month(gateway, tmp_path):
    # Databento's 1-minute bars refused by their checks once they arrived, and those a build
    # of the bars alone buys (the month was bought before the cross-check was on), are paid
    # for too.
    on = build_definitions(databento=gateway_resource(gateway, tmp_path, vendor_check=True))
    off = build_definitions(databento=gateway_resource(gateway, tmp_path))
    gateway.corrupt_vendor_bar(inverted=True)
    with instance_for_test() as instance:
        out = io.StringIO()
        assert run(["--partition", ES_JAN], out, defs=on, instance=instance) == 0
        assert gateway.schemas(GET_RANGE) == ["ohlcv-1s", "ohlcv-1m"]
        runs = [r.run_id for r in all_runs(instance)]
        (raw,) = [m for m in materializations(instance, runs) if m.asset == RAW_ASSET]
        assert "fail the rule" in raw.metadata["vendor_1m_error"]  # arrived, and refused
        paid = charged(gateway, JAN, "ohlcv-1s") + charged(gateway, JAN, "ohlcv-1m")
        assert f"Databento cost ${paid:,.4f}." in out.getvalue(), out.getvalue()

        gateway.corrupt_vendor_bar(None)
        argv = ["--partition", ES_FEB, "--select"]
        assert run([*argv, RAW_ASSET], io.StringIO(), defs=off, instance=instance) == 0
        out = io.StringIO()
        assert run([*argv, "bars_1min"], out, defs=on, instance=instance) == 0, out.getvalue()
        assert gateway.schemas(GET_RANGE)[-2:] == ["ohlcv-1s", "ohlcv-1m"]
        assert f"Databento cost ${charged(gateway, FEB, 'ohlcv-1m'):,.4f}." in out.getvalue()


def test_a_build_that_writes_nothing_leaves_the_data_folder_free(gateway, gateway_defs, tmp_path):
    # A real-data build whose download fails marks nothing: the folder can still take demo
    # data (the mark comes with the first bar file).
    gateway.fail("500", endpoint=GET_RANGE, times=2)
    data = tmp_path / "data"
    with instance_for_test() as instance:
        assert run(["--partition", ES_JAN], io.StringIO(), defs=gateway_defs, instance=instance)
    assert not (data / ORIGIN_MARKER).exists()
    demo = DatabentoResource(source="demo", data_dir=str(data), demo_activity=0.02)
    out = io.StringIO()
    with instance_for_test() as instance:
        argv = ["--partition", ES_JAN, "--select", RAW_ASSET]
        status = run(argv, out, defs=build_definitions(databento=demo), instance=instance)
    assert status == 0, out.getvalue()
    assert (data / ORIGIN_MARKER).read_text().strip() == "synthetic"


def test_dagster_asset_materialize_one_partition_and_force_it(gateway, tmp_path):
    """The stock CLI for one partition, then force by run config: one more download."""
    home = tmp_path / "dagster_home"
    write_dagster_yaml(home)
    env = {
        **os.environ,  # the gateway fixture set DBENTO_GATEWAY and REQUESTS_CA_BUNDLE
        "DAGSTER_HOME": str(home),
        "DBENTO_SOURCE": "databento",
        "DATABENTO_API_KEY": TEST_KEY,
        "DBENTO_DATA_DIR": str(tmp_path / "data"),
    }
    base = [sys.executable, "-m", "dagster", "asset", "materialize", "-m", "dbento_assets"]
    one = ["--partition", ES_JAN]
    force = ["--config-json", '{"ops": {"raw_1s_bars": {"config": {"force": true}}}}']
    for extra in (["--select", "*", *one], ["--select", RAW_ASSET, *one, *force]):
        done = subprocess.run(
            base + extra, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    assert get_ranges(gateway) == Counter({"2024-01": 2})
    with DagsterInstance.from_config(str(home)) as instance:
        runs = instance.get_run_records()  # newest first
        forced, first = (record.dagster_run for record in runs)
        assets = ["bars_15s", "bars_1min", "bars_30s", RAW_ASSET]
        assert_attributed(instance, [first], assets)
        assert_attributed(instance, [forced], [RAW_ASSET])
        (raw,) = materializations(instance, [forced.run_id])
        assert raw.metadata["forced"] is True


@pytest.fixture
def small_demo_defs(tmp_path):
    resource = DatabentoResource(source="demo", data_dir=str(tmp_path / "data"), demo_activity=0.02)
    return build_definitions(databento=resource)


def test_select_materializes_only_the_selected_assets(small_demo_defs):
    with instance_for_test() as instance:
        out = io.StringIO()
        # ES given twice is built once.
        argv = ["--symbols", "ES,NQ", "--symbol", "ES", "--start", "2024-01", "--select", RAW_ASSET]
        assert run(argv, out, defs=small_demo_defs, instance=instance) == 0, out.getvalue()
        runs = all_runs(instance)
        assert sorted(partition_of(r) for r in runs) == sorted(
            [ES_JAN, str(partition_key(JAN, "NQ"))]
        )
        assert_attributed(instance, runs, [RAW_ASSET])
        assert instance.get_materialized_partitions(AssetKey("bars_1min")) == set()


def test_a_partition_given_twice_is_built_once(small_demo_defs):
    with instance_for_test() as instance:
        out = io.StringIO()
        argv = ["--partition", ES_JAN, "--partition", ES_JAN, "--select", RAW_ASSET]
        assert run(argv, out, defs=small_demo_defs, instance=instance) == 0, out.getvalue()
        assert [partition_of(r) for r in all_runs(instance)] == [ES_JAN]


class InterruptAsTheFirstRunEnds(logging.Handler):
    """A Dagster log handler (``python_logs`` in the instance's settings) that sends this
    process SIGINT once, as the first run reports its success: after its last step, where
    Dagster catches an interrupt and drops it."""

    sent = False

    def emit(self, record: logging.LogRecord) -> None:
        event = getattr(record, "dagster_meta", {}).get("dagster_event")
        if event is not None and event.event_type == DagsterEventType.RUN_SUCCESS and not self.sent:
            InterruptAsTheFirstRunEnds.sent = True
            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.filterwarnings("ignore::dagster.BetaWarning")  # python_logs handlers
def test_ctrl_c_as_a_run_ends_stops_the_build_before_the_next_partition(small_demo_defs):
    handler = f"{__name__}.{InterruptAsTheFirstRunEnds.__name__}"
    settings = {"python_logs": {"dagster_handler_config": {"handlers": {"stop": {"()": handler}}}}}
    feb = str(partition_key(Month(2024, 2), "ES"))
    caught = []  # pytest must not see the signal if it lands outside a run
    previous = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    InterruptAsTheFirstRunEnds.sent = False
    try:
        with instance_for_test(overrides=settings) as instance:
            out = io.StringIO()
            argv = ["--partition", ES_JAN, "--partition", feb, "--select", RAW_ASSET]
            status = run(argv, out, io.StringIO(), defs=small_demo_defs, instance=instance)
            runs = all_runs(instance)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert InterruptAsTheFirstRunEnds.sent and not caught  # the run's handler took it
    text = out.getvalue()
    assert status == 1, text
    assert "Stopped (interrupted, or its run was cancelled) before 1 partition(s)" in text
    # The month whose run had ended is built and kept; the next one is never started.
    assert [(partition_of(r), r.status.value) for r in runs] == [(ES_JAN, "SUCCESS")]


def test_missing_only_builds_again_what_the_data_folder_lost(small_demo_defs, tmp_path):
    # The history says both months are built; the folder says otherwise for January (a
    # file deleted, another copied over one), and for both once the format is switched.
    feb = str(partition_key(Month(2024, 2), "ES"))
    argv = ["--symbol", "ES", "--start", "2024-01", "--end", "2024-02"]
    with instance_for_test() as instance:
        assert run(argv, io.StringIO(), defs=small_demo_defs, instance=instance) == 0
        store = BarStore.at(str(tmp_path / "data"))
        minute = parse_timeframe("1min")
        Path(store.aggregated_path("ES", JAN, minute).path).unlink()
        again = run_missing_only(argv, small_demo_defs, instance)
        assert again == [ES_JAN], again
        thirty = parse_timeframe("30s")
        feb_30s = Path(store.aggregated_path("ES", FEB, thirty).path)
        feb_30s.write_bytes(Path(store.aggregated_path("ES", FEB, minute).path).read_bytes())
        assert run_missing_only(argv, small_demo_defs, instance) == [feb]
        assert run_missing_only(argv, small_demo_defs, instance) == []
        resource = small_demo_defs.resources["databento"]
        csv = build_definitions(
            databento=resource, io_manager=BarFileIOManager(databento=resource, format="csv")
        )
        assert run_missing_only(argv, csv, instance) == [ES_JAN, feb]
        # A CSV copied over another, its note left: the note no longer fits the file.
        store = BarStore.at(str(tmp_path / "data"), "csv")
        jan_1min = Path(store.aggregated_path("ES", JAN, minute).path)
        jan_1min.write_bytes(Path(store.aggregated_path("ES", FEB, minute).path).read_bytes())
        assert run_missing_only(argv, csv, instance) == [ES_JAN]
        # A CSV edited in place, its size kept: one bar's high and low swapped.
        jan_30s = Path(store.aggregated_path("ES", JAN, thirty).path)
        lines = jan_30s.read_text().splitlines(keepends=True)
        header = lines[0].rstrip("\n").split(",")
        high, low = header.index("high"), header.index("low")
        row = next(
            i for i, li in enumerate(lines[1:], 1) if li.split(",")[high] != li.split(",")[low]
        )
        fields = lines[row].rstrip("\n").split(",")
        fields[high], fields[low] = fields[low], fields[high]
        size = jan_30s.stat().st_size
        jan_30s.write_text("".join([*lines[:row], ",".join(fields) + "\n", *lines[row + 1 :]]))
        assert jan_30s.stat().st_size == size
        assert run_missing_only(argv, csv, instance) == [ES_JAN]
        assert run_missing_only(argv, csv, instance) == []  # rewritten: its note fits it


def test_bars_built_from_an_older_raw_month_are_not_counted_as_built(
    small_demo_defs, tmp_path, monkeypatch
):
    # The raw month rebuilt alone with other bars (Databento republished it, a DBN folder
    # fixed): the bar files, and the checks that passed them, speak for the old raw bars.
    # dbento status says so, and --missing-only builds them again from the raw file's bars.
    monkeypatch.setenv("DBENTO_SOURCE", "demo")
    monkeypatch.setenv("DBENTO_DATA_DIR", str(tmp_path / "data"))
    argv = ["--partition", ES_JAN]
    republished = build_definitions(
        databento=DatabentoResource(
            source="demo", data_dir=str(tmp_path / "data"), demo_activity=0.03
        )
    )
    with instance_for_test() as instance:
        assert run(argv, io.StringIO(), defs=small_demo_defs, instance=instance) == 0
        assert "4/4 files, pass" in status_table(instance, ["ES"])
        raw_alone = [*argv, "--select", RAW_ASSET, "--force"]
        assert run(raw_alone, io.StringIO(), defs=republished, instance=instance) == 0
        table = status_table(instance, ["ES"])
        assert "1/4 files" in table and "3 bar file(s) built from an older raw file" in table
        assert run_missing_only(argv, republished, instance) == [ES_JAN]
        assert "4/4 files, pass" in status_table(instance, ["ES"])
        assert run_missing_only(argv, republished, instance) == []


def test_files_of_a_symbol_asked_for_otherwise_are_not_counted_as_built(
    gateway, tmp_path, monkeypatch
):
    # ES bought as ES.v.0, then the catalog asks for NQ.v.0 (a typo, or its fix): the files
    # on disk are another instrument's bars. dbento status does not count them, the bars
    # step refuses the old raw file, and --missing-only builds the month again, buying the
    # new request once.
    def defs_for(catalog: Catalog) -> Any:
        return build_definitions(catalog=catalog, databento=gateway_resource(gateway, tmp_path))

    c0 = catalog_from(tmp_path, start_month="2024-01", **{'"ES.v.0"': '"NQ.v.0"'})
    argv = ["--partition", ES_JAN]
    monkeypatch.setenv("DBENTO_SOURCE", "databento")
    monkeypatch.setenv("DBENTO_DATA_DIR", str(tmp_path / "data"))
    with instance_for_test() as instance:
        assert run(argv, io.StringIO(), defs=defs_for(load_catalog()), instance=instance) == 0
        assert run_missing_only(argv, defs_for(load_catalog()), instance) == []
        monkeypatch.setenv("DBENTO_CATALOG", str(c0.path))
        cell = next(li for li in status_table(instance, ["ES"]).splitlines() if "2024-01" in li)
        assert "0/4 files, incomplete (last checks: pass)" in cell, cell

        out = io.StringIO()
        bars_only = [*argv, "--select", "bars_1min"]
        assert run(bars_only, out, defs=defs_for(c0), instance=instance) == 1
        assert "ES.v.0 (continuous)" in out.getvalue(), out.getvalue()

        # The first run moves the cached ES.v.0 month aside without paying (a catalog edit
        # made by mistake costs nothing yet), the next one buys NQ.v.0.
        out = io.StringIO()
        assert run([*argv, "--missing-only"], out, defs=defs_for(c0), instance=instance) == 1
        assert "was bought for ES.v.0 (continuous)" in out.getvalue(), out.getvalue()
        assert run_missing_only(argv, defs_for(c0), instance) == [ES_JAN]
        asked = [c.fields["symbols"] for c in gateway.calls(GET_RANGE) if c.fault is None]
        assert asked == ["ES.v.0", "NQ.v.0"]
        assert run_missing_only(argv, defs_for(c0), instance) == []
        cell = next(li for li in status_table(instance, ["ES"]).splitlines() if "2024-01" in li)
        assert "4/4 files, pass" in cell, cell
        out = io.StringIO()  # the command takes symbols as dbento build does
        assert dbento(["status", "--symbol", "ES,NQ"], out, instance=instance) == 0
        assert out.getvalue().splitlines()[1].split() == ["month", "ES", "NQ"], out.getvalue()


def test_a_build_removes_what_killed_writes_left_even_of_months_it_skips(small_demo_defs, tmp_path):
    # A write killed as it ran leaves a temporary file; a month built since is skipped by
    # --missing-only, so its own next run would never come to remove it.
    argv = ["--partition", ES_JAN, "--select", RAW_ASSET]
    with instance_for_test() as instance:
        assert run(argv, io.StringIO(), defs=small_demo_defs, instance=instance) == 0
        raw = Path(BarStore.at(str(tmp_path / "data")).raw_path("ES", JAN).path)
        left = raw.with_name(f".{raw.name}.{uuid.uuid4().hex}.tmp")
        left.write_bytes(b"half a file")
        young = raw.with_name(f".{raw.name}.{uuid.uuid4().hex}.tmp")
        young.write_bytes(b"a write in progress")
        held = open(young, "rb")  # noqa: SIM115 (its writer's lock, held across the build)
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        an_hour_ago = time.time() - 3600
        for path in (left, young):
            os.utime(path, (an_hour_ago, an_hour_ago))
        out = io.StringIO()
        assert run([*argv, "--missing-only"], out, defs=small_demo_defs, instance=instance) == 0
        held.close()
    assert f"Removed {left}, left by a write that was killed." in out.getvalue()
    assert not left.exists() and young.exists()


def test_missing_only_completes_a_month_stored_partial(tmp_path):
    # March built on the 10th holds 10 days; once it has closed, --missing-only builds it
    # again (a top-up), and only then counts it as built.
    def demo_at(now: str) -> Any:
        databento = DatabentoResource(
            source="demo", data_dir=str(tmp_path / "data"), demo_activity=0.02, demo_now=now
        )
        return build_definitions(databento=databento)

    march = str(partition_key(Month(2024, 3), "ES"))
    argv = ["--symbol", "ES", "--start", "2024-03", "--end", "2024-03", "--select", RAW_ASSET]
    with instance_for_test() as instance:
        assert run(argv, io.StringIO(), defs=demo_at("2024-03-10"), instance=instance) == 0
        assert run_missing_only(argv, demo_at("2024-04-05"), instance) == [march]
        assert run_missing_only(argv, demo_at("2024-04-05"), instance) == []
    store = BarStore.at(str(tmp_path / "data"))
    identity = store.identity_of(store.raw_path("ES", Month(2024, 3)))
    assert identity is not None and identity.complete


def run_missing_only(argv: list[str], defs: Any, instance: DagsterInstance) -> list[str]:
    """``dbento build ARGV --missing-only``; the partitions it built."""
    out = io.StringIO()
    assert run([*argv, "--missing-only"], out, defs=defs, instance=instance) == 0, out.getvalue()
    return [line.split()[0] for line in out.getvalue().splitlines() if " ok " in f"{line} "]


def test_without_dagster_home_it_uses_the_project_history(small_demo_defs, tmp_path, monkeypatch):
    """No DAGSTER_HOME: the runs go to ./.dagster_home, which .env then names for Dagster's
    own commands, and a second build with --missing-only finds the first one there."""
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    out, err = io.StringIO(), io.StringIO()
    argv = ["--symbol", "ES", "--start", "2024-01", "--select", RAW_ASSET]
    assert run(argv, out, err, defs=small_demo_defs) == 0, out.getvalue() + err.getvalue()
    assert out.getvalue().splitlines()[0].split()[:2] == [ES_JAN, "ok"]
    home = tmp_path / ".dagster_home"
    assert (home / "dagster.yaml").read_text().startswith("# Dagster instance settings")
    assert f'DAGSTER_HOME="${{DAGSTER_HOME:-{home}}}"' in (tmp_path / ".env").read_text()
    with DagsterInstance.from_config(str(home)) as instance:
        assert [partition_of(r) for r in all_runs(instance)] == [ES_JAN]
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    out = io.StringIO()
    assert run([*argv, "--missing-only"], out, io.StringIO(), defs=small_demo_defs) == 0
    assert out.getvalue().splitlines()[0].split()[:2] == [ES_JAN, "skipped"]


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--symbol", "XX", "--start", "2024-01"], "unknown symbol(s) XX; the catalog has ES"),
        (["--start", "2024-03", "--end", "2024-01"], "--end 2024-01 is before --start 2024-03"),
        (["--start", "2024-13"], "--start '2024-13': month must be 1..12"),
        (["--start", "2024-01", "--end", "Jan"], "--end 'Jan': month 'Jan' is not YYYY-MM"),
        (["--start", "2023-12"], "before the catalog's start_month 2024-01"),
        (["--start", "2099-01"], "--start 2099-01 is in the future"),
        (["--start", "2024-01", "--end", "2099-01"], "--end 2099-01 is in the future"),
        (["--start", "2024-01", "--force", "--missing-only"], "contradict each other"),
        (["--start", "2024-01", "--select", "no_such_asset"], "--select 'no_such_asset'"),
        (["--partition", "2024-01|ES"], "'2024-01|ES' is not a partition of this code location"),
        (["--symbol", "ES"], "give either --start YYYY-MM"),
        (["--start", "2024-01", "--no-such-option"], "No such option '--no-such-option'"),
    ],
)
def test_bad_options_exit_2_with_a_clear_message(small_demo_defs, argv, words):
    out, err = io.StringIO(), io.StringIO()
    with instance_for_test() as instance:
        assert run(argv, out, err, defs=small_demo_defs, instance=instance) == 2
        assert instance.get_runs() == []
    assert words in err.getvalue()
    assert len(err.getvalue().strip().splitlines()) == 1, err.getvalue()  # one sentence
    assert err.getvalue().startswith("error: ")
    assert out.getvalue() == ""


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"source": "databento"}, "needs a Databento API key and none is set"),
        ({"source": "dbn", "dbn_dir": "/no/such/folder"}, "is not a folder"),
        ({"source": "databento", "api_key": TEST_KEY}, "holds SYNTHETIC demo data"),
    ],
)
def test_set_up_errors_are_one_sentence_before_any_run(tmp_path, settings, words):
    """A mistake no retry can fix stops before the first run, in one line, without advising
    --missing-only; --verbose adds the traceback."""
    data = tmp_path / "data"
    BarStore.at(data).claim("synthetic", "demo")  # the folder already holds demo bars
    defs = build_definitions(databento=DatabentoResource(data_dir=str(data), **settings))
    argv = ["--symbol", "ES", "--start", "2024-01"]
    with instance_for_test() as instance:
        out, err = io.StringIO(), io.StringIO()
        assert run(argv, out, err, defs=defs, instance=instance) == 2
        assert instance.get_runs() == []
        assert err.getvalue().startswith("error: ") and words in err.getvalue()
        assert len(err.getvalue().splitlines()) == 1 and "--missing-only" not in err.getvalue()
        assert out.getvalue() == ""
        err = io.StringIO()
        assert run([*argv, "--verbose"], io.StringIO(), err, defs=defs, instance=instance) == 2
        assert "Traceback (most recent call last)" in err.getvalue()


class Terminal(io.StringIO):
    """A stream that says it is a terminal, as a user's console does."""

    def isatty(self) -> bool:
        return True


def test_a_range_shows_a_progress_bar_on_a_terminal_only(small_demo_defs):
    argv = ["--symbols", "ES,NQ", "--start", "2024-01", "--select", RAW_ASSET]
    with instance_for_test() as instance:
        out, err = io.StringIO(), Terminal()
        assert run(argv, out, err, defs=small_demo_defs, instance=instance) == 0
        assert "2/2" in err.getvalue() and "partition" in err.getvalue()  # tqdm's bar
        assert "2/2" not in out.getvalue()  # the lines and the summary stay clean
        out, err = io.StringIO(), io.StringIO()
        assert (
            run([*argv, "--missing-only"], out, err, defs=small_demo_defs, instance=instance) == 0
        )
        assert err.getvalue() == ""  # not a terminal (a log file, a pipe): no bar


# --------------------------------------------------------------------------- build_range job


def test_the_build_range_job_shares_a_range_among_its_workers(monkeypatch, tmp_path):
    # DBENTO_RANGE_WORKERS steps, each its own process in a real run (test_range_job.py);
    # here, in one process: every partition built once, by the share its position gives it.
    monkeypatch.setenv("DBENTO_RANGE_WORKERS", "3")
    resource = DatabentoResource(source="demo", data_dir=str(tmp_path / "data"))
    job = build_definitions(databento=resource).get_job_def(JOB_NAME)
    shares = [f"build_share_{i}" for i in range(3)]
    assert sorted(job.graph.node_dict) == shares
    config = {"start": "2024-01", "end": "2024-02", "symbols": ["ES", "NQ"], "select": RAW_ASSET}
    with instance_for_test() as instance:
        result = job.execute_in_process(run_config=config, instance=instance)
        runs = instance.get_runs(RunsFilter(tags={RANGE_TAG: result.run_id}))
        built = Counter(run.tags["dagster/partition"] for run in runs)
        logged = [
            (e.step_key, e.message)
            for e in instance.all_logs(result.run_id)
            if e.step_key and e.message and "|" in e.message and " ok " in e.message
        ]
    keys = [str(partition_key(Month(2024, m), s)) for s in ("ES", "NQ") for m in (1, 2)]
    assert built == Counter(keys) and all(r.status.value == "SUCCESS" for r in runs)
    for index, key in enumerate(keys):  # the i-th partition went to share i mod 3
        assert any(step == shares[index % 3] and key in text for step, text in logged)


@pytest.mark.parametrize(
    ("name", "value"),
    [("DBENTO_EXECUTOR", "foo"), ("DBENTO_DEMO_ACTIVITY", "0"), ("DBENTO_BACKFILL_BATCH", "0")],
)
def test_a_setting_typo_is_one_sentence_not_a_bug_report(tmp_path, name, value):
    # The command as a user starts it (its code location loads the settings).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DBENTO_", "DAGSTER_"))}
    env.update({"DBENTO_SOURCE": "demo", name: value})
    command = [str(Path(sys.executable).parent / "dbento"), "build", "--partition", ES_JAN]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"error: {name}"), done.stderr
    assert "unexpected" not in done.stderr and len(done.stderr.splitlines()) == 1


@pytest.mark.parametrize("value", ["0", "65", "two"])
def test_a_bad_range_workers_setting_names_the_variable(monkeypatch, value, small_demo_defs):
    monkeypatch.setenv("DBENTO_RANGE_WORKERS", value)
    with pytest.raises(ValueError, match=f"DBENTO_RANGE_WORKERS='{value}'"):
        build_definitions(databento=DatabentoResource(source="demo"))
    out, err = io.StringIO(), io.StringIO()  # dbento build: one line, before any run
    with instance_for_test() as instance:
        argv = ["--start", "2024-01"]
        assert run(argv, out, err, defs=small_demo_defs, instance=instance) == 2
        assert instance.get_runs() == []
    assert err.getvalue().startswith(f"error: DBENTO_RANGE_WORKERS='{value}'"), err.getvalue()
    assert len(err.getvalue().strip().splitlines()) == 1
