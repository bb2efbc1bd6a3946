"""The monthly and daily schedules, both shipped STOPPED.

``monthly_bars_schedule`` closes the month that just ended (one run per catalog symbol, each
with a run key so a re-evaluated tick never asks twice); ``daily_topup_schedule`` extends the
current month with the newest historical day. Turn them on in the UI (Automation) or with
``dagster schedule start``; the daemon (started by ``dagster dev``) fires them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pandas as pd
from dagster import (
    AssetSelection,
    DefaultScheduleStatus,
    RunRequest,
    ScheduleDefinition,
    ScheduleEvaluationContext,
    SkipReason,
    define_asset_job,
    schedule,
)

from dbento_assets.assets import WHOLE_MONTH_TAG, build_assets
from dbento_assets.core.catalog import Catalog
from dbento_assets.core.months import Month
from dbento_assets.names import MONTHLY_JOB
from dbento_assets.partitions import partition_key

# Dagster 1.13 reads its own deprecated ScheduleDefinition.environment_vars each time it
# describes a schedule to the UI, which printed a DeprecationWarning per schedule at each start
# of the UI; no code of ours sets or reads it.
warnings.filterwarnings(
    "ignore",
    message=r"Property `ScheduleDefinition\.environment_vars` is deprecated",
    category=DeprecationWarning,
)

SCHEDULE_NAME = "monthly_bars_schedule"
# 06:00 UTC on the 2nd: the month's last second became historical at 23:59:59 on the 1st, and
# six more hours let Databento's end-of-day processing finish (a day reads "pending" until then).
CRON = "0 6 2 * *"
TIMEZONE = "UTC"
HISTORICAL_DELAY = timedelta(hours=24)
"""Databento treats the last 24 hours as live data; the historical API serves what is older."""
DAILY_SCHEDULE_NAME = "daily_topup_schedule"
DAILY_CRON = "0 6 * * *"
"""06:00 UTC every day: the previous day has been historical for six hours."""
SCHEDULE_TAG = "dbento/schedule"
MONTH_TAG = "dbento/month"
SYMBOL_TAG = "dbento/symbol"


def build_monthly_job(catalog: Catalog) -> Any:  # define_asset_job's type is not public
    """The job over every asset of the catalog (their asset checks come along)."""
    return define_asset_job(
        MONTHLY_JOB,
        selection=AssetSelection.assets(*build_assets(catalog)),
        description=(
            "Every asset of one symbol-month: download the ohlcv-1s bars, build each timeframe "
            "and run the checks. Started by monthly_bars_schedule, one run per symbol."
        ),
    )


def last_available_month(at: datetime) -> Month:
    """The newest month whose every second Databento's historical API serves at ``at``.

    Data is historical once it is :data:`HISTORICAL_DELAY` old, so this is the month before
    the one that contains ``at - HISTORICAL_DELAY`` (all in UTC).
    """
    if at.tzinfo is None:
        raise ValueError(f"{at!r} has no time zone; pass an aware datetime")
    served_until = pd.Timestamp(at).tz_convert("UTC") - HISTORICAL_DELAY
    return Month(served_until.year, served_until.month).previous()


def monthly_run_requests(catalog: Catalog, at: datetime) -> list[RunRequest] | SkipReason:
    """One run request per catalog symbol for :func:`last_available_month` of ``at``, each
    asking for the month whole: a month Databento is late with fails (nothing bought) rather
    than being stored partial by a green run no schedule would come back to."""
    month = last_available_month(at)
    return _run_requests(catalog, month, SCHEDULE_NAME, month.key, {WHOLE_MONTH_TAG: "true"})


def _run_requests(
    catalog: Catalog,
    month: Month,
    schedule_name: str,
    key: str,
    tags: dict[str, str] | None = None,
) -> list[RunRequest] | SkipReason:
    """One run per catalog symbol for ``month``, keyed ``<key>|<SYMBOL>`` (a tick evaluated
    twice asks once), with ``tags``."""
    if month < catalog.start_month:
        return SkipReason(
            f"{month} is before the catalog's start_month {catalog.start_month}; nothing to do"
        )
    return [
        RunRequest(
            run_key=f"{key}|{symbol}",
            partition_key=partition_key(month, symbol),
            tags={
                SCHEDULE_TAG: schedule_name,
                MONTH_TAG: str(month),
                SYMBOL_TAG: symbol,
                **(tags or {}),
            },
        )
        for symbol in catalog.symbols
    ]


def topup_month(at: datetime) -> Month:
    """The month holding the newest whole day Databento's historical API serves at ``at``:
    the current month, or on the 1st (before its first day is served) the month that just
    ended."""
    if at.tzinfo is None:
        raise ValueError(f"{at!r} has no time zone; pass an aware datetime")
    served_until = (pd.Timestamp(at).tz_convert("UTC") - HISTORICAL_DELAY).floor("D")
    last_day = served_until - pd.Timedelta(days=1)
    return Month(last_day.year, last_day.month)


def daily_run_requests(catalog: Catalog, at: datetime) -> list[RunRequest] | SkipReason:
    """One top-up run per catalog symbol of :func:`topup_month`, keyed by the day."""
    month = topup_month(at)  # refuses a naive ``at``
    day = pd.Timestamp(at).tz_convert("UTC").strftime("%Y-%m-%d")
    return _run_requests(catalog, month, DAILY_SCHEDULE_NAME, f"topup|{day}")


def build_schedules(catalog: Catalog) -> list[ScheduleDefinition]:
    """The monthly and daily schedules of a catalog (both run :func:`build_monthly_job`)."""
    # Not build_schedule_from_partitioned_job: with the current month as a partition
    # (end_offset=1) its tick would target the month in progress, not the one that just closed,
    # and it cannot wait for Databento's 24-hour historical delay.
    job = build_monthly_job(catalog)

    def stopped_schedule(
        name: str,
        cron: str,
        description: str,
        requests: Callable[[Catalog, datetime], list[RunRequest] | SkipReason],
    ) -> ScheduleDefinition:
        @schedule(
            name=name,
            cron_schedule=cron,
            execution_timezone=TIMEZONE,
            job=job,
            default_status=DefaultScheduleStatus.STOPPED,
            description=description,
        )
        def tick(context: ScheduleEvaluationContext) -> list[RunRequest] | SkipReason:
            return requests(catalog, context.scheduled_execution_time or datetime.now(UTC))

        return tick

    return [
        stopped_schedule(
            SCHEDULE_NAME,
            CRON,
            "06:00 UTC on the 2nd: one run per symbol for the month that just closed (Databento "
            "serves a day through its historical API once it is 24 hours old).",
            monthly_run_requests,
        ),
        stopped_schedule(
            DAILY_SCHEDULE_NAME,
            DAILY_CRON,
            "06:00 UTC daily: one run per symbol extending the current month with the days "
            "Databento has published since the last run (only the new part is bought; the "
            "month stays partial until it closes).",
            daily_run_requests,
        ),
    ]
