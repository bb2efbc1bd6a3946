"""End to end: backfills launched through the GraphQL API the UI uses, run by a real daemon.

The deployment is a real Dagster webserver plus daemon on 127.0.0.1 with a temporary
``DAGSTER_HOME`` (:mod:`dbento_assets_tests.deployment`). The tests launch asset backfills of
2 symbols x some months with ``launchPartitionBackfill``, wait for the daemon to finish them,
then check every bar file on disk and, in the instance, every materialization and every asset
check evaluation per partition, each partition a run of its own (``DBENTO_BACKFILL_BATCH=1``;
test_batched_backfills.py batches). The deployment uses the Databento source against the fake
HTTPS gateway of :mod:`dbento_assets_tests.gateway`, whose
``timeseries.get_range`` requests are counted per partition: one per partition for a backfill,
none again for a month already downloaded when a failed backfill is re-executed from failure
(what the UI's "Re-execute from failure" sends), and one more per partition when the backfill
carries the tag ``dbento/force=true``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from dbento_assets.assets import FORCE_TAG
from dbento_assets.core.aggregate import aggregate_bars
from dbento_assets.core.catalog import Catalog, load_catalog
from dbento_assets.core.databento_api import dbn_cache_path
from dbento_assets.core.months import Month
from dbento_assets.core.rules import RULE_VENDOR
from dbento_assets.core.storage import BarStore
from dbento_assets.core.timeframes import parse_timeframe
from dbento_assets.names import BARS_PREFIX, RAW_ASSET
from dbento_assets.partitions import Partition, partition_key
from dbento_assets_tests.deployment import (
    BackfillResult,
    Deployment,
    DeploymentConfig,
    backfill_runs,
    check_evaluations,
    gateway_env,
    materializations,
    partition_of,
    running_deployment,
)
from dbento_assets_tests.gateway import GET_RANGE, TEST_KEY, FakeGateway, RecordedRequest

pytestmark = pytest.mark.e2e

SYMBOLS = ("ES", "NQ")
MONTHS = (Month(2024, 1), Month(2024, 2), Month(2024, 3))
RESUME_MONTHS = (Month(2024, 4), Month(2024, 5))
RETRY_ATTEMPTS = 2  # DBENTO_RETRY_ATTEMPTS of the Databento deployment
BACKFILL_INTERVAL_SECONDS = 1.0  # the backfill daemon's loop period (Dagster's own: 30 s)
BACKFILL_TIMEOUT = 240.0


def partitions(months: Sequence[Month], symbols: Sequence[str] = SYMBOLS) -> list[str]:
    return [str(partition_key(month, symbol)) for symbol in symbols for month in months]


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return load_catalog()


@pytest.fixture(scope="module")
def databento_deployment(
    tmp_path_factory: pytest.TempPathFactory, served_gateway: tuple[FakeGateway, Path]
) -> Iterator[Deployment]:
    gateway, ca_file = served_gateway
    workdir = tmp_path_factory.mktemp("e2e-databento")
    env = {
        **gateway_env(gateway.url, ca_file, TEST_KEY),
        "DBENTO_DATA_DIR": str(workdir / "data"),
        "DBENTO_RETRY_ATTEMPTS": str(RETRY_ATTEMPTS),
        "DBENTO_EXECUTOR": "in_process",
        "DBENTO_BACKFILL_BATCH": "1",
    }
    # One download slot: the raw steps of concurrent runs take turns, so a queued gateway
    # fault hits every attempt of one partition.
    config = DeploymentConfig(max_concurrent_runs=3, databento_pool_limit=1)
    with running_deployment(
        workdir, env, config=config, backfill_interval_seconds=BACKFILL_INTERVAL_SECONDS
    ) as deployment:
        yield deployment


@dataclass(frozen=True)
class Downloaded:
    """The first Databento backfill (ES and NQ x MONTHS) and the gateway's requests for it."""

    result: BackfillResult
    requests: list[RecordedRequest]


@pytest.fixture(scope="module")
def downloaded(
    databento_deployment: Deployment, served_gateway: tuple[FakeGateway, Path]
) -> Downloaded:
    gateway, _ = served_gateway
    before = len(gateway.calls(GET_RANGE))
    result = launch_and_wait(databento_deployment, partitions(MONTHS))
    return Downloaded(result, gateway.calls(GET_RANGE)[before:])


# ---------------------------------------------------------------------- helpers


def launch_and_wait(
    deployment: Deployment, names: Sequence[str], tags: dict[str, str] | None = None
) -> BackfillResult:
    """Launch a backfill of every asset for ``names``, as the UI does, and wait for its end."""
    return deployment.run_backfill(names, tags=tags, timeout=BACKFILL_TIMEOUT)


def data_dir(deployment: Deployment) -> Path:
    return deployment.home.parent / "data"


