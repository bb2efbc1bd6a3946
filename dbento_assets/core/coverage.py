"""Which parts of a month DBN data covers, and the completeness gate every month passes.

A window is ``[start_ns, end_ns)`` in UTC nanoseconds. :func:`dbn_coverage` reads the windows
from DBN headers; :func:`require_whole_month` refuses a month its data does not cover (up to
``through`` for a month in progress; days without a session excepted). :class:`VendorMonth`
is Databento's own 1-minute bars of a month with the windows they cover.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from dbento_assets.core.calendars import days_without_session
from dbento_assets.core.catalog import Instrument, calendar_for
from dbento_assets.core.dbn import DbnError, DbnPayload, DecodedMonth, read_metadata, read_records
from dbento_assets.core.months import Month
from dbento_assets.core.source import FetchedMonth, SourceError

Window = tuple[int, int]  # [start_ns, end_ns) in UTC nanoseconds
MINUTE_NS = 60 * 1_000_000_000
UNDEFINED_END = 2**63 - 1  # an end at or above this is DBN's "undefined"


class IncompleteMonth(SourceError):
    """A month whose data is not whole: it is never stored."""

    def __init__(self, message: str, gaps: Sequence[Window] = ()) -> None:
        super().__init__(message)
        self.gaps = list(gaps)  # the uncovered windows, when that is what is wrong


@dataclass
class VendorMonth:
    """Databento's own 1-minute bars of one instrument-month, and what they cover."""

    bars: pd.DataFrame
    covered: list[Window]
    origin: str
    metadata: dict[str, Any] = field(default_factory=dict)  # the download's, for the UI


def dbn_coverage(payloads: Iterable[DbnPayload], month: Month, schema: str) -> list[Window]:
    """The windows of ``month`` that DBN payloads cover, from their metadata headers.

    A payload covers ``[start, end)`` of its request, clipped to the month (an undefined end
    reaches the month's end). A request cut short by its ``limit`` (it holds ``limit``
    records) covers only up to its last record, exclusive; only then are its records read.
    A payload that cannot be opened covers nothing. Windows are merged.
    """
    windows = []
    for payload in payloads:
        try:
            meta = read_metadata(payload, schema)
        except DbnError:
            continue  # decoding has already judged the payload; coverage stays conservative
        start = max(int(meta.start), month.start_ns)
        defined = defined_end(meta.end)
        end = month.end_ns if defined is None else min(defined, month.end_ns)
        if meta.limit:
            records, _ = read_records(payload, schema)
            if len(records) >= int(meta.limit) and len(records):
                end = min(end, int(records["ts_event"].max()))
        if start < end:
            windows.append((start, end))
    return merge_windows(windows)


def defined_end(end: int | None) -> int | None:
    """A DBN header's end in nanoseconds, or None when it is undefined."""
    if end is None or int(end) <= 0 or int(end) >= UNDEFINED_END:
        return None
    return int(end)


def merge_windows(windows: Iterable[Window]) -> list[Window]:
    """Sorted, non-overlapping windows (touching windows joined)."""
    merged: list[Window] = []
    for start, end in sorted(windows):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def intersect_windows(a: Sequence[Window], b: Sequence[Window]) -> list[Window]:
    """The windows covered by both ``a`` and ``b``."""
    out = [(max(s1, s2), min(e1, e2)) for s1, e1 in a for s2, e2 in b]
    return merge_windows(w for w in out if w[0] < w[1])


