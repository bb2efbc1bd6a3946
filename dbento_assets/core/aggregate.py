"""The aggregation kernel: 1-second bars to wider bars, exact and vectorized.

Bins are aligned to the Unix epoch (so at midnight UTC for every timeframe, since timeframes
divide a day), closed on the left and labelled with the bin's open, like Databento's own bars.
Each output bar belongs to one ``instrument_id``, so a bar never mixes two futures contracts
around a roll. Open is the first 1s open, high the max, low the min, close the last close,
volume the sum; an empty bin produces no bar. The work is a handful of numpy passes over the
columns (a stable sort only when the input needs one, then ``reduceat`` per group), with no
Python loop over rows.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from dbento_assets.core.bars import empty_bars, make_bars, sort_bars, ts_nanos
from dbento_assets.core.timeframes import Timeframe


def bin_starts(ts_ns: np.ndarray, timeframe: Timeframe) -> np.ndarray:
    """The epoch-aligned open of the bin holding each timestamp (int64 nanoseconds)."""
    step = timeframe.nanos
    return np.floor_divide(ts_ns, step) * step


def aggregate_bars(bars: pd.DataFrame, timeframe: Timeframe) -> pd.DataFrame:
    """Aggregate a bar frame (see :mod:`dbento_assets.core.bars`) to ``timeframe``.

    The input may hold several instruments and need not be sorted; the output is sorted by
    ``ts_event`` then ``instrument_id`` and keeps the input's ``symbol``.
    """
    if len(bars) == 0:
        return empty_bars()
    symbols = bars["symbol"].unique()
    if len(symbols) != 1:
        raise ValueError(f"aggregate_bars takes one symbol at a time, got {list(symbols)}")
    ts = ts_nanos(bars)
    iid = bars["instrument_id"].to_numpy()
    order = _time_order_per_instrument(ts, iid)
    take = (lambda a: a) if order is None else (lambda a: a[order])
    ts, iid = take(ts), take(iid)
    bins = bin_starts(ts, timeframe)

    new_group = np.empty(len(ts), dtype=bool)
    new_group[0] = True
    np.not_equal(bins[1:], bins[:-1], out=new_group[1:])
    new_group[1:] |= iid[1:] != iid[:-1]
    starts = np.flatnonzero(new_group)
    lasts = np.append(starts[1:], len(ts)) - 1

    opens = take(bars["open"].to_numpy())
    closes = take(bars["close"].to_numpy())
    out = make_bars(
        bins[starts],
        str(symbols[0]),
        iid[starts],
        opens[starts],
        np.maximum.reduceat(take(bars["high"].to_numpy()), starts),
        np.minimum.reduceat(take(bars["low"].to_numpy()), starts),
        closes[lasts],
        np.add.reduceat(take(bars["volume"].to_numpy()), starts),
    )
    return out if _is_sorted(bins[starts], iid[starts]) else sort_bars(out)


def _is_sorted(ts: np.ndarray, iid: np.ndarray) -> bool:
    """True when rows are ordered by ``ts`` then ``iid``."""
    dts = np.diff(ts)
    return bool(np.all((dts > 0) | ((dts == 0) & (iid[1:] > iid[:-1]))))


def _time_order_per_instrument(ts: np.ndarray, iid: np.ndarray) -> np.ndarray | None:
    """A permutation that groups rows by instrument, in time order within each; None if the
    rows are already like that (one instrument, or instruments that never interleave)."""
    time_sorted = bool(np.all(ts[1:] >= ts[:-1]))
    if time_sorted:
        changes = np.flatnonzero(iid[1:] != iid[:-1])
        # Contiguous runs of instruments (e.g. one roll) need no reordering as long as
        # no instrument comes back after another took over.
        if len(changes) == 0 or len(np.unique(iid[np.append(0, changes + 1)])) == len(changes) + 1:
            return None
        return np.argsort(iid, kind="stable")
    return np.lexsort((ts, iid))
