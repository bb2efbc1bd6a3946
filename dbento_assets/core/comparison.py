"""Bar-by-bar comparison rules: reconciliation with the raw 1s bars, and Databento's own 1m bars.

Reconciliation recomputes the expected bars with :func:`expected_bars`, a plain pandas
groupby written apart from the aggregation kernel (:mod:`~dbento_assets.core.aggregate`), so
a wrong kernel cannot vouch for its own output. Both rules match bars on (``ts_event``,
``instrument_id``) and compare prices and volume exactly (prices are exact decimals). When the
two frames hold the same bars in the same order, the usual case, the values are compared
column against column; otherwise a pandas outer join finds the missing, unexpected and
repeated bars.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from dbento_assets.core import ahead
from dbento_assets.core.bars import PRICE_COLUMNS, in_order, make_bars
from dbento_assets.core.months import Month
from dbento_assets.core.rendering import SAMPLE_ROWS, plural
from dbento_assets.core.rolls import bins_in_raw
from dbento_assets.core.rules import (
    LISTED,
    RULE_RECONCILED,
    RULE_VENDOR,
    WARN,
    RuleResult,
    Unusable,
    float_column,
    int_column,
    make_result,
    rule,
    ts_column,
)
from dbento_assets.core.timeframes import Timeframe

VALUE_COLUMNS: tuple[str, ...] = (*PRICE_COLUMNS, "volume")
MINUTE_NS = 60_000_000_000


@dataclass
class _Comparison:
    """How ``actual`` differs from ``expected``, bar by bar on (ts_event, instrument_id)."""

    matched: int
    missing: int  # expected bars absent from actual
    unexpected: int  # actual bars absent from expected, repeats included
    repeated: int  # actual bars repeating an earlier (ts_event, instrument_id)
    differing: int  # matched bars with a different open/high/low/close/volume
    sample: pd.DataFrame

    @property
    def problems(self) -> int:
        return self.missing + self.unexpected + self.differing


def _values(frame: pd.DataFrame, name: str) -> np.ndarray:
    return int_column(frame, name) if name == "volume" else float_column(frame, name)


def _take(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``values[rows]`` as objects, None where ``rows`` is -1."""
    out = np.full(len(rows), None, dtype=object)
    hit = rows >= 0
    if hit.any():
        out[hit] = values[rows[hit]].tolist()
    return out


