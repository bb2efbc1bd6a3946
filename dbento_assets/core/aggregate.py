"""The aggregation kernel: 1-second bars to wider bars, exact and vectorized.

Bins are aligned to the Unix epoch, closed on the left and labelled at their open, like
Databento's own bars; a bar never mixes two ``instrument_id`` (a futures roll) and an empty
bin gives no bar. :func:`aggregate_many` builds each timeframe from the widest finer one.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

from dbento_assets.core.bars import empty_bars, in_order, make_bars, sort_bars, ts_nanos
from dbento_assets.core.timeframes import Timeframe, finest_first


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
    symbol = bars["symbol"].iloc[0]
    if not (bars["symbol"] == symbol).all():
        found = sorted(map(str, bars["symbol"].unique()))
        raise ValueError(f"aggregate_bars takes one symbol at a time, got {found}")
    ts = ts_nanos(bars)
    iid = bars["instrument_id"].to_numpy()
    order = _time_order_per_instrument(ts, iid)
    take = (lambda a: a) if order is None else (lambda a: a[order])
    ts, iid = take(ts), take(iid)
    starts = _group_starts(ts, iid, timeframe)
    lasts = np.append(starts[1:], len(ts)) - 1
    bins = bin_starts(ts[starts], timeframe)

    opens = take(bars["open"].to_numpy())
    closes = take(bars["close"].to_numpy())
    out = make_bars(
        bins,
        str(symbol),
        iid[starts],
        opens[starts],
        np.maximum.reduceat(take(bars["high"].to_numpy()), starts),
        np.minimum.reduceat(take(bars["low"].to_numpy()), starts),
        closes[lasts],
        np.add.reduceat(take(bars["volume"].to_numpy()), starts),
    )
    return sort_bars(out)  # no copy when already in order, the usual case


_BLOCK = 65_536  # rows per block in _group_starts (half a megabyte per temporary)


def _group_starts(ts: np.ndarray, iid: np.ndarray, timeframe: Timeframe) -> np.ndarray:
    """Indices of the rows that open a new output bar: the first row, and every row whose
    bin or instrument differs from the previous row's (rows already in per-instrument time
    order). Computed block by block, so no month-long temporary is made."""
    pieces = []
    for lo in range(0, len(ts), _BLOCK):
        hi = min(lo + _BLOCK, len(ts))
        first = max(lo - 1, 0)  # each block also looks at the row before it
        bins = np.floor_divide(ts[first:hi], timeframe.nanos)
        new = bins[1:] != bins[:-1]
        new |= iid[first + 1 : hi] != iid[first : hi - 1]
        if lo == 0:
            pieces.append(np.zeros(1, dtype=np.intp))
        pieces.append(np.flatnonzero(new) + first + 1)
    return np.concatenate(pieces)


def aggregate_many(
    bars: pd.DataFrame, timeframes: Iterable[Timeframe]
) -> dict[Timeframe, pd.DataFrame]:
    """Aggregate ``bars`` to several timeframes at once, each built from the widest bars
    already built whose timeframe divides it (30s from 15s, 1min from 30s), else from
    ``bars``.

    The result is exactly :func:`aggregate_bars` of ``bars`` for every timeframe: bins are
    epoch-aligned, so a bin of a dividing timeframe lies inside one bin of the wider one, and
    first/max/min/last/sum over whole sub-bins equal those over their seconds. The wider
    timeframes then read a fraction of the rows.
    """
    built: dict[Timeframe, pd.DataFrame] = {}
    for timeframe, finer in built_from(timeframes).items():
        built[timeframe] = aggregate_bars(bars if finer is None else built[finer], timeframe)
    return built


def built_from(timeframes: Iterable[Timeframe]) -> dict[Timeframe, Timeframe | None]:
    """What :func:`aggregate_many` builds each timeframe from, finest first: the widest
    finer one of ``timeframes`` dividing it, or None (the 1-second bars)."""
    plan: dict[Timeframe, Timeframe | None] = {}
    for timeframe in finest_first(timeframes):
        finer = [tf for tf in plan if timeframe.nanos % tf.nanos == 0]
        plan[timeframe] = max(finer, key=lambda tf: tf.nanos) if finer else None
    return plan


def _time_order_per_instrument(ts: np.ndarray, iid: np.ndarray) -> np.ndarray | None:
    """A permutation that groups rows by instrument, in time order within each; None if the
    rows are already like that (one instrument, or instruments that never interleave)."""
    if in_order(ts):
        changes = np.flatnonzero(iid[1:] != iid[:-1])
        # Contiguous runs of instruments (e.g. one roll) need no reordering as long as
        # no instrument comes back after another took over.
        if len(changes) == 0 or len(np.unique(iid[np.append(0, changes + 1)])) == len(changes) + 1:
            return None
        return np.argsort(iid, kind="stable")
    return np.lexsort((ts, iid))
