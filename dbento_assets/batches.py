"""Batched backfills: one run builds the bars of several partitions, each recorded as its own.

A UI backfill starts one run per partition, and each run pays Dagster's start-up again (a
new process, the code location loaded), which dwarfs a month's aggregation. With
``DBENTO_BACKFILL_BATCH=N`` (default 12: a symbol's year) the bars step takes up to N
partitions of one symbol per run (``BackfillPolicy.multi_run``); the downloads stay one
partition per run, each in the ``databento`` pool. In such a step each partition is built by
the same code as in a run of its own, then recorded as its own: its files, its
materializations with their metadata, and its check results, logged with their partition and
the materialization they checked, so each check's Partitions tab shows every partition's own
status. A partition that fails is logged and the others go on; the step then fails naming
it, and its checks show as failed to execute.
"""

from __future__ import annotations

import gc
import json
import re
import warnings
from collections.abc import Callable, Iterable

import pandas as pd
from dagster import (
    AssetCheckEvaluation,
    AssetCheckResult,
    AssetExecutionContext,
    AssetKey,
    AssetMaterialization,
    AssetRecordsFilter,
    BackfillPolicy,
    Failure,
    Output,
    deserialize_value,
)
from pydantic import BaseModel, Field

from dbento_assets.checks import blocking
from dbento_assets.core.settings import read
from dbento_assets.io_managers import BarFileIOManager
from dbento_assets.names import MONTHLY_JOB
from dbento_assets.partitions import Partition

# What builds one partition: the events a run of that partition alone would yield.
Build = Callable[
    [AssetExecutionContext, Partition, pd.DataFrame], Iterable[Output | AssetCheckResult]
]


# Dagster warns, each time it loads a job holding both the raw asset (a month a run: each
# download in a run of its own) and the batched bars, that a backfill of that job runs one
# partition per run. That is what this project wants of its own such jobs (the monthly job,
# the implicit job of every asset, and that of ``dagster asset materialize``); a backfill of
# the bars alone is batched. A user would read it at each start of the UI as something to
# fix. Any other job keeps the warning.
_MIXED_ON_PURPOSE = (MONTHLY_JOB, "__ASSET_JOB", "__ephemeral_asset_job__")
warnings.filterwarnings(
    "ignore",
    message=rf"Asset job ({'|'.join(map(re.escape, _MIXED_ON_PURPOSE))}) materializes assets "
    "with varying BackfillPolicies",
    category=UserWarning,
)


class BatchSettingError(ValueError):
    """``DBENTO_BACKFILL_BATCH`` does not fit (one sentence naming it)."""


class BatchSettings(BaseModel):
    """How many partitions a backfill run builds, read from ``DBENTO_BACKFILL_BATCH``."""

    backfill_batch: int = Field(
        default=12,
        ge=1,
        le=120,
        description="Months of one symbol per backfill run of the bars (1: a run each).",
    )


def backfill_policy() -> BackfillPolicy | None:
    """The bars' backfill policy: ``DBENTO_BACKFILL_BATCH`` partitions per run (None: one)."""
    batch = read(BatchSettings, error=BatchSettingError).backfill_batch
    return BackfillPolicy.multi_run(batch) if batch > 1 else None


def build_each(
    context: AssetExecutionContext,
    io_manager: object,
    source: AssetKey,
    build: Build,
    loaded: pd.DataFrame | None = None,
) -> None:
    """Build every partition of the step's range with ``build``, from its ``source`` file
    (read one month at a time; ``loaded``: the one month of a range of one, already read),
    and record each as a run of its own would."""
    if not isinstance(io_manager, BarFileIOManager):
        raise Failure(
            description="A run over several partitions needs this project's io_manager, "
            "which writes each partition's file.",
            allow_retries=False,
        )
    keys = context.partition_keys
    failed: list[str] = []
    for key in keys:
        partition = Partition.from_key(key)
        judged: dict[AssetKey, object] = {}  # the materialization each asset's checks judged
        try:
            frame = loaded if loaded is not None else io_manager.load(source, partition)
            loaded = None
            for event in build(context, partition, frame):
                _record(context, io_manager, partition, event, judged)
        except Exception as exc:  # this partition fails; the others are still built
            why = exc.description if isinstance(exc, Failure) else f"{type(exc).__name__}: {exc}"
            context.log.error(f"{key} failed: {why}")
            failed.append(f"{key}: {why}")
        frame = None
        gc.collect()  # one month at a time in memory
    if failed:
        raise Failure(
            description=f"{len(failed)} of {len(keys)} partitions of this run failed (the "
            "others are built, each with its own check results):\n" + "\n".join(failed),
            allow_retries=False,
        )


def _record(
    context: AssetExecutionContext,
    io_manager: BarFileIOManager,
    partition: Partition,
    event: Output | AssetCheckResult,
    judged: dict[AssetKey, object],
) -> None:
    """Write and log one event of a partition's build; ``judged`` keeps the materialization
    each asset's checks name (an asset's file comes before its check results)."""
    if isinstance(event, Output):
        key = AssetKey(event.output_name)
        meta = {k: getattr(v, "value", v) for k, v in event.metadata.items()}
        written = io_manager.write(key, partition, event.value, meta, context.log.info)
        # Dagster keeps the locals of the frame that first builds one of its event records
        # for the life of the process (see backfill.warm_up): not this partition's bars.
        del event
        context.log_event(
            AssetMaterialization(asset_key=key, partition=str(partition), metadata=written | meta)
        )
        judged.pop(key, None)
        return
    asset_key = event.asset_key
    if asset_key is None:
        raise ValueError(f"check result {event.check_name} names no asset")
    if asset_key not in judged:
        judged[asset_key] = _checked(context, asset_key, str(partition))
    context.log_event(
        AssetCheckEvaluation(
            asset_key=asset_key,
            check_name=str(event.check_name),
            passed=event.passed,
            metadata=event.metadata,
            severity=event.severity,
            description=event.description,
            blocking=blocking(str(event.check_name)),  # as its spec says
            partition=str(partition),
            target_materialization_data=judged[asset_key],
        )
    )


def _checked(context: AssetExecutionContext, asset_key: AssetKey, partition: str) -> object:
    """The materialization a check of ``asset_key``'s ``partition`` judged: its latest (the
    one just logged, when this run wrote the file). Dagster counts a partition's check result
    as current only when it names that materialization; the class that names it is not
    exported, so it is built from its stored form, which every Dagster instance reads."""
    records = context.instance.fetch_materializations(
        AssetRecordsFilter(asset_key=asset_key, asset_partitions=[partition]), limit=1
    ).records
    if not records:
        return None
    latest = records[0]
    stored = {
        "__class__": "AssetCheckEvaluationTargetMaterializationData",
        "storage_id": latest.storage_id,
        "run_id": latest.run_id,
        "timestamp": latest.timestamp,
    }
    return deserialize_value(json.dumps(stored))
