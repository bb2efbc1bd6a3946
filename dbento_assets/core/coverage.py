"""Which parts of a month DBN data covers, and Databento's own 1-minute bars with their reach.

A window is ``[start_ns, end_ns)`` in UTC nanoseconds. :func:`dbn_coverage` reads the windows
DBN payloads cover from their metadata headers (a request's start and end, clipped to the
month; a request cut short by its ``limit`` reaches only its last record), and
:func:`merge_windows`, :func:`intersect_windows` and :func:`whole_minutes` combine them, so the
vendor cross-check compares only minutes both the 1-second and the 1-minute data fully cover.
:class:`VendorMonth` is what the sources hand the cross-check: the vendor's ohlcv-1m bars of
one instrument-month, the windows they cover and where they came from.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from dbento_assets.core.dbn import DbnError, DbnPayload, open_store, read_records
from dbento_assets.core.months import Month

Window = tuple[int, int]  # [start_ns, end_ns) in UTC nanoseconds
MINUTE_NS = 60 * 1_000_000_000
UNDEFINED_END = 2**63 - 1  # an end at or above this is DBN's "undefined"


@dataclass
class VendorMonth:
    """Databento's own 1-minute bars of one instrument-month, and what they cover."""

    bars: pd.DataFrame
    covered: list[Window]
    origin: str


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
            meta = open_store(payload, schema).metadata
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