def request_partition(request: RecordedRequest, catalog: Catalog) -> str:
    """The partition a ``get_range`` request was for (request symbol and start month)."""
    symbols = {inst.request_symbol: name for name, inst in catalog.instruments.items()}
    start = request.fields["start"]
    stamp = pd.Timestamp(int(start), tz="UTC") if start.isdigit() else pd.Timestamp(start)
    stamp = stamp.tz_convert("UTC") if stamp.tzinfo else stamp.tz_localize("UTC")
    month = Month(stamp.year, stamp.month)
    return str(partition_key(month, symbols[request.fields["symbols"]]))


def get_range_counts(requests: Sequence[RecordedRequest], catalog: Catalog) -> Counter[str]:
    """Successful (unfaulted) ``get_range`` requests for ohlcv-1s months, per partition."""
    return Counter(
        request_partition(r, catalog)
        for r in requests
        if r.fault is None and r.fields.get("schema") == "ohlcv-1s"
    )


def assert_partitions_recorded(
    deployment: Deployment,
    backfill_id: str,
    expected: Sequence[str],
    catalog: Catalog,
) -> None:
    """Per partition: one successful run, every asset's file and materialization, every check.

    Files are read back: the raw file holds exactly the partition's symbol inside its month
    and as many rows as its materialization says; each aggregated file equals the aggregation
    of the raw file. Each asset check of the code location (but the vendor check, see below)
    evaluated once per partition, in that partition's run, and its evaluation names that
    partition; the blocking (ERROR) ones passed.
    """
    assets = [key.to_user_string() for key in deployment.asset_keys()]
    checks = deployment.asset_checks()
    store = BarStore.at(data_dir(deployment))
    with deployment.instance() as instance:
        runs = backfill_runs(instance, backfill_id)
        run_ids = [run.run_id for run in runs]
        mats = materializations(instance, run_ids)
        evaluations = check_evaluations(instance, run_ids)
        statuses = {run.run_id: run.status.value for run in runs}
    run_of = {partition_of(run): run.run_id for run in runs}
    assert sorted(partition_of(run) for run in runs) == sorted(expected), "one run per partition"
    assert set(statuses.values()) == {"SUCCESS"}, statuses

    by_key = Counter((m.asset, m.partition) for m in mats)
    assert by_key == Counter({(a, p): 1 for a in assets for p in expected}), by_key
    for mat in mats:
        assert mat.run_id == run_of[mat.partition], f"{mat.asset} {mat.partition} in wrong run"

    for name in expected:
        parsed = Partition.from_key(name)
        month, symbol = parsed.month, parsed.symbol
        raw_path = store.raw_path(symbol, month)
        raw = store.read(raw_path)
        raw_mat = next(m for m in mats if m.asset == RAW_ASSET and m.partition == name)
        assert raw_mat.metadata["dagster/row_count"] == len(raw) > 0
        assert raw_mat.metadata["path"] == str(raw_path.path)
        assert set(raw["symbol"]) == {symbol}
        assert raw["ts_event"].min() >= month.start and raw["ts_event"].max() < month.end
        for asset in assets:
            if not asset.startswith(BARS_PREFIX):
                continue
            timeframe = parse_timeframe(asset.removeprefix(BARS_PREFIX))
            path = store.aggregated_path(symbol, month, timeframe)
            bars = store.read(path)
            pd.testing.assert_frame_equal(bars, aggregate_bars(raw, timeframe))
            mat = next(m for m in mats if m.asset == asset and m.partition == name)
            assert mat.metadata["dagster/row_count"] == len(bars)
            assert mat.metadata["path"] == str(path.path)

    # Without DBENTO_VENDOR_CHECK there are no vendor bars to compare with, and that check is
    # left unevaluated (never shown as a green pass); every other check runs per partition.
    expected_checks = Counter(
        (asset, check, name)
        for asset, names in checks.items()
        for check in names
        if check != RULE_VENDOR
        for name in expected
    )
    found_checks = Counter((e.asset, e.check_name, e.partition) for e in evaluations)
    assert found_checks == expected_checks, "check results are not attributed per partition"
    for evaluation in evaluations:
        assert evaluation.run_id == run_of[evaluation.partition]
        if evaluation.severity == "ERROR":
            assert evaluation.passed, f"{evaluation} failed on good data"


# ---------------------------------------------------------------------- tests


