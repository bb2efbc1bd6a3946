"""The no-roll-inside-a-bar rule: a bar holds one contract, and the month's rolls are listed.

A futures roll shows in the bars as a change of ``instrument_id``. Raw 1-second bars must
not hold two contracts in one second; an aggregated bar's interval must hold raw bars of
its own contract only. Both results list the roll dates and events of the raw month.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from dbento_assets.core.bars import in_order
from dbento_assets.core.rendering import SAMPLE_ROWS, few, plural, sample_rows, utc_text
from dbento_assets.core.rules import (
    LISTED,
    NAT_NS,
    RULE_NO_ROLL_IN_BAR,
    RuleResult,
    int_column,
    make_result,
    rule,
    ts_column,
)
from dbento_assets.core.timeframes import Timeframe


def bins_in_raw(raw: pd.DataFrame, timeframe: Timeframe) -> tuple[np.ndarray, np.ndarray]:
    """The distinct (bin open, instrument_id) pairs of the raw bars, sorted by bin then id."""
    ts, iid = ts_column(raw), int_column(raw, "instrument_id")
    valid = ts != NAT_NS
    if not valid.all():
        ts, iid = ts[valid], iid[valid]
    bins = np.floor_divide(ts, timeframe.nanos)
    # Sorted raw bars keep a bin's rows together: the first row of each (bin, id) run is enough.
    first = np.ones(len(bins), dtype=bool)
    np.not_equal(bins[1:], bins[:-1], out=first[1:])
    first[1:] |= iid[1:] != iid[:-1]
    bins, iid = bins[first], iid[first]
    if not in_order(bins, iid, strict=True):  # unsorted raw, or contracts taking turns in a bin
        pairs = pd.DataFrame({"bin": bins, "iid": iid}).drop_duplicates()
        pairs = pairs.sort_values(["bin", "iid"])
        bins, iid = pairs["bin"].to_numpy(), pairs["iid"].to_numpy()
    return bins * timeframe.nanos, iid.astype(np.uint32)


def _roll_events(raw: pd.DataFrame) -> dict[str, Any]:
    """Where the instrument_id changes from one raw bar to the next in time (the rolls)."""
    ts, iid = ts_column(raw), int_column(raw, "instrument_id")
    valid = ts != NAT_NS
    if not valid.all():
        ts, iid = ts[valid], iid[valid]
    if not in_order(ts):
        order = np.argsort(ts, kind="stable")
        ts, iid = ts[order], iid[order]
    at = np.flatnonzero(iid[1:] != iid[:-1]) + 1
    dates = pd.DatetimeIndex(ts[at].view("datetime64[ns]")).strftime("%Y-%m-%d")
    shown = at[:LISTED]
    events = [
        {"at": utc_text(t), "from_instrument_id": int(a), "to_instrument_id": int(b)}
        for t, a, b in zip(ts[shown], iid[shown - 1], iid[shown], strict=True)
    ]
    seen = np.unique(np.concatenate([iid[:1], iid[at]]))  # each id starts a run somewhere
    return {
        "roll_count": len(at),
        "roll_dates": sorted(set(dates))[:LISTED],
        "rolls": events,
        "instrument_ids": [int(i) for i in seen[:LISTED]],
    }


def _roll_text(rolls: dict[str, Any]) -> str:
    dates = rolls["roll_dates"]
    return f"; the contract changes on {few(dates)}" if dates else ""


@rule(RULE_NO_ROLL_IN_BAR)
def check_rolls(raw: pd.DataFrame) -> RuleResult:
    """Raw 1s bars: no second holds bars of two instrument_ids; report the month's rolls.

    ``extra`` lists ``roll_dates`` (UTC dates on which the instrument_id changes from one bar
    to the next), the roll events and the ``instrument_ids`` seen.
    """
    ts, iid = ts_column(raw), int_column(raw, "instrument_id")
    valid = ts != NAT_NS
    st, si = (ts, iid) if valid.all() else (ts[valid], iid[valid])
    if not in_order(st, si):
        order = np.lexsort((si, st))
        st, si = st[order], si[order]
    mixed = np.unique(st[1:][(st[1:] == st[:-1]) & (si[1:] != si[:-1])])
    rolls = _roll_events(raw)
    sample = None
    if len(mixed):
        sample = sample_rows(raw, np.flatnonzero(valid & np.isin(ts, mixed)))
    return make_result(
        RULE_NO_ROLL_IN_BAR,
        len(mixed),
        f"No bar mixes two contracts{_roll_text(rolls)}.",
        f"{plural(len(mixed), 'second')} with bars of two different contracts at once"
        f"{_roll_text(rolls)}.",
        sample,
        {**rolls, "mixed_seconds": len(mixed)},
    )


@rule(RULE_NO_ROLL_IN_BAR)
def check_rolls_aggregated(
    agg: pd.DataFrame,
    raw: pd.DataFrame,
    timeframe: Timeframe,
    built_from: pd.DataFrame | None = None,
    pairs: Callable[[], tuple[np.ndarray, np.ndarray]] | None = None,
) -> RuleResult:
    """Each aggregated bar's interval holds raw bars of exactly one instrument_id: its own.

    A violation is a bar whose bin has raw bars of several instrument_ids (a roll inside the
    bar) or none of its own. ``extra`` carries the raw rolls as in :func:`check_rolls`.
    ``built_from``: finer bars already reconciled with ``raw``, whose (bin, instrument_id)
    pairs are raw's at their timeframe, so raw's at this one come from a fraction of the rows.
    ``pairs``: :func:`bins_in_raw` of those bars, when the caller shares it with reconciliation.
    """
    base = raw if built_from is None else built_from
    bins, ids = bins_in_raw(base, timeframe) if pairs is None else pairs()
    ts, iid = ts_column(agg), int_column(agg, "instrument_id")
    step = timeframe.nanos
    agg_bins = np.floor_divide(ts, step) * step
    if in_order(bins, strict=True) and np.array_equal(bins, agg_bins) and np.array_equal(ids, iid):
        bad = np.zeros(len(ts), dtype=bool)  # the usual case: one bar per bin, one contract each
        several = 0
    else:
        per_bin = pd.Series(bins).value_counts()  # contracts per bin (the pairs are distinct)
        raw_pairs = pd.MultiIndex.from_arrays([bins, ids.astype(np.int64)])
        own = pd.MultiIndex.from_arrays([agg_bins, iid.astype(np.int64)]).isin(raw_pairs)
        ids_in_bin = per_bin.reindex(agg_bins, fill_value=0).to_numpy()
        bad = (ts != NAT_NS) & (~own | (ids_in_bin != 1))
        several = int(np.sum(per_bin.to_numpy() > 1))
    positions = np.flatnonzero(bad)
    rolls = _roll_events(raw)
    sample = None
    if len(positions):
        sample = sample_rows(agg, positions)
        listed = pd.Series(ids.astype(str), index=bins).groupby(level=0).agg(", ".join)
        head = agg_bins[positions[:SAMPLE_ROWS]]
        sample["instrument_ids_in_raw"] = listed.reindex(head).fillna("none").to_numpy()
    return make_result(
        RULE_NO_ROLL_IN_BAR,
        len(positions),
        f"Every {timeframe.label} bar holds a single contract{_roll_text(rolls)}.",
        f"{plural(len(positions), 'bar')} mixing contracts or carrying a contract the 1s bars "
        f"do not have in that interval{_roll_text(rolls)}.",
        sample,
        {**rolls, "bins_with_several_instruments": several},
    )
