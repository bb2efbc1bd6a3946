"""Trading calendars: the sessions of a month and the calendar completeness rule.

The sessions come from ``exchange_calendars`` (the instrument's calendar is
:func:`~dbento_assets.core.catalog.calendar_for`). :func:`check_calendar` warns for a session
without any bar; :func:`days_without_session` tells the completeness gate which days of a
month nothing can trade.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import warnings
from importlib.metadata import version
from pathlib import Path
from typing import Any

import exchange_calendars as xcals
import numpy as np
import pandas as pd
import platformdirs
from upath import UPath

from dbento_assets.core.bars import TS_DTYPE, in_order
from dbento_assets.core.catalog import Instrument, no_calendar_reason
from dbento_assets.core.months import Month
from dbento_assets.core.rendering import SAMPLE_ROWS, few, utc_text
from dbento_assets.core.rules import (
    LISTED,
    NAT_NS,
    RULE_CALENDAR,
    RULE_SEVERITY,
    RuleResult,
    make_result,
    rule,
    ts_column,
)
from dbento_assets.core.storage import write_atomic


def calendar_skipped(instrument: Instrument, month: Month) -> RuleResult:
    """Calendar completeness when no calendar fits the venue: a WARN that says so and why.

    Not a pass: nothing was checked, and the UI must not show it green.
    """
    reason = no_calendar_reason(instrument)
    return RuleResult(
        rule=RULE_CALENDAR,
        passed=False,
        severity=RULE_SEVERITY[RULE_CALENDAR],
        violations=0,
        description=f"Not checked: the trading sessions of {month} were not checked, because "
        f"{reason}.",
        extra={"skipped": True, "skipped_because": reason, "calendar": None},
    )


@functools.lru_cache(maxsize=32)
def _month_sessions(calendar: str, year: int, month_number: int) -> pd.DataFrame:
    """The sessions labelled with a date of the month, with UTC open and close."""
    month = Month(year, month_number)
    first = month.start.tz_localize(None)
    last = month.end.tz_localize(None) - pd.Timedelta(days=1)
    schedule = _cached_sessions(calendar, first, last)
    return schedule.set_axis(schedule.index.strftime("%Y-%m-%d"), axis=0)


def _cached_sessions(calendar: str, first: pd.Timestamp, last: pd.Timestamp) -> pd.DataFrame:
    """:func:`_computed_sessions`, kept in the user's cache folder once computed.

    Loading a calendar takes 0.07 s (CME) to 0.3 s (NYSE) in every new process, and each
    partition's run is one. A file is a few hundred bytes, keyed by the library's version and
    carrying its own digest; one that is unreadable, edited or another's is computed again.
    Only the calendar warning reads it: the completeness gate computes its sessions.
    """
    path = _cache_path(calendar, first, last)
    cached = None if path is None else _read_sessions(path)
    if cached is not None:
        return cached
    schedule = _computed_sessions(calendar, first, last)
    if path is not None:
        _write_sessions(path, schedule)
    return schedule


_CACHE_FORMAT = 1  # raised when what is stored changes


def _cache_path(calendar: str, first: pd.Timestamp, last: pd.Timestamp) -> Path | None:
    """Where these sessions are kept (None: no cache folder, e.g. no home directory)."""
    try:
        folder = Path(platformdirs.user_cache_dir("dbento_assets")).expanduser().absolute()
    except (RuntimeError, OSError, KeyError):
        return None
    kept = f"v{_CACHE_FORMAT}-exchange_calendars-{version('exchange_calendars')}"
    return folder / "calendars" / kept / f"{calendar}_{first:%Y%m%d}_{last:%Y%m%d}.json"


def _digest(name: str, labels: list[str], opens: list[int], closes: list[int]) -> str:
    return hashlib.sha256(json.dumps([name, labels, opens, closes]).encode()).hexdigest()


def _read_sessions(path: Path) -> pd.DataFrame | None:
    try:
        stored = json.loads(path.read_text())
        labels, opens, closes = (stored[k] for k in ("sessions", "open_ns", "close_ns"))
        if stored["sha256"] != _digest(path.name, labels, opens, closes):
            return None  # edited, or another file under this name
        return pd.DataFrame(
            {"open": pd.to_datetime(opens, utc=True), "close": pd.to_datetime(closes, utc=True)},
            index=pd.DatetimeIndex(labels, dtype="datetime64[ns]"),
        ).astype({"open": TS_DTYPE, "close": TS_DTYPE})
    except (OSError, ValueError, TypeError, KeyError):
        return None  # missing, cut short or foreign: computed again


def _write_sessions(path: Path, schedule: pd.DataFrame) -> None:
    labels = schedule.index.strftime("%Y-%m-%d").tolist()
    opens = schedule["open"].array.as_unit("ns").asi8.tolist()
    closes = schedule["close"].array.as_unit("ns").asi8.tolist()
    stored = {
        "sessions": labels,
        "open_ns": opens,
        "close_ns": closes,
        "sha256": _digest(path.name, labels, opens, closes),
    }
    # A cache only: a read-only or full home folder costs time, not correctness.
    with contextlib.suppress(OSError):
        write_atomic(UPath(path), lambda f: f.write(json.dumps(stored).encode()))


def _computed_sessions(calendar: str, first: pd.Timestamp, last: pd.Timestamp) -> pd.DataFrame:
    """The sessions labelled ``first`` to ``last`` (naive dates), with UTC open and close."""
    try:
        with warnings.catch_warnings():
            # exchange_calendars reads Series.values, which pandas 3.1 flags as deprecated.
            warnings.simplefilter("ignore", pd.errors.Pandas4Warning)
            cal = xcals.get_calendar(calendar)
            if cal.first_session > first or cal.last_session < last:
                cal = _bounded_calendar(calendar, first, last)
    except xcals.errors.InvalidCalendarName:
        raise ValueError(f"{calendar!r} is not an exchange_calendars calendar name") from None
    return cal.schedule.loc[first:last, ["open", "close"]]


def days_without_session(calendar: str, month: Month) -> list[tuple[int, int]]:
    """The whole UTC days of ``month`` that no session of ``calendar`` touches, as windows.

    A session touches every UTC day from its open to its close (a CME session labelled
    Monday touches Sunday and Monday), so the days left are weekends and holidays where
    nothing can trade; extended hours around a regular session are on touched days.
    """
    week = pd.Timedelta(days=7)  # sessions of the neighbouring months can reach into this one
    # Computed, never read from the cache: these days excuse missing data in a month.
    schedule = _computed_sessions(
        calendar, month.start.tz_localize(None) - week, month.end.tz_localize(None) + week
    )
    day = 86_400 * 1_000_000_000
    opens = schedule["open"].array.as_unit("ns").asi8 // day
    closes = (schedule["close"].array.as_unit("ns").asi8 - 1) // day
    spans = [np.arange(o, c + 1) for o, c in zip(opens, closes, strict=True)]
    touched = np.unique(np.concatenate(spans)) if spans else np.empty(0, dtype=np.int64)
    days = np.arange(month.start_ns // day, month.end_ns // day)
    free = days[~np.isin(days, touched)]
    return [(int(d) * day, (int(d) + 1) * day) for d in free]


@functools.lru_cache(maxsize=8)
def _bounded_calendar(calendar: str, first: pd.Timestamp, last: pd.Timestamp) -> Any:
    # Months outside the library's default range (about 20 years back, 1 year ahead).
    return xcals.get_calendar(calendar, start=first, end=last)


@rule(RULE_CALENDAR)
def check_calendar(
    bars: pd.DataFrame, month: Month, calendar: str, *, asof: pd.Timestamp | None = None
) -> RuleResult:
    """WARN for each session of ``calendar`` in ``month`` with no bar at all.

    A session's window is ``[open, close)`` in UTC (NYSE: the regular session, so pre- and
    post-market bars do not count). With ``asof``, sessions closing after it are skipped.
    """
    sessions = _month_sessions(calendar, month.year, month.month)
    # A session belongs to the month of its label and is searched only inside the month: the
    # CME session labelled the 1st opens the evening before, in the previous month's file,
    # and the next month's first session, opening in this month, is that month's. So every
    # session is counted in exactly one month.
    opens = np.maximum(sessions["open"].array.as_unit("ns").asi8, month.start_ns)
    closes = np.minimum(sessions["close"].array.as_unit("ns").asi8, month.end_ns)
    upto = ""  # a month stored partial: only the sessions over by then are judged
    if asof is not None:
        over = closes <= pd.Timestamp(asof).tz_convert("UTC").value
        sessions, opens, closes = sessions[over], opens[over], closes[over]
        upto = f" closed by {utc_text(pd.Timestamp(asof).tz_convert('UTC').value)} UTC"
    ts = ts_column(bars)
    ts = ts[ts != NAT_NS]
    if not in_order(ts):
        ts = np.sort(ts)
    counts = np.searchsorted(ts, closes) - np.searchsorted(ts, opens)
    missing = np.flatnonzero(counts == 0)
    labels = sessions.index[missing].tolist()
    sample = pd.DataFrame(
        {
            "session": labels[:SAMPLE_ROWS],
            "open": sessions["open"].iloc[missing[:SAMPLE_ROWS]].to_numpy(),
            "close": sessions["close"].iloc[missing[:SAMPLE_ROWS]].to_numpy(),
        }
    )
    return make_result(
        RULE_CALENDAR,
        len(missing),
        f"Bars were found in all {len(sessions)} {calendar} trading sessions of {month}{upto}.",
        f"{len(missing)} of {len(sessions)} {calendar} trading sessions in {month}{upto} "
        f"without any bar: {few(labels)}.",
        sample,
        {
            "calendar": calendar,
            "sessions": len(sessions),
            "missing_sessions": labels[: LISTED * 2],
        },
    )
