"""The bars step over a range of partitions (a batched backfill's run), in process.

Runs carry the range tags a batched backfill gives them (Dagster's daemon path is proven in
test_batched_backfills.py). Each month is read once, and a range of one month is read once
too; the vendor cross-check of a batched run knows when the backfill's own download of the
1-minute bars failed, as a run of raw and bars together does, instead of buying them again.
A month failing in a batched run leaves no check of the others without its result.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from dagster import AssetCheckKey, AssetKey, DagsterEventType, DagsterInstance, Definitions
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus
from dagster._core.storage.event_log.base import PartitionKeyFilter

from dbento_assets.assets import BACKFILL_TAG, build_assets
from dbento_assets.core.catalog import load_catalog
from dbento_assets.core.months import Month
from dbento_assets.core.rules import RULE_VENDOR
from dbento_assets.core.storage import VENDOR_NOTE, BarStore
from dbento_assets.definitions import build_definitions
from dbento_assets.io_managers import io_manager_from_env
from dbento_assets.names import RAW_KEY
from dbento_assets.partitions import partition_key
from dbento_assets.resources import DatabentoResource

JAN, FEB = Month(2024, 1), Month(2024, 2)
ES_JAN, ES_FEB = str(partition_key(JAN, "ES")), str(partition_key(FEB, "ES"))
BARS = [AssetKey(n) for n in ("bars_15s", "bars_30s", "bars_1min")]
RANGE = ("dagster/asset_partition_range_start", "dagster/asset_partition_range_end")


@pytest.fixture
def defs(tmp_path: Path) -> Definitions:
    return demo_definitions(tmp_path)


def demo_definitions(tmp_path: Path, *, vendor: bool = False) -> Definitions:
    resource = DatabentoResource(source="demo", data_dir=str(tmp_path / "data"), demo_activity=0.02)
    if not vendor:
        return build_definitions(databento=resource)
    # With the vendor cross-check declared, as a deployment that buys the 1-minute bars has it.
    return Definitions(
        assets=build_assets(load_catalog(), vendor=True),
        resources={"databento": resource, "io_manager": io_manager_from_env(resource)},
    )


def build(
    defs: Definitions,
    instance: DagsterInstance,
    keys: list[str],
    assets: list[AssetKey],
    tags: dict[str, str] | None = None,
    *,
    ranged: bool = False,
) -> Any:
    """One run of ``assets``: a partition's own, or (``ranged``) a batched backfill's run."""
    job = defs.resolve_implicit_global_asset_job_def()
    if not ranged:
        (key,) = keys
        return job.execute_in_process(
            partition_key=key, instance=instance, asset_selection=assets, tags=tags
        )
    tags = {RANGE[0]: keys[0], RANGE[1]: keys[-1], **(tags or {})}
    return job.execute_in_process(
        instance=instance, asset_selection=assets, tags=tags, raise_on_error=False
    )


def reads_of_raw(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """How many times each raw file is read, counted from now on."""
    counts: Counter[str] = Counter()
    original = BarStore.read_with_identity

    def counted(self: BarStore, path: Any) -> Any:
        if "raw_1s" in str(path):
            counts[Path(str(path)).name] += 1
        return original(self, path)

    monkeypatch.setattr(BarStore, "read_with_identity", counted)
    return counts


@pytest.mark.parametrize("months", [[ES_JAN, ES_FEB], [ES_FEB]], ids=["two", "one"])
def test_each_month_of_a_range_is_read_once_and_recorded_as_its_own(
    defs, fresh_instance, monkeypatch, months
):
    for key in months:
        assert build(defs, fresh_instance, [key], [RAW_KEY]).success
    reads = reads_of_raw(monkeypatch)
    result = build(defs, fresh_instance, months, BARS, ranged=True)

    assert result.success
    assert reads == Counter({f"ES_2024_{k[5:7]}.parquet": 1 for k in months})
    made = {}  # every bars asset's file of every month, in this run
    for asset in BARS:
        for record in fresh_instance.fetch_materializations(asset, limit=10).records:
            materialization = record.asset_materialization
            assert materialization is not None and record.run_id == result.run_id
            made[(asset, materialization.partition)] = record.storage_id
    assert set(made) == {(a, k) for a in BARS for k in months}
    judged = [
        e.dagster_event.event_specific_data
        for e in fresh_instance.all_logs(
            result.run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION
        )
    ]
    for evaluation in judged:  # each names its month and that month's own file
        target = evaluation.target_materialization_data
        assert evaluation.partition in months and target is not None
        assert target.storage_id == made[(evaluation.asset_key, evaluation.partition)]


def test_a_batched_run_knows_its_backfills_vendor_download_failed(tmp_path, fresh_instance):
    # The backfill's raw run left the note its failed 1-minute download leaves: the bars run
    # of the same backfill says so in the cross-check instead of asking for them again.
    defs = demo_definitions(tmp_path, vendor=True)
    tags = {BACKFILL_TAG: "b1"}
    raw = build(defs, fresh_instance, [ES_JAN], [RAW_KEY], tags)
    store = BarStore.at(str(Path(defs.resources["databento"].data_dir)))
    store.write_note("ES", JAN, VENDOR_NOTE, {"run_id": raw.run_id, "error": "HTTP 503"})

    other = build(defs, fresh_instance, [ES_JAN], BARS, {BACKFILL_TAG: "b2"}, ranged=True)
    same = build(defs, fresh_instance, [ES_JAN], BARS, tags, ranged=True)

    def vendor(run_id: str) -> list[str]:
        return [
            str(e.dagster_event.event_specific_data.description)
            for e in fresh_instance.all_logs(
                run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION
            )
            if e.dagster_event.event_specific_data.check_name == RULE_VENDOR
        ]

    assert other.success and vendor(other.run_id) == []  # another backfill: not its failure
    assert same.success
    (said,) = vendor(same.run_id)
    assert "failed in raw_1s_bars of this backfill" in said and "HTTP 503" in said
    assert raw.run_id in said


def test_a_month_failing_in_a_batched_run_leaves_every_check_of_the_others_evaluated(
    defs, fresh_instance, monkeypatch
):
    # A check that a failed run planned and never evaluated shows as "failed to execute" in
    # the UI. The demo cannot compare with Databento's 1-minute bars, so it declares no such
    # check: every check of the good month has its result, in the run that failed.
    for key in (ES_JAN, ES_FEB):
        assert build(defs, fresh_instance, [key], [RAW_KEY]).success
    original = BarStore.read_with_identity

    def february_unreadable(self: BarStore, path: Any) -> Any:
        if "ES_2024_02" in str(path):
            raise OSError("the disk went away")
        return original(self, path)

    monkeypatch.setattr(BarStore, "read_with_identity", february_unreadable)
    result = build(defs, fresh_instance, [ES_JAN, ES_FEB], BARS, ranged=True)

    assert not result.success
    declared = defs.resolve_asset_graph().asset_check_keys
    checks = [k for k in declared if k.asset_key in BARS]
    statuses = {}
    for key in checks:
        for partition in (ES_JAN, ES_FEB):
            (record,) = fresh_instance.event_log_storage.get_asset_check_execution_history(
                key, limit=1, partition_filter=PartitionKeyFilter(key=partition)
            )
            assert record.run_id == result.run_id
            statuses[(key.name, partition)] = record.status
    good = {status for (_, partition), status in statuses.items() if partition == ES_JAN}
    assert good == {AssetCheckExecutionRecordStatus.SUCCEEDED}
    # The failed month's checks stay planned: the UI shows them failed to execute.
    bad = {status for (_, partition), status in statuses.items() if partition == ES_FEB}
    assert bad == {AssetCheckExecutionRecordStatus.PLANNED}
    assert AssetCheckKey(AssetKey("bars_1min"), RULE_VENDOR) not in declared
    assert len(checks) == 3 * 7
