"""The ``build_range`` job: a range of partitions in one run, each partition its own run.

Through a real deployment (webserver plus daemon, :mod:`dbento_assets_tests.deployment`), the
job is launched as the launchpad does (``launchRun``; the run queue starts it in a run worker
of its own). The proof is what the UI shows per partition: every check of every asset has a
status for each partition of the range, equal to what that partition's own evaluation said,
and it stays right when the range is built again with one partition failing (a raw file
cut short): the others' results are current, the failed one's are not shown as passed; built
once more, the failed partition is mended from the cached download. Nothing is bought twice
(the Databento source; the test gateway's request count).
"""

from __future__ import annotations

import copy
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from dagster import DagsterEventType, DagsterInstance, RunsFilter

from dbento_assets.backfill import RANGE_TAG, range_workers
from dbento_assets.core.months import Month
from dbento_assets.core.storage import BarStore
from dbento_assets.names import RAW_ASSET
from dbento_assets.partitions import MONTH_DIM, SYMBOL_DIM, partition_key
from dbento_assets.range_job import JOB_NAME
from dbento_assets_tests.deployment import (
    Deployment,
    gateway_env,
    running_deployment,
    statuses_said,
)
from dbento_assets_tests.gateway import GET_RANGE, TEST_KEY, FakeGateway

pytestmark = pytest.mark.e2e

SYMBOLS = ("ES", "SPY")
MONTHS = (Month(2024, 1), Month(2024, 2))
PARTITIONS = [str(partition_key(m, s)) for s in SYMBOLS for m in MONTHS]
TIMEOUT = 240.0
ASSET_JOB = "__ASSET_JOB"  # the job the UI's Materialize and launchpad run


def range_config(**config: object) -> dict[str, object]:
    """The job's run config, as typed in the launchpad."""
    return {"start": "2024-01", "end": "2024-02", "symbols": list(SYMBOLS), **config}


@pytest.fixture(scope="module")
def deployment(
    tmp_path_factory: pytest.TempPathFactory, served_gateway: tuple[FakeGateway, Path]
) -> Iterator[tuple[Deployment, Path]]:
    fake, ca_file = served_gateway
    workdir = tmp_path_factory.mktemp("range-job")
    data = workdir / "data"
    env = {
        **gateway_env(fake.url, ca_file, TEST_KEY),
        "DBENTO_DATA_DIR": str(data),
        "DBENTO_RETRY_ATTEMPTS": "1",
        "DBENTO_VENDOR_CHECK": "true",  # so every check of every asset is evaluated
    }
    with running_deployment(workdir, env) as running:
        yield running, data


def inner_runs(instance: DagsterInstance, run_id: str) -> dict[str, tuple[str, str]]:
    """The runs the job's run started: partition to (run id, run status)."""
    runs = instance.get_runs(RunsFilter(tags={RANGE_TAG: run_id}))
    return {run.tags["dagster/partition"]: (run.run_id, run.status.value) for run in runs}


def run_ids(runs: dict[str, tuple[str, str]]) -> list[str]:
    return [run_id for run_id, _ in runs.values()]


def requested(
    fake: FakeGateway, since: int, schema: str | None = None
) -> Counter[tuple[str, str, str]]:
    """Answered ``get_range`` requests from the ``since``-th on, per (symbols, schema,
    start): a month bought once counts 1."""
    return Counter(
        (c.fields["symbols"], c.fields["schema"], c.fields["start"])
        for c in fake.calls(GET_RANGE)[since:]
        if c.fault is None and schema in (None, c.fields["schema"])
    )


def bought_once(fake: FakeGateway) -> Counter[tuple[str, str]]:
    """The gateway's ``get_range`` requests per (symbols, schema): each month once."""
    asked = Counter((c.fields["symbols"], c.fields["schema"]) for c in fake.calls(GET_RANGE))
    assert len(asked) == 2 * len(SYMBOLS) and set(asked.values()) == {len(MONTHS)}
    return asked