def test_databento_backfill_requests_each_month_once(
    databento_deployment: Deployment, downloaded: Downloaded, catalog: Catalog
) -> None:
    names = partitions(MONTHS)
    result = downloaded.result

    assert result.status == "COMPLETED_SUCCESS", result
    keys = databento_deployment.asset_keys()
    assert set(result.asset_counts) == {k.to_user_string() for k in keys}
    for counts in result.asset_counts.values():
        assert counts["materialized"] == counts["targeted"] == len(names), result.asset_counts
    assert get_range_counts(downloaded.requests, catalog) == Counter(dict.fromkeys(names, 1))
    assert all(r.auth_user == TEST_KEY for r in downloaded.requests)
    for name in names:
        parsed = Partition.from_key(name)
        month, symbol = parsed.month, parsed.symbol
        assert dbn_cache_path(data_dir(databento_deployment), symbol, month).is_file()
    assert_partitions_recorded(databento_deployment, result.backfill_id, names, catalog)


def test_failed_partition_resumes_without_downloading_again(
    databento_deployment: Deployment, served_gateway: tuple[FakeGateway, Path], catalog: Catalog
) -> None:
    gateway, _ = served_gateway
    names = partitions(RESUME_MONTHS)
    root = data_dir(databento_deployment)
    store = BarStore.at(root)

    # Every attempt of one download fails with a 500: beyond the retry budget.
    before = len(gateway.calls(GET_RANGE))
    gateway.fail("500", endpoint=GET_RANGE, times=RETRY_ATTEMPTS)
    first = launch_and_wait(databento_deployment, names)
    first_requests = gateway.calls(GET_RANGE)[before:]

    assert gateway.pending_faults() == 0
    faulted = {request_partition(r, catalog) for r in first_requests if r.fault == "500"}
    assert len(faulted) == 1, faulted
    (failed,) = faulted
    succeeded = [name for name in names if name != failed]
    assert first.status in ("COMPLETED_FAILED", "FAILED"), first
    assert get_range_counts(first_requests, catalog) == Counter(dict.fromkeys(succeeded, 1))
    for counts in first.asset_counts.values():
        assert counts["materialized"] == len(succeeded), first.asset_counts
        assert counts["failed"] == 1, first.asset_counts
    parsed = Partition.from_key(failed)
    failed_month, failed_symbol = parsed.month, parsed.symbol
    assert not store.raw_path(failed_symbol, failed_month).exists()
    assert not dbn_cache_path(root, failed_symbol, failed_month).exists()
    with databento_deployment.instance() as instance:
        runs = backfill_runs(instance, first.backfill_id)
        statuses = {partition_of(run): run.status.value for run in runs}
        done = materializations(instance, [run.run_id for run in runs])
    assert statuses == {name: ("FAILURE" if name == failed else "SUCCESS") for name in names}
    assert {m.partition for m in done} == set(succeeded)

    # Resume as the UI's "Re-execute from failure" does: only the failed partition runs,
    # and only its month is requested from Databento.
    before = len(gateway.calls(GET_RANGE))
    resumed_id = databento_deployment.reexecute_backfill(first.backfill_id)
    resumed = databento_deployment.wait_for_backfill(resumed_id, timeout=BACKFILL_TIMEOUT)
    resumed_requests = gateway.calls(GET_RANGE)[before:]

    assert resumed.status == "COMPLETED_SUCCESS", resumed
    assert get_range_counts(resumed_requests, catalog) == Counter({failed: 1})
    assert len(resumed_requests) == 1
    assert_partitions_recorded(databento_deployment, resumed_id, [failed], catalog)


def test_force_tag_downloads_again(
    databento_deployment: Deployment,
    downloaded: Downloaded,
    served_gateway: tuple[FakeGateway, Path],
    catalog: Catalog,
) -> None:
    gateway, _ = served_gateway
    assert downloaded.result.status == "COMPLETED_SUCCESS", downloaded.result
    forced_names = partitions(MONTHS[:1])
    before = gateway.calls(GET_RANGE)

    forced = launch_and_wait(databento_deployment, forced_names, tags={FORCE_TAG: "true"})
    after = gateway.calls(GET_RANGE)

    assert forced.status == "COMPLETED_SUCCESS", forced
    assert forced.tags.get(FORCE_TAG) == "true"
    counts_before = get_range_counts(before, catalog)
    counts_after = get_range_counts(after, catalog)
    for name in partitions(MONTHS):
        assert counts_after[name] == counts_before[name] + (name in forced_names), name
    with databento_deployment.instance() as instance:
        runs = backfill_runs(instance, forced.backfill_id)
        assert {run.tags.get(FORCE_TAG) for run in runs} == {"true"}
        raw_mats = [
            m
            for m in materializations(instance, [run.run_id for run in runs])
            if m.asset == RAW_ASSET
        ]
    assert sorted(m.partition for m in raw_mats) == sorted(forced_names)
    assert all(m.metadata["forced"] is True for m in raw_mats)
    assert all(m.metadata["source_dbn_cache"] == "forced" for m in raw_mats)
    assert_partitions_recorded(databento_deployment, forced.backfill_id, forced_names, catalog)
