"""The bar frame: column names, dtypes and sorting shared by raw and aggregated bars.

Raw 1-second bars and aggregated bars have the same columns, so one definition serves the
decoder, the aggregation kernel, the storage layer and the validation schemas:
``ts_event`` (UTC, nanoseconds, the bar's open), ``symbol`` (the catalog symbol),
``instrument_id`` (Databento's id, which changes at a futures roll), ``open``/``high``/
``low``/``close`` (float64, exact decimal prices) and ``volume`` (uint64).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

COLUMNS: tuple[str, ...] = (
    "ts_event",
    "symbol",
    "instrument_id",
    "open",
    "high",
    "low",
    "close",
    "volume",
)
PRICE_COLUMNS: tuple[str, ...] = ("open", "high", "low", "close")
TS_DTYPE = pd.DatetimeTZDtype(unit="ns", tz="UTC")
DTYPES: dict[str, object] = {
    "ts_event": TS_DTYPE,
    "symbol": pd.StringDtype(na_value=np.nan),
    "instrument_id": np.dtype("uint32"),
    "open": np.dtype("float64"),
    "high": np.dtype("float64"),
    "low": np.dtype("float64"),
    "close": np.dtype("float64"),
    "volume": np.dtype("uint64"),
}


def empty_bars() -> pd.DataFrame:
    """A zero-row bar frame with the right columns and dtypes."""
    return pd.DataFrame({name: pd.Series([], dtype=DTYPES[name]) for name in COLUMNS})


def make_bars(
    ts_ns: np.ndarray,
    symbol: str,
    instrument_id: np.ndarray,
    opens: np.ndarray,
    highs: np.ndarray,
    lows: np.ndarray,
    closes: np.ndarray,
    volume: np.ndarray,
) -> pd.DataFrame:
    """Build a bar frame from column arrays (timestamps as int64 nanoseconds since epoch)."""
    n = len(ts_ns)
    # One copy of the timestamps is made here; pandas has no public way to adopt them
    # writable, and a read-only column would break in-place edits of the frame.
    naive = pd.DatetimeIndex(np.asarray(ts_ns, dtype="int64").view("datetime64[ns]"))
    ts = naive.tz_localize("UTC")
    return pd.DataFrame(
        {
            "ts_event": ts,
            "symbol": constant_strings(symbol, n),
            "instrument_id": np.asarray(instrument_id, dtype="uint32"),
            "open": np.asarray(opens, dtype="float64"),
            "high": np.asarray(highs, dtype="float64"),
            "low": np.asarray(lows, dtype="float64"),
            "close": np.asarray(closes, dtype="float64"),
            "volume": np.asarray(volume, dtype="uint64"),
        },
        columns=list(COLUMNS),
        copy=False,  # the arrays are fresh; copying (and consolidating) would double memory
    )


def constant_strings(text: str, n: int) -> pd.api.extensions.ExtensionArray:
    """``n`` copies of ``text`` as the ``symbol`` dtype, built from Arrow buffers directly
    (a million-row month costs milliseconds instead of a Python object per row). The buffers
    are those of Arrow's ``large_string``, the type pandas keeps strings in, so nothing is
    converted or copied on the way in."""
    raw = text.encode()
    offsets = np.arange(n + 1, dtype=np.int64) * len(raw)
    strings = pa.LargeStringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(raw * n))
    return pd.array(strings, dtype=DTYPES["symbol"])


def ts_nanos(frame: pd.DataFrame) -> np.ndarray:
    """The ``ts_event`` column as int64 nanoseconds since the Unix epoch (no copy if possible)."""
    return frame["ts_event"].array.asi8 if len(frame) else np.empty(0, dtype="int64")


def bars_before(frame: pd.DataFrame, end_ns: int | None) -> pd.DataFrame:
    """The bars of ``frame`` opening before ``end_ns`` (all of them for None; no copy of a
    frame in time order)."""
    if end_ns is None:
        return frame
    ts = ts_nanos(frame)
    if not in_order(ts):
        return frame[ts < end_ns]
    kept = int(np.searchsorted(ts, end_ns))
    return frame if kept == len(frame) else frame.iloc[:kept]


def sort_bars(frame: pd.DataFrame) -> pd.DataFrame:
    """Sort by ``ts_event`` then ``instrument_id`` with a fresh RangeIndex (no copy when the
    frame is already in that order, which decoded DBN almost always is)."""
    ts, iid = ts_nanos(frame), frame["instrument_id"].to_numpy()
    if in_order(ts, iid, strict=True):
        return frame.reset_index(drop=True)
    return frame.take(np.lexsort((iid, ts))).reset_index(drop=True)


def steps_in_order(ts: np.ndarray, iid: np.ndarray, *, strict: bool) -> np.ndarray:
    """For each row but the first: whether it follows the row before in (``ts``, ``iid``)
    order; with ``strict`` a row equal to the one before is out of order."""
    ids_later = iid[1:] > iid[:-1] if strict else iid[1:] >= iid[:-1]
    return (ts[1:] > ts[:-1]) | ((ts[1:] == ts[:-1]) & ids_later)


def in_order(ts: np.ndarray, iid: np.ndarray | None = None, *, strict: bool = False) -> bool:
    """Whether all rows are in (``ts``, ``iid``) order (``ts`` alone without ``iid``), see
    :func:`steps_in_order`."""
    # Strictly increasing times (the usual month) cost one boolean temporary.
    if bool(np.all(ts[1:] > ts[:-1])):
        return True
    if iid is None:
        return not strict and bool(np.all(ts[1:] >= ts[:-1]))
    return bool(steps_in_order(ts, iid, strict=strict).all())