def whole_minutes(windows: Sequence[Window]) -> pd.DatetimeIndex:
    """The minutes lying entirely inside the windows, as UTC bar opens."""
    parts = [
        np.arange(-(-start // MINUTE_NS) * MINUTE_NS, (end // MINUTE_NS) * MINUTE_NS, MINUTE_NS)
        for start, end in windows
    ]
    ns = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
    return pd.DatetimeIndex(pd.to_datetime(ns, unit="ns", utc=True))


def missing_windows(required: Window, covered: Sequence[Window]) -> list[Window]:
    """The parts of ``required`` that no covered window reaches."""
    gaps, at = [], required[0]
    for start, end in merge_windows(covered):
        if start > at:
            gaps.append((at, min(start, required[1])))
        at = max(at, end)
        if at >= required[1]:
            break
    if at < required[1]:
        gaps.append((at, required[1]))
    return [g for g in gaps if g[0] < g[1]]


def require_whole_month(
    fetched: FetchedMonth,
    decoded: DecodedMonth,
    instrument: Instrument,
    month: Month,
    source: str,
) -> list[Window]:
    """Refuse a month that is not whole; return the windows its DBN headers cover.

    Raises :class:`IncompleteMonth` with one sentence when the month has no record (in every
    source: a wrong symbol or dataset, or a vendor gap), when a DBN header lists the request
    symbol as ``partial`` or ``not_found``, when the headers leave part of the month uncovered
    (a request cut short by its ``limit`` covers only up to its last record; a month in which
    the dataset starts needs covering from there; whole UTC days on which the instrument's
    exchange calendar has no session may be missing), or when the payloads hold another
    number of records than the server announced.
    """
    what = (
        f"{instrument.symbol} {month} ({instrument.request_symbol!r}, {instrument.dataset}, "
        f"source {source})"
    )
    if decoded.records_read == 0 or len(decoded.bars) == 0:
        raise IncompleteMonth(
            f"{what} holds no ohlcv-1s record in the month, and an empty month fails: check "
            f"the [instruments.{instrument.symbol}] entry of the catalog (symbol, stype_in, "
            "dataset) and the data; nothing was stored."
        )
    for payload in fetched.payloads:
        meta = read_metadata(payload)
        for field_name in ("partial", "not_found"):
            listed = {str(s) for s in getattr(meta, field_name, None) or []}
            if instrument.request_symbol in listed:
                raise IncompleteMonth(
                    f"{what}: the DBN header of {_name(payload)} lists "
                    f"{instrument.request_symbol!r} as {field_name.replace('_', ' ')}, so its "
                    "data is not whole; nothing was stored."
                )
    if fetched.announced_records is not None and decoded.records_read != fetched.announced_records:
        raise IncompleteMonth(
            f"{what}: the data holds {decoded.records_read:,} records where "
            f"{fetched.announced_records:,} were announced; nothing was stored."
        )
    covered = dbn_coverage(fetched.payloads, month, "ohlcv-1s")
    start = max(month.start_ns, fetched.available_from_ns or month.start_ns)
    # A month that has not closed yet is judged up to what it covers so far.
    end = month.end_ns if fetched.through_ns is None else min(fetched.through_ns, month.end_ns)
    gaps = missing_windows((start, end), covered)
    calendar = calendar_for(instrument)
    if gaps and calendar is not None:
        # A batch split by day may ship no file for a day without trading (a weekend, a
        # holiday): such whole days are no hole. Any other gap is.
        closed = days_without_session(calendar, month)
        gaps = [part for gap in gaps for part in missing_windows(gap, closed)]
    if gaps:
        shown = ", ".join(f"[{_utc(a)}, {_utc(b)})" for a, b in gaps[:3])
        more = f" and {len(gaps) - 3} more" if len(gaps) > 3 else ""
        raise IncompleteMonth(
            f"{what} is not whole: its DBN headers leave {shown}{more} of the month "
            "uncovered, so a stored month would silently miss bars; add the files (or "
            "download) covering the whole month. Nothing was stored.",
            gaps,
        )
    return covered


def _utc(ns: int) -> str:
    return pd.Timestamp(ns, tz="UTC").isoformat()


def _name(payload: DbnPayload) -> str:
    return "a filtered DBN payload" if isinstance(payload, bytes | bytearray) else str(payload)