def _pick(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``values[rows]`` as int64, 0 where ``rows`` is -1 (numbers only, for sorting)."""
    if len(values) == 0:
        return np.zeros(len(rows), dtype=np.int64)
    return values[np.maximum(rows, 0)].astype(np.int64)


def _outer_join(
    a_ts: np.ndarray, a_id: np.ndarray, e_ts: np.ndarray, e_id: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rows of actual and expected matched on (ts, id): (matched actual rows, their expected
    rows, actual-only rows, expected-only rows, actual rows repeating an earlier pair).

    A repeated actual pair is matched by its first row only; a repeated expected pair adds
    nothing.
    """
    actual = pd.DataFrame({"ts": a_ts, "iid": a_id.astype(np.int64)})
    expected = pd.DataFrame({"ts": e_ts, "iid": e_id.astype(np.int64)})
    repeat = actual.duplicated().to_numpy()
    joined = pd.merge(
        actual[~repeat].reset_index(names="a"),
        expected.drop_duplicates().reset_index(names="e"),
        on=["ts", "iid"],
        how="outer",
        indicator=True,
    )
    side = joined["_merge"].to_numpy()

    def rows(column: str, where: str) -> np.ndarray:
        return joined[column].to_numpy()[side == where].astype(np.int64)

    both = rows("a", "both"), rows("e", "both")
    return *both, rows("a", "left_only"), rows("e", "right_only"), np.flatnonzero(repeat)


def _compare(
    actual: pd.DataFrame, expected: pd.DataFrame, other: str, words: dict[str, str]
) -> _Comparison:
    """Compare two bar frames exactly (prices are exact decimals, volumes integers).

    Bars are matched on (``ts_event``, ``instrument_id``). ``other`` suffixes the expected
    values in the sample (``open_<other>``); ``words`` labels the problems ``missing``,
    ``unexpected``, ``repeated`` and ``differs``.
    """
    a_ts, a_id = ts_column(actual), int_column(actual, "instrument_id")
    e_ts, e_id = ts_column(expected), int_column(expected, "instrument_id")
    a_val = {c: _values(actual, c) for c in VALUE_COLUMNS}
    e_val = {c: _values(expected, c) for c in VALUE_COLUMNS}
    none = np.empty(0, dtype=np.int64)
    if (
        np.array_equal(a_ts, e_ts)
        and np.array_equal(a_id, e_id)
        and in_order(e_ts, e_id, strict=True)
    ):  # the usual case: the same bars in the same order, compare column against column
        a_rows = e_rows = np.arange(len(a_ts))
        a_only = e_only = a_repeat = none
    else:
        a_rows, e_rows, a_only, e_only, a_repeat = _outer_join(a_ts, a_id, e_ts, e_id)
    differs = {c: a_val[c][a_rows] != e_val[c][e_rows] for c in VALUE_COLUMNS}
    d_pos = np.flatnonzero(np.logical_or.reduce(list(differs.values()))) if len(a_rows) else none

    # Every problem as (kind, actual row or -1, expected row or -1); show the earliest ones.
    kind = np.repeat([0, 1, 2, 3], [len(d_pos), len(e_only), len(a_only), len(a_repeat)])
    a_ref = np.concatenate([a_rows[d_pos], np.full(len(e_only), -1), a_only, a_repeat])
    e_ref = np.concatenate([e_rows[d_pos], e_only, np.full(len(a_only) + len(a_repeat), -1)])
    when = np.where(a_ref >= 0, _pick(a_ts, a_ref), _pick(e_ts, e_ref))
    who = np.where(a_ref >= 0, _pick(a_id, a_ref), _pick(e_id, e_ref))
    head = np.lexsort((kind, who, when))[:SAMPLE_ROWS]
    labels = np.array([words[k] for k in ("differs", "missing", "unexpected", "repeated")])
    problem = labels[kind[head]].astype(object)
    is_diff = kind[head] == 0
    fields = np.full(len(head), "", dtype=object)
    for c in VALUE_COLUMNS:  # five columns, not rows
        hit = np.zeros(len(head), dtype=bool)
        hit[is_diff] = differs[c][d_pos[head[is_diff]]]
        fields = np.where(hit, fields + np.where(fields == "", " ", ", ") + c, fields)
    sample = pd.DataFrame(
        {
            "ts_event": pd.to_datetime(when[head], unit="ns", utc=True),
            "instrument_id": who[head],
            "problem": problem + fields,
        }
    )
    for c in VALUE_COLUMNS:
        sample[c] = _take(a_val[c], a_ref[head])
        sample[f"{c}_{other}"] = _take(e_val[c], e_ref[head])
    return _Comparison(
        matched=len(a_rows),
        missing=len(e_only),
        unexpected=len(a_only) + len(a_repeat),
        repeated=len(a_repeat),
        differing=len(d_pos),
        sample=sample,
    )


def _volume_per_instrument(frame: pd.DataFrame) -> pd.Series:
    """Exact (integer) total volume per instrument_id."""
    volume, iid = int_column(frame, "volume"), int_column(frame, "instrument_id")
    # Summed run by run of one instrument first (a month has a handful of runs), so the
    # groupby sees a few rows instead of a month of them.
    starts = np.flatnonzero(np.concatenate([[True], iid[1:] != iid[:-1]])) if len(iid) else []
    runs = np.add.reduceat(volume, starts) if len(iid) else volume
    return pd.Series(runs, index=iid[starts]).groupby(level=0).sum()


def expected_bars(source: pd.DataFrame, timeframe: Timeframe) -> pd.DataFrame:
    """``source`` bars (1s, or a finer timeframe dividing ``timeframe``) aggregated to
    ``timeframe`` by a pandas groupby on (epoch-aligned bin, instrument_id): open first, high
    max, low min, close last, volume summed, sorted by bin then instrument_id.

    Deliberately not :func:`~dbento_assets.core.aggregate.aggregate_bars`: reconciliation
    compares that kernel's output with this independent computation.
    """
    return _expected(_source_arrays(source), timeframe)


_SourceArrays = tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], str]


