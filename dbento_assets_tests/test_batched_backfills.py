"""End to end: a batched backfill (``DBENTO_BACKFILL_BATCH``) keeps each partition's results.

A real webserver and daemon (:mod:`dbento_assets_tests.deployment`) run the backfills the UI's
Materialize dialog launches (``launchPartitionBackfill``), with the Databento source against
the fake HTTPS gateway (:mod:`dbento_assets_tests.gateway`) and the vendor cross-check on, so
every check of every asset is evaluated. With a batch of 3, a rebuild of the bars of 2
symbols x 3 months takes 2 runs, one per symbol, instead of 6. The proof is what the UI
shows: each check's per-partition status (its Partitions tab, read through the same GraphQL
field) and each partition's materializations. One partition failing inside a batch (its raw
file edited under its identity) fails alone: the others are built, current and passed, its
own checks show as failed to execute, and its bar files are not touched; once its raw file is
right again, re-executing the failed run, then the backfill from failure, builds it. Each
month is bought once (the gateway's request count), whatever runs again.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dbento_assets.core.months import Month
from dbento_assets.core.storage import BarStore
from dbento_assets.core.timeframes import parse_timeframe
from dbento_assets.names import BARS_PREFIX, RAW_ASSET
from dbento_assets.partitions import Partition, partition_key
from dbento_assets_tests.deployment import (
    Deployment,
    DeploymentConfig,
    backfill_runs,
    check_evaluations,
    gateway_env,
    materializations,
    partition_of,
    running_deployment,
)
from dbento_assets_tests.gateway import GET_RANGE, TEST_KEY, FakeGateway

pytestmark = pytest.mark.e2e

SYMBOLS = ("ES", "SPY")
MONTHS = (Month(2024, 1), Month(2024, 2), Month(2024, 3))
NAMES = [str(partition_key(m, s)) for s in SYMBOLS for m in MONTHS]
BATCH = 3
TIMEOUT = 300.0
RANGE_START = "dagster/asset_partition_range_start"


@pytest.fixture(scope="module")
def deployment(
    tmp_path_factory: pytest.TempPathFactory, served_gateway: tuple[FakeGateway, Path]
) -> Iterator[Deployment]:
    fake, ca_file = served_gateway
    workdir = tmp_path_factory.mktemp("e2e-batched")
    env = {
        **gateway_env(fake.url, ca_file, TEST_KEY),
        "DBENTO_DATA_DIR": str(workdir / "data"),
        "DBENTO_RETRY_ATTEMPTS": "1",
        "DBENTO_VENDOR_CHECK": "true",  # so every check of every asset is evaluated
        "DBENTO_BACKFILL_BATCH": str(BATCH),
    }
    config = DeploymentConfig(max_concurrent_runs=2)
    with running_deployment(workdir, env, config=config, backfill_interval_seconds=1.0) as running:
        yield running


def bought(fake: FakeGateway) -> Counter[tuple[str, str, str]]:
    """Answered ``get_range`` requests per (symbols, schema, start)."""
    return Counter(
        (c.fields["symbols"], c.fields["schema"], c.fields["start"])
        for c in fake.calls(GET_RANGE)
        if c.fault is None
    )


def bar_assets(deployment: Deployment) -> list[str]:
    keys = [key.to_user_string() for key in deployment.asset_keys()]
    return [name for name in keys if name.startswith(BARS_PREFIX)]


def shown(deployment: Deployment, assets: list[str]) -> dict[tuple[str, str, str], str]:
    """What each check's Partitions tab shows for the assets."""
    return {
        key: status
        for key, status in deployment.check_partition_statuses().items()
        if key[0] in assets
    }


def every_check(deployment: Deployment, assets: list[str], status: str) -> dict:
    return {
        (asset, check, name): status
        for asset, checks in deployment.asset_checks().items()
        if asset in assets
        for check in checks
        for name in NAMES
    }


def digests(root: Path, names: list[str]) -> dict[str, str]:
    """SHA-256 of every bar file of the partitions."""
    found = {}
    for name in names:
        parsed = Partition.from_key(name)
        pattern = f"aggregated/*/{parsed.symbol}_{parsed.month.year}_{parsed.month.month:02d}_*"
        for path in sorted(root.glob(pattern)):
            found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def edit_keeping_footer(path: Path) -> bytes:
    """One high set below its low, the footer (identity and proof) kept; the old bytes."""
    before = path.read_bytes()
    table = pq.read_table(path)
    high = table.column("high").to_numpy().copy()
    row = len(high) // 2
    high[row] = np.float64(table.column("low")[row].as_py()) - 0.25
    edited = table.set_column(table.schema.get_field_index("high"), "high", pa.array(high))
    pq.write_table(edited.replace_schema_metadata(table.schema.metadata), path)
    return before