def test_a_range_in_one_run_keeps_every_partitions_check_status(deployment, served_gateway):
    running, data = deployment
    fake, _ = served_gateway
    run_id = running.launch_run(JOB_NAME, range_config())
    assert running.wait_for_run(run_id, TIMEOUT) == "SUCCESS", running.log_tail()

    with running.instance() as instance:
        runs = inner_runs(instance, run_id)
        expected = statuses_said(instance, run_ids(runs))
    assert {p: status for p, (_, status) in runs.items()} == dict.fromkeys(PARTITIONS, "SUCCESS")
    checks = running.asset_checks()
    wanted = {(a, c, p) for a, names in checks.items() for c in names for p in PARTITIONS}
    assert set(expected) == wanted  # every check of every asset, once per partition
    assert running.check_partition_statuses() == expected  # what the UI shows
    bought = bought_once(fake)

    # The range again, bars only, with ES 2024-02's raw file cut short: that partition
    # fails and the job's run says so; the others are rebuilt with current check results.
    broken = Path(BarStore.at(str(data)).raw_path("ES", Month(2024, 2)))
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    bars = [a for a in checks if a != RAW_ASSET]
    again = running.launch_run(JOB_NAME, range_config(select=",".join(bars)))
    assert running.wait_for_run(again, TIMEOUT) == "FAILURE"

    failed = str(partition_key(Month(2024, 2), "ES"))
    with running.instance() as instance:
        runs = inner_runs(instance, again)
        rebuilt = statuses_said(instance, run_ids(runs))
    assert {p: status for p, (_, status) in runs.items()} == {
        p: "FAILURE" if p == failed else "SUCCESS" for p in PARTITIONS
    }
    assert {p for _, _, p in rebuilt} == set(PARTITIONS) - {failed}
    shown = running.check_partition_statuses()
    assert {k: shown[k] for k in rebuilt} == rebuilt  # current: the new run's results
    for asset in bars:  # the failed partition's earlier passes are not shown as current
        assert {shown.get((asset, c, failed)) for c in checks[asset]} == {"EXECUTION_FAILED"}
    assert bought_once(fake) == bought  # nothing bought again

    # Launched again for every asset: the cut raw file is made again from the cached
    # download, every partition passes, and still nothing is bought again.
    mended = running.launch_run(JOB_NAME, range_config())
    assert running.wait_for_run(mended, TIMEOUT) == "SUCCESS", running.log_tail()
    with running.instance() as instance:
        now = statuses_said(instance, run_ids(inner_runs(instance, mended)))
    assert set(now) == wanted and running.check_partition_statuses() == now
    assert bought_once(fake) == bought


def test_a_failed_download_fails_its_partition_alone_and_a_reexecution_buys_only_it(
    deployment, served_gateway
):
    running, _ = deployment
    fake, _ = served_gateway
    before = len(fake.calls(GET_RANGE))
    fake.fail("500", endpoint=GET_RANGE)  # one download fails, beyond the retry budget (1)
    config = range_config(start="2024-03", end="2024-04")
    run_id = running.launch_run(JOB_NAME, config)
    assert running.wait_for_run(run_id, TIMEOUT) == "FAILURE"
    assert fake.pending_faults() == 0
    with running.instance() as instance:
        first = inner_runs(instance, run_id)
    failed = [p for p, (_, status) in first.items() if status == "FAILURE"]
    assert len(first) == 4 and len(failed) == 1, first

    # The run page's "Re-execute from failure": only the failed share runs again; its months
    # already bought are decoded from the cache, and the failed one is bought once.
    again = running.reexecute_run(run_id)
    assert running.wait_for_run(again, TIMEOUT) == "SUCCESS", running.log_tail()
    with running.instance() as instance:
        second = inner_runs(instance, again)
        said = statuses_said(instance, run_ids(second))
    assert failed[0] in second and set(second) < set(first)  # only the failed share's
    asked = requested(fake, before)
    assert len(asked) == 2 * 4 and set(asked.values()) == {1}  # 1s and 1m, each month once
    shown = running.check_partition_statuses()
    assert {k: shown[k] for k in said} == said