def _source_arrays(source: pd.DataFrame) -> _SourceArrays:
    """What :func:`_expected` reads of ``source``: timestamps, instrument ids, the value
    columns and the symbol, as arrays (no copy)."""
    ts = ts_column(source)
    iid = int_column(source, "instrument_id")
    values = {c: source[c].to_numpy() for c in VALUE_COLUMNS}
    symbol = str(source["symbol"].iloc[0]) if len(source) else ""
    return ts, iid, values, symbol


def _expected(arrays: _SourceArrays, timeframe: Timeframe) -> pd.DataFrame:
    """:func:`expected_bars` of the arrays of a frame, in a frame of its own."""
    ts, iid, values, symbol = arrays
    if not in_order(ts):  # first and last follow the row order within each group
        order = np.argsort(ts, kind="stable")
        ts, iid = ts[order], iid[order]
        values = {c: v[order] for c, v in values.items()}
    source = pd.DataFrame(values, copy=False)
    bins = np.floor_divide(ts, timeframe.nanos)
    # One int64 key (bin, then id in the low 32 bits) groups faster and leaner than two;
    # bins beyond 32 bits (a 1s timeframe far from 1970) take the two-key path.
    packed = len(bins) == 0 or (bins.min() >= -(2**31) and bins.max() < 2**31)
    if packed:
        bins <<= 32  # in place: a month's temporaries are 10 MB each
        bins |= iid
    keys = bins if packed else [bins, iid]
    bars = source.groupby(keys, sort=True).agg(
        open=("open", "first"),
        high=("high", "max"),
        low=("low", "min"),
        close=("close", "last"),
        volume=("volume", "sum"),
    )
    if packed:
        key = bars.index.to_numpy()
        starts, ids = (key >> 32) * timeframe.nanos, key & 0xFFFFFFFF
    else:
        starts = bars.index.get_level_values(0).to_numpy() * timeframe.nanos
        ids = bars.index.get_level_values(1).to_numpy()
    columns = [bars[c].to_numpy() for c in VALUE_COLUMNS]
    return make_bars(starts, symbol, ids.astype(np.uint32), *columns)


def expect_ahead(source: pd.DataFrame, timeframe: Timeframe) -> None:
    """Begin :func:`expected_bars` of ``source`` at ``timeframe`` in the worker thread of
    :mod:`.ahead`; :func:`check_reconciliation` of bars built from this very ``source`` takes
    it instead of computing it (a pandas groupby over a month of 1s bars, which releases the
    GIL in its loops: it runs beside the aggregation kernel). A ``source`` it cannot read is
    left to the rule, which says why."""
    with contextlib.suppress(Unusable, ValueError, TypeError, KeyError):
        ahead.begin(
            source,
            (_EXPECTED, timeframe.nanos),
            _source_arrays,
            functools.partial(_expected, timeframe=timeframe),
        )


_EXPECTED = "expected bars"  # the kind of work expect_ahead begins