def test_a_batched_backfill_keeps_each_partitions_results_and_fails_one_partition_alone(
    deployment: Deployment, served_gateway: tuple[FakeGateway, Path]
) -> None:
    fake, _ = served_gateway
    bars = bar_assets(deployment)
    root = deployment.home.parent / "data"
    store = BarStore.at(root)

    # Every asset: raw one run per partition, the bars in batches; all built and checked.
    first = deployment.run_backfill(NAMES, timeout=TIMEOUT)
    assert first.status == "COMPLETED_SUCCESS", first
    paid = bought(fake)  # each month's 1-second data and 1-minute bars, once
    assert len(paid) == 2 * len(NAMES) and set(paid.values()) == {1}, paid
    assert shown(deployment, [RAW_ASSET, *bars]) == every_check(
        deployment, [RAW_ASSET, *bars], "SUCCEEDED"
    )

    # A rebuild of the bars (a timeframe added, say): one run per symbol, not per partition.
    rebuilt = deployment.run_backfill(NAMES, bars, timeout=TIMEOUT)
    assert rebuilt.status == "COMPLETED_SUCCESS", rebuilt
    with deployment.instance() as instance:
        runs = backfill_runs(instance, rebuilt.backfill_id)
        mats = materializations(instance, [r.run_id for r in runs])
        evaluations = check_evaluations(instance, [r.run_id for r in runs])
    assert len(runs) == len(NAMES) // BATCH and all(RANGE_START in r.tags for r in runs)
    assert all(partition_of(r) is None for r in runs)
    assert Counter((m.asset, m.partition) for m in mats) == Counter(
        {(a, p): 1 for a in bars for p in NAMES}
    )
    for mat in mats:  # each partition's own file and metadata
        parsed = Partition.from_key(str(mat.partition))
        timeframe = parse_timeframe(mat.asset.removeprefix(BARS_PREFIX))
        path = store.aggregated_path(parsed.symbol, parsed.month, timeframe)
        assert mat.metadata["path"] == str(path.path)
        assert mat.metadata["dagster/row_count"] == len(store.read(path)) > 0
    made_in = {(m.asset, m.partition): m.run_id for m in mats}
    for evaluation in evaluations:  # each result names its partition, in that partition's run
        assert evaluation.run_id == made_in[(evaluation.asset, evaluation.partition)]
    assert shown(deployment, bars) == every_check(deployment, bars, "SUCCEEDED")

    # One raw file edited under its identity: its partition fails inside its batch.
    broken = str(partition_key(Month(2024, 2), "ES"))
    raw_path = Path(store.raw_path("ES", Month(2024, 2)).path)
    others = [name for name in NAMES if name != broken]
    kept = digests(root, NAMES)
    original = edit_keeping_footer(raw_path)
    failing = deployment.run_backfill(NAMES, bars, timeout=TIMEOUT)

    assert failing.status in ("COMPLETED_FAILED", "FAILED"), failing
    for asset in bars:
        counts = failing.asset_counts[asset]
        assert (counts["materialized"], counts["failed"]) == (len(others), 1), counts
    with deployment.instance() as instance:
        runs = backfill_runs(instance, failing.backfill_id)
        mats = materializations(instance, [r.run_id for r in runs])
    assert {m.partition for m in mats} == set(others)
    statuses = shown(deployment, bars)
    expected = every_check(deployment, bars, "SUCCEEDED")
    expected.update({k: "EXECUTION_FAILED" for k in expected if k[2] == broken})
    assert statuses == expected
    # Nothing lost: the failed partition's files untouched, the others rewritten the same.
    assert digests(root, NAMES) == kept

    # Its raw file right again: the failed run re-executed (the run page's Re-execute > From
    # failure) builds its batch again; the backfill re-executed, the failed partition alone.
    raw_path.write_bytes(original)
    (failed_run,) = [r for r in runs if r.status.value == "FAILURE"]
    again = deployment.reexecute_run(failed_run.run_id)
    assert deployment.wait_for_run(again, TIMEOUT) == "SUCCESS", deployment.log_tail()
    assert shown(deployment, bars) == every_check(deployment, bars, "SUCCEEDED")
    resumed_id = deployment.reexecute_backfill(failing.backfill_id)
    resumed = deployment.wait_for_backfill(resumed_id, timeout=TIMEOUT)
    assert resumed.status == "COMPLETED_SUCCESS", resumed
    with deployment.instance() as instance:
        runs = backfill_runs(instance, resumed_id)
        mats = materializations(instance, [r.run_id for r in runs])
    assert {m.partition for m in mats} == {broken}
    assert shown(deployment, bars) == every_check(deployment, bars, "SUCCEEDED")
    assert digests(root, NAMES) == kept
    assert bought(fake) == paid  # nothing bought again, whatever ran again