def test_cancelling_the_jobs_run_stops_it_between_partitions_and_leaves_nothing_half_done(
    deployment, served_gateway
):
    running, data = deployment
    fake, _ = served_gateway
    before = len(fake.calls(GET_RANGE))
    months = [Month(2024, m) for m in range(5, 11)]
    config = range_config(start="2024-05", end="2024-10", select=RAW_ASSET)
    run_id = running.launch_run(JOB_NAME, config)
    deadline = time.monotonic() + TIMEOUT
    with running.instance() as instance:
        while sum(s == "SUCCESS" for _, s in inner_runs(instance, run_id).values()) < 2:
            assert time.monotonic() < deadline, running.log_tail()
            time.sleep(0.2)
        started = len(inner_runs(instance, run_id))
    running.terminate_run(run_id)

    assert running.wait_for_run(run_id, TIMEOUT) == "CANCELED"
    with running.instance() as instance:
        runs = inner_runs(instance, run_id)
    assert {s for _, s in runs.values()} <= {"SUCCESS", "FAILURE", "CANCELED"}, runs
    # It stopped early: at most one partition more per share, started before it heard.
    assert len(runs) <= started + range_workers()
    assert len(runs) < len(SYMBOLS) * len(months)
    half_written = [p for p in data.rglob("*") if p.name.endswith((".tmp", ".part"))]
    assert not half_written
    store = BarStore.at(str(data))
    for key, (_, status) in runs.items():
        if status == "SUCCESS":
            month, symbol = Month.parse(key[:7]), key.split("|")[1]
            bars, identity = store.read_with_identity(store.raw_path(symbol, month))
            assert identity is not None and len(bars) > 0

    # Launched again: it finishes the range, and no month is bought twice.
    again = running.launch_run(JOB_NAME, config)
    assert running.wait_for_run(again, TIMEOUT) == "SUCCESS", running.log_tail()
    asked = requested(fake, before, "ohlcv-1s")
    assert len(asked) == len(SYMBOLS) * len(months) and set(asked.values()) == {1}


def test_the_launchpads_default_config_runs_and_a_setting_changed_in_it_is_refused(
    deployment, served_gateway
):
    # The launchpad starts its editor with every resource setting as loaded; launched as it
    # is, a partition is built. With the io_manager's format changed there, nothing runs.
    running, data = deployment
    fake, _ = served_gateway
    config = running.default_run_config(ASSET_JOB)
    resources = config["resources"]
    assert resources["databento"]["config"]["api_key"] == {"env": "DATABENTO_API_KEY"}
    assert resources["io_manager"]["config"]["format"] == "parquet"
    month, symbol = Month(2024, 12), "ES"  # a month no other test of the module builds
    tags = {
        "dagster/partition": str(partition_key(month, symbol)),
        f"dagster/partition/{MONTH_DIM}": month.start.strftime("%Y-%m-%d"),
        f"dagster/partition/{SYMBOL_DIM}": symbol,
    }
    since = len(fake.calls(GET_RANGE))
    changed = copy.deepcopy(config)
    changed["resources"]["io_manager"]["config"]["format"] = "csv"
    refused = running.launch_run(ASSET_JOB, changed, tags)
    assert running.wait_for_run(refused, TIMEOUT) == "FAILURE"
    assert len(fake.calls(GET_RANGE)) == since  # nothing bought
    assert not Path(BarStore.at(str(data)).raw_path(symbol, month)).exists()

    built = running.launch_run(ASSET_JOB, config, tags)
    assert running.wait_for_run(built, TIMEOUT) == "SUCCESS", running.log_tail()
    assert requested(fake, since, "ohlcv-1s") == Counter(
        {(f"{symbol}.v.0", "ohlcv-1s", month.start.isoformat()): 1}
    )


def test_a_range_it_cannot_build_fails_saying_what_to_fix_before_any_partition(
    deployment, served_gateway
):
    # Dagster 1.13 answers an error raised while the launchpad maps the config with an HTTP
    # 500 and a stack trace, so the range is checked in the run, before any partition (the
    # same check as dbento build's, whose messages test_backfill_cli.py covers).
    config = range_config(start="2024-13")
    said = "--start '2024-13': month must be 1..12"
    running, _ = deployment
    fake, _ = served_gateway
    since = len(fake.calls(GET_RANGE))
    run_id = running.launch_run(JOB_NAME, config)
    assert running.wait_for_run(run_id, TIMEOUT) == "FAILURE"
    with running.instance() as instance:
        failures = [
            e.dagster_event.step_failure_data.error.message
            for e in instance.all_logs(run_id, of_type=DagsterEventType.STEP_FAILURE)
        ]
        assert inner_runs(instance, run_id) == {}
    assert failures and all(said in f for f in failures), failures
    assert len(fake.calls(GET_RANGE)) == since