@rule(RULE_RECONCILED)
def check_reconciliation(
    agg: pd.DataFrame,
    raw: pd.DataFrame,
    timeframe: Timeframe,
    built_from: pd.DataFrame | None = None,
    pairs: Callable[[], tuple[np.ndarray, np.ndarray]] | None = None,
) -> RuleResult:
    """Prove an aggregated frame from the raw 1s frame it was built from.

    Every bar must equal its independent recomputation (:func:`expected_bars`) from raw, or
    from ``built_from``: the finer bars it was built from, themselves already reconciled with
    raw (30s from 15s: the 15s bars equal raw's, so 30s bars equal to the 15s bars' are
    raw's too, for a fraction of the rows). The volume per instrument_id and the number of
    non-empty (bin, instrument_id) pairs are computed directly from the same bars (raw, or
    ``built_from``), independently of both computations. ``violations`` counts the wrong
    bars, or the wrong totals when only a total disagrees. ``pairs``: :func:`bins_in_raw` of
    those bars at this timeframe, when the caller shares it with the roll check.
    """
    source = raw if built_from is None else built_from
    begun = ahead.take(source, (_EXPECTED, timeframe.nanos))
    try:
        expected = expected_bars(source, timeframe) if begun is None else begun.result()
    except (ValueError, TypeError, KeyError) as exc:
        raise Unusable(f"the 1-second bars cannot be aggregated: {exc}") from exc
    diff = _compare(
        agg,
        expected,
        "expected",
        {
            "missing": "missing (the 1s bars have trades in this interval)",
            "unexpected": "not backed by any 1s bar",
            "repeated": "repeated",
            "differs": "differs from the 1s bars in",
        },
    )
    # From the finer bars when given: proven equal to raw's (bars, count and totals), and a
    # fifteenth of its rows.
    bins, _ = bins_in_raw(source, timeframe) if pairs is None else pairs()
    raw_totals = _volume_per_instrument(source)
    agg_totals = _volume_per_instrument(agg)
    ids = raw_totals.index.union(agg_totals.index)
    raw_totals = raw_totals.reindex(ids, fill_value=0)
    agg_totals = agg_totals.reindex(ids, fill_value=0)
    wrong_totals = ids[raw_totals.to_numpy() != agg_totals.to_numpy()]
    volume_mismatch = {  # one entry per instrument, not per bar
        str(i): {"aggregated": int(agg_totals[i]), "raw": int(raw_totals[i])}
        for i in wrong_totals[:LISTED]
    }
    count_ok = len(agg) == len(bins)
    violations = diff.problems or (len(wrong_totals) + (0 if count_ok else 1))
    passed = diff.problems == 0 and len(wrong_totals) == 0 and count_ok
    parts = [
        f"{diff.missing} missing" if diff.missing else "",
        f"{diff.unexpected} not backed by the 1s bars" if diff.unexpected else "",
        f"{diff.differing} with different values" if diff.differing else "",
    ]
    totals_text = (
        f"; total volume differs for {plural(len(wrong_totals), 'instrument')}"
        if len(wrong_totals)
        else ""
    )
    count_text = "" if count_ok else f"; {len(agg)} bars for {len(bins)} non-empty intervals"
    fail = (
        f"{plural(diff.problems, 'bar')} not matching the 1-second bars they come from "
        f"({', '.join(p for p in parts if p)}){totals_text}{count_text}."
        if diff.problems
        else f"Every bar matches its recomputation, yet the totals disagree{totals_text}"
        f"{count_text}: the aggregation itself is suspect."
    )
    return make_result(
        RULE_RECONCILED,
        violations,
        f"All {len(agg)} bars equal their recomputation from the 1-second bars; volume totals "
        "and bar counts agree.",
        fail,
        diff.sample,
        {
            "bars": len(agg),
            "non_empty_bins": len(bins),
            "missing_bars": diff.missing,
            "unexpected_bars": diff.unexpected,
            "repeated_bars": diff.repeated,
            "differing_bars": diff.differing,
            "volume_mismatch": volume_mismatch,
        },
        passed=passed,
    )


