"""What the Dagster instance remembers of this project's runs: read by the report and tests.

Nothing here feeds a step: steps pass data through files (see :mod:`dbento_assets.assets`);
the raw step only asks where its month's download was recorded, so as not to buy it again.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from dagster import (
    AssetCheckKey,
    AssetKey,
    AssetRecordsFilter,
    DagsterInstance,
)

COMPLETED = frozenset({"SUCCEEDED", "FAILED"})  # a check record's status once it has run
HISTORY_PAGE = 500


def latest_materialization(instance: DagsterInstance, key: AssetKey, partition: str) -> Any:
    """The newest materialization record of an asset for one partition, or None."""
    records = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=key, asset_partitions=[partition]), limit=1
    ).records
    return records[0] if records else None


def execution_records(instance: DagsterInstance, key: AssetCheckKey) -> Iterator[Any]:
    """Every execution record of a check (planned, passed, failed...), newest first.

    Dagster 1.13 has no public name for the record's status or a partition filter, so the
    instance's check history is read page by page and filtered by the callers.
    """
    cursor = None
    while True:
        page = instance.event_log_storage.get_asset_check_execution_history(
            key, limit=HISTORY_PAGE, cursor=cursor
        )
        yield from page
        if len(page) < HISTORY_PAGE:
            return
        cursor = page[-1].id


def completed_evaluations(instance: DagsterInstance, key: AssetCheckKey) -> Iterator[Any]:
    """Every completed (passed or failed) execution record of a check, newest first."""
    return (r for r in execution_records(instance, key) if r.status.value in COMPLETED)


def skipped_on_the_file_it_wrote(instance: DagsterInstance, record: Any) -> bool:
    """Whether a check record that never completed (planned, skipped) belongs to the run
    that wrote the asset partition's current file: no older result speaks for that file.
    Other runs (one that failed, one that ran checks alone) changed no file: older results
    still do."""
    if record.status.value in COMPLETED or record.partition is None:
        return False
    latest = latest_materialization(instance, record.key.asset_key, record.partition)
    return latest is not None and latest.run_id == record.run_id


def evaluation_of(record: Any) -> Any:
    """The AssetCheckEvaluation stored in a completed execution record."""
    event = record.event.dagster_event if record.event is not None else None
    return event.event_specific_data if event is not None else None
