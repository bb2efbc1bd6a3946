"""What the Dagster instance remembers of this project's runs: read by the report and tests.

Nothing here feeds a step: steps pass data through files (see :mod:`dbento_assets.assets`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from dagster import AssetCheckKey, AssetRecordsFilter, DagsterInstance

from dbento_assets.names import RAW_KEY

COMPLETED = frozenset({"SUCCEEDED", "FAILED"})  # a check record's status once it has run
HISTORY_PAGE = 500


def latest_raw_materialization(instance: DagsterInstance, partition: str) -> Any:
    """The newest materialization record of ``raw_1s_bars`` for one partition, or None."""
    records = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=RAW_KEY, asset_partitions=[partition]), limit=1
    ).records
    return records[0] if records else None


def completed_evaluations(instance: DagsterInstance, key: AssetCheckKey) -> Iterator[Any]:
    """Every completed (passed or failed) execution record of a check, newest first.

    Dagster 1.13 has no public name for the record's status or a partition filter, so the
    instance's check history is read page by page and filtered here.
    """
    cursor = None
    while True:
        page = instance.event_log_storage.get_asset_check_execution_history(
            key, limit=HISTORY_PAGE, cursor=cursor
        )
        yield from (record for record in page if record.status.value in COMPLETED)
        if len(page) < HISTORY_PAGE:
            return
        cursor = page[-1].id


def evaluation_of(record: Any) -> Any:
    """The AssetCheckEvaluation stored in a completed execution record."""
    event = record.event.dagster_event if record.event is not None else None
    return event.event_specific_data if event is not None else None