def _minutes(covered: Iterable[pd.Timestamp | str | int] | pd.DatetimeIndex) -> np.ndarray:
    """Covered minutes as sorted int64 UTC nanoseconds; refuse times that are not whole minutes."""
    index = pd.DatetimeIndex(list(covered) if not isinstance(covered, pd.Index) else covered)
    index = index.tz_localize("UTC") if index.tz is None else index.tz_convert("UTC")
    ns = index.as_unit("ns").asi8
    if np.any(ns % MINUTE_NS):
        bad = index[ns % MINUTE_NS != 0][:3]
        raise ValueError(f"covered_minutes must be whole minutes (the bar opens), got {list(bad)}")
    return np.unique(ns)


def _restrict(frame: pd.DataFrame, month: Month | None, minutes: np.ndarray | None) -> pd.DataFrame:
    """The rows of ``frame`` inside ``month`` and inside the given minutes (when given)."""
    ts = ts_column(frame)
    keep = np.ones(len(ts), dtype=bool)
    if month is not None:
        keep &= (ts >= month.start_ns) & (ts < month.end_ns)
    if minutes is not None:
        keep &= np.isin(np.floor_divide(ts, MINUTE_NS) * MINUTE_NS, minutes)
    return frame if keep.all() else frame.iloc[np.flatnonzero(keep)]


@rule(RULE_VENDOR)
def check_vendor(
    bars_1min: pd.DataFrame,
    vendor_1m: pd.DataFrame,
    *,
    covered_minutes: Iterable[pd.Timestamp | str | int] | pd.DatetimeIndex | None = None,
    month: Month | None = None,
) -> RuleResult:
    """``bars_1min`` must equal Databento's own ohlcv-1m bar for bar (exact prices, volume).

    Both frames are first restricted to ``month`` and to ``covered_minutes`` (the minutes whose
    1-second data is known complete), when given. Inside that range "no trade, no bar" holds
    at both vendors, so a minute on one side only is a violation either way.
    """
    minutes = _minutes(covered_minutes) if covered_minutes is not None else None
    ours, theirs = _restrict(bars_1min, month, minutes), _restrict(vendor_1m, month, minutes)
    window = f" in {month}" if month is not None else ""
    diff = _compare(
        ours,
        theirs,
        "databento",
        {
            "missing": "missing here (Databento has this bar)",
            "unexpected": "Databento has no bar for this minute",
            "repeated": "repeated",
            "differs": "differs from Databento in",
        },
    )
    scope = "all minutes" if minutes is None else plural(len(minutes), "covered minute")
    parts = [
        f"{diff.missing} missing here" if diff.missing else "",
        f"{diff.unexpected} absent at Databento" if diff.unexpected else "",
        f"{diff.differing} with different values" if diff.differing else "",
    ]
    return make_result(
        RULE_VENDOR,
        diff.problems,
        f"All {diff.matched} one-minute bars{window} equal Databento's own 1-minute bars "
        f"({scope} compared).",
        f"{plural(diff.problems, 'one-minute bar')}{window} disagreeing with Databento's own "
        f"1-minute bars ({', '.join(p for p in parts if p)}; {scope} compared).",
        diff.sample,
        {
            "compared": diff.matched,
            "our_bars": len(ours),
            "vendor_bars": len(theirs),
            "missing_here": diff.missing,
            "missing_at_vendor": diff.unexpected,
            "differing": diff.differing,
            "covered_minutes": None if minutes is None else len(minutes),
        },
    )


def vendor_skipped(reason: str) -> RuleResult:
    """The vendor cross-check with nothing to compare with: a failed WARN saying ``reason``.

    A green pass would claim a comparison that did not happen; a WARN never blocks the data.
    """
    return RuleResult(
        rule=RULE_VENDOR,
        passed=False,
        severity=WARN,
        violations=0,
        description=f"Not compared with Databento's own 1-minute bars: {reason}.",
        extra={"skipped": True, "skipped_because": reason},
    )
