"""Validation rules for bar frames: Pandera schemas plus one vectorized function per rule.

Every rule takes bar frames (see :mod:`dbento_assets.core.bars`) and returns a
:class:`RuleResult`: pass or fail, its severity (``ERROR`` blocks the data, ``WARN`` only
informs), how many violations, one plain-English line for a non-technical reader, the first
violating rows as a small table and rule-specific facts (roll dates, missing sessions, ...)
in ``extra`` as plain JSON-friendly values. The rules are: the schema (columns, dtypes, no
nulls, finite prices > 0, integer volume >= 0, UTC timestamps), strictly increasing timestamps,
OHLC consistency, bars inside the partition's month, alignment of every bar to its timeframe
(raw bars: the whole second), reconciliation of an aggregated frame against the raw 1s frame,
no roll inside a bar (with the month's roll dates), trading-calendar completeness (WARN, on
the instrument's own exchange calendar, skipped with a WARN saying why when none fits) and the
cross-check of ``bars_1min`` against Databento's own ohlcv-1m. :func:`run_raw_rules` and
:func:`run_aggregated_rules` run them all. Nothing loops over rows in Python: each rule is a
few numpy passes (plus Pandera's own column checks), so a 1.2M-row month takes well under a
second. This module imports no Dagster; the asset checks wrap it.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, ParamSpec

import exchange_calendars as xcals
import numpy as np
import pandas as pd
import pandera.pandas as pa
from pandera.typing import Series

from dbento_assets.core.aggregate import aggregate_bars
from dbento_assets.core.bars import PRICE_COLUMNS
from dbento_assets.core.catalog import Instrument, calendar_for, no_calendar_reason
from dbento_assets.core.months import Month
from dbento_assets.core.timeframes import Timeframe

Severity = Literal["ERROR", "WARN"]
ERROR: Severity = "ERROR"
WARN: Severity = "WARN"

# Rule names: stable identifiers (valid Dagster check names), in the order the runners use.
RULE_SCHEMA = "schema"
RULE_TIME_ORDER = "timestamps_increasing"
RULE_OHLC = "ohlc_consistent"
RULE_IN_MONTH = "inside_month"
RULE_ALIGNED = "aligned_to_timeframe"
RULE_RECONCILED = "reconciles_with_raw"
RULE_NO_ROLL_IN_BAR = "no_roll_inside_bar"
RULE_CALENDAR = "calendar_complete"
RULE_VENDOR = "matches_vendor_1m"

RULE_SEVERITY: dict[str, Severity] = {
    RULE_SCHEMA: ERROR,
    RULE_TIME_ORDER: ERROR,
    RULE_OHLC: ERROR,
    RULE_IN_MONTH: ERROR,
    RULE_ALIGNED: ERROR,
    RULE_RECONCILED: ERROR,
    RULE_NO_ROLL_IN_BAR: ERROR,
    RULE_CALENDAR: WARN,
    RULE_VENDOR: ERROR,
}
RULE_TITLES: dict[str, str] = {
    RULE_SCHEMA: "Columns, types and value ranges",
    RULE_TIME_ORDER: "Timestamps strictly increasing, no duplicates",
    RULE_OHLC: "High/low consistent with open/close",
    RULE_IN_MONTH: "Every bar inside the month",
    RULE_ALIGNED: "Bars start on timeframe boundaries",
    RULE_RECONCILED: "Aggregated bars equal their recomputation from the 1s bars",
    RULE_NO_ROLL_IN_BAR: "No contract roll inside a bar",
    RULE_CALENDAR: "A bar in every trading session",
    RULE_VENDOR: "1-minute bars equal Databento's own 1-minute bars",
}
RAW_RULES: tuple[str, ...] = (
    RULE_SCHEMA,
    RULE_TIME_ORDER,
    RULE_OHLC,
    RULE_IN_MONTH,
    RULE_ALIGNED,  # on the 1-second grid: a raw bar opens on a whole second
    RULE_NO_ROLL_IN_BAR,
    RULE_CALENDAR,
)
AGGREGATED_RULES: tuple[str, ...] = (
    RULE_SCHEMA,
    RULE_TIME_ORDER,
    RULE_OHLC,
    RULE_IN_MONTH,
    RULE_ALIGNED,
    RULE_RECONCILED,
    RULE_NO_ROLL_IN_BAR,
)

RAW_BLOCKING_RULES: tuple[str, ...] = tuple(r for r in RAW_RULES if RULE_SEVERITY[r] == ERROR)
"""The raw rules whose failure stops the data (every raw rule except calendar completeness)."""

ONE_SECOND = Timeframe(1)  # the raw bars' own timeframe, for the alignment rule
SAMPLE_ROWS = 10  # rows kept in RuleResult.sample
LISTED = 50  # entries kept in a list inside RuleResult.extra (roll events, sessions)
VALUE_COLUMNS: tuple[str, ...] = (*PRICE_COLUMNS, "volume")
MINUTE_NS = 60_000_000_000
_NAT = np.iinfo(np.int64).min  # how NaT looks as int64 nanoseconds


# --------------------------------------------------------------------------- schemas


class RawBarsSchema(pa.DataFrameModel):
    """The raw 1-second bar frame: exactly the columns and dtypes of ``core.bars.DTYPES``."""

    ts_event: Series[pd.DatetimeTZDtype] = pa.Field(
        nullable=False, dtype_kwargs={"unit": "ns", "tz": "UTC"}
    )
    symbol: Series[pd.StringDtype] = pa.Field(nullable=False)
    instrument_id: Series[np.uint32] = pa.Field(nullable=False)
    open: Series[np.float64] = pa.Field(nullable=False, gt=0)
    high: Series[np.float64] = pa.Field(nullable=False, gt=0)
    low: Series[np.float64] = pa.Field(nullable=False, gt=0)
    close: Series[np.float64] = pa.Field(nullable=False, gt=0)
    volume: Series[np.uint64] = pa.Field(nullable=False, ge=0)

    @pa.check("open", "high", "low", "close", name="finite")
    @classmethod
    def _prices_finite(cls, series: pd.Series) -> pd.Series:
        # Nulls are dropped before checks run (they are reported as not_nullable instead).
        return pd.Series(~np.isinf(series.to_numpy(dtype="float64")), index=series.index)

    @pa.check("symbol", name="text_dtype")
    @classmethod
    def _symbol_is_text(cls, series: pd.Series) -> bool:
        # Pandera's own string dtype test also accepts object columns; the bar frame is `str`.
        return isinstance(series.dtype, pd.StringDtype)

    class Config:
        strict = True  # no extra columns
        coerce = False  # report wrong dtypes, never fix them silently


class AggregatedBarsSchema(RawBarsSchema):
    """Aggregated bars have the same columns as raw bars (alignment is its own rule)."""


# --------------------------------------------------------------------------- results


@dataclass(eq=False)
class RuleResult:
    """The outcome of one rule on one frame."""

    rule: str
    passed: bool
    severity: Severity
    violations: int
    description: str
    sample: pd.DataFrame = field(default_factory=pd.DataFrame)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def title(self) -> str:
        return RULE_TITLES.get(self.rule, self.rule)

    @property
    def blocking(self) -> bool:
        """True when this failed result must stop the data (a failed ERROR rule)."""
        return not self.passed and self.severity == ERROR

    def sample_markdown(self, max_rows: int = SAMPLE_ROWS) -> str:
        """The first violating rows as a small Markdown table ("" when there are none)."""
        return frame_markdown(self.sample, max_rows, total=self.violations)


def frame_markdown(frame: pd.DataFrame, max_rows: int = SAMPLE_ROWS, total: int = 0) -> str:
    """A small DataFrame as a Markdown table, timestamps in UTC, "" for an empty frame.

    When ``total`` exceeds the rows shown, a last line says "first N of TOTAL".
    """
    if frame is None or len(frame) == 0 or len(frame.columns) == 0:
        return ""
    head = frame.head(max_rows)
    cells = [[_cell(v) for v in head[c].tolist()] for c in head.columns]
    lines = [
        "| " + " | ".join(_escape(str(c)) for c in head.columns) + " |",
        "|" + "|".join("---" for _ in head.columns) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in zip(*cells, strict=True)]
    total = max(total, len(frame))
    if total > len(head):
        lines.append(f"\n(first {len(head)} of {total})")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NaT:
        return ""
    if isinstance(value, pd.Timestamp):
        if value.tzinfo is not None:
            value = value.tz_convert("UTC")
        text = value.strftime("%Y-%m-%d %H:%M:%S")
        if value.microsecond or value.nanosecond:
            text = value.isoformat()
        return text
    return _escape(str(value))


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


class _Unusable(Exception):
    """A column a rule needs is missing or of a type it cannot read (the schema rule says why)."""


_P = ParamSpec("_P")


def _rule(name: str) -> Callable[[Callable[_P, RuleResult]], Callable[_P, RuleResult]]:
    """Turn an unreadable frame into a failed "not checked" result instead of an exception."""

    def wrap(func: Callable[_P, RuleResult]) -> Callable[_P, RuleResult]:
        @functools.wraps(func)
        def run(*args: _P.args, **kwargs: _P.kwargs) -> RuleResult:
            try:
                return func(*args, **kwargs)
            except _Unusable as exc:
                return RuleResult(
                    rule=name,
                    passed=False,
                    severity=RULE_SEVERITY[name],
                    violations=0,
                    description=f"Not checked: {exc} (see the schema check).",
                    extra={"not_checked": str(exc)},
                )

        return run

    return wrap


def _result(
    name: str,
    violations: int,
    ok_text: str,
    fail_text: str,
    sample: pd.DataFrame | None = None,
    extra: dict[str, Any] | None = None,
    passed: bool | None = None,
) -> RuleResult:
    ok = violations == 0 if passed is None else passed
    return RuleResult(
        rule=name,
        passed=ok,
        severity=RULE_SEVERITY[name],
        violations=int(violations),
        description=ok_text if ok else fail_text,
        sample=(sample if sample is not None and not ok else pd.DataFrame()),
        extra=extra or {},
    )


# --------------------------------------------------------------------------- column access


def _ts(frame: pd.DataFrame, name: str = "ts_event") -> np.ndarray:
    """A timezone-aware timestamp column as int64 UTC nanoseconds (NaT -> int64 min)."""
    if name not in frame.columns:
        raise _Unusable(f"column {name} is missing")
    column = frame[name]
    if not isinstance(column.dtype, pd.DatetimeTZDtype):
        raise _Unusable(f"column {name} is {column.dtype}, not a timezone-aware timestamp")
    return column.array.as_unit("ns").asi8


def _ints(frame: pd.DataFrame, name: str) -> np.ndarray:
    if name not in frame.columns:
        raise _Unusable(f"column {name} is missing")
    column = frame[name]
    if column.dtype.kind not in "iu":
        raise _Unusable(f"column {name} is {column.dtype}, not integers")
    try:
        return column.to_numpy()
    except (ValueError, TypeError):  # a nullable integer column holding NA
        raise _Unusable(f"column {name} has missing values") from None


def _floats(frame: pd.DataFrame, name: str) -> np.ndarray:
    if name not in frame.columns:
        raise _Unusable(f"column {name} is missing")
    column = frame[name]
    if column.dtype.kind not in "fiu":
        raise _Unusable(f"column {name} is {column.dtype}, not numbers")
    return column.to_numpy(dtype="float64", na_value=np.nan)


def _values(frame: pd.DataFrame, name: str) -> np.ndarray:
    return _ints(frame, name) if name == "volume" else _floats(frame, name)


def _rows(frame: pd.DataFrame, positions: np.ndarray, limit: int = SAMPLE_ROWS) -> pd.DataFrame:
    """The first ``limit`` rows at ``positions`` with their row number in a ``row`` column."""
    picked = frame.iloc[np.asarray(positions[:limit], dtype=np.int64)]
    return picked.reset_index(names="row")


def _ts_text(ns: int) -> str:
    return pd.Timestamp(int(ns), tz="UTC").strftime("%Y-%m-%d %H:%M:%S")


def _few(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else (plural or word + 's')}"


# --------------------------------------------------------------------------- rules

_CHECK_WORDS: dict[str, str] = {
    "not_nullable": "missing values",
    "greater_than(0)": "not above 0",
    "greater_than_or_equal_to(0)": "below 0",
    "finite": "infinite values",
    "text_dtype": "not text",
    "column_in_dataframe": "column missing",
    "column_in_schema": "unexpected column",
}


def check_schema(frame: pd.DataFrame, *, aggregated: bool = False) -> RuleResult:
    """Columns, dtypes, no nulls, finite prices > 0, volume >= 0, ``ts_event`` in UTC.

    Pandera runs lazily, so every failure is counted: one violation per failing value, plus
    one per wrong dtype, missing column or unexpected column.
    """
    schema = AggregatedBarsSchema if aggregated else RawBarsSchema
    try:
        schema.validate(frame, lazy=True, inplace=True)
    except pa.errors.SchemaErrors as exc:
        cases = exc.failure_cases
    else:
        return _result(
            RULE_SCHEMA,
            0,
            "All columns are present with the right types, nothing is missing, prices are "
            "positive and finite, volumes are whole numbers and times are in UTC.",
            "",
        )
    kinds = cases.groupby(["column", "check"], sort=False, dropna=False).size()
    parts = [
        _describe_check(str(column), str(check), count, cases)
        for (column, check), count in kinds.items()
    ]
    sample = cases[["column", "check", "failure_case", "index"]].rename(columns={"index": "row"})
    return _result(
        RULE_SCHEMA,
        len(cases),
        "",
        f"{_plural(len(cases), 'problem')} with columns, types or values: {_few(parts)}.",
        sample.head(SAMPLE_ROWS).reset_index(drop=True),
        {"failures": {f"{c}: {k}": int(n) for (c, k), n in kinds.items()}},
    )


def _describe_check(column: str, check: str, count: int, cases: pd.DataFrame) -> str:
    """One failing (column, check) pair in words, e.g. ``open not above 0 (3)``."""
    found = cases.loc[(cases["column"] == column) & (cases["check"] == check), "failure_case"]
    if check in ("column_in_dataframe", "column_in_schema"):  # reported against the schema
        names = ", ".join(str(v) for v in found.head(5))
        return f"{_CHECK_WORDS[check]} {names}"
    if check.startswith("dtype("):
        expected = check[len("dtype(") : -1].strip("'")
        return f"{column} has type {found.iloc[0]} instead of {expected}"
    return f"{column} {_CHECK_WORDS.get(check, check)} ({count})"


@_rule(RULE_TIME_ORDER)
def check_time_order(frame: pd.DataFrame) -> RuleResult:
    """Rows strictly increasing by (``ts_event``, ``instrument_id``): no duplicate, no disorder.

    This is the frame's sort contract, and it implies that each instrument's timestamps are
    strictly increasing. A violation is a row that is not after the row before it; rows with a
    missing timestamp are left to the schema rule.
    """
    ts, iid = _ts(frame), _ints(frame, "instrument_id")
    keep = np.flatnonzero(ts != _NAT) if (ts == _NAT).any() else None
    if keep is not None:
        ts, iid = ts[keep], iid[keep]
    same = ts[1:] == ts[:-1]
    bad = ~((ts[1:] > ts[:-1]) | (same & (iid[1:] > iid[:-1])))
    positions = np.flatnonzero(bad) + 1
    if len(positions) == 0:
        return _result(
            RULE_TIME_ORDER,
            0,
            "Every bar comes after the previous one; no bar is repeated.",
            "",
        )
    order = np.lexsort((iid, ts))
    duplicates = int(
        np.sum((ts[order][1:] == ts[order][:-1]) & (iid[order][1:] == iid[order][:-1]))
    )
    backwards = int(np.sum(bad & ~(same & (iid[1:] == iid[:-1]))))
    rows = positions if keep is None else keep[positions]
    previous = positions - 1 if keep is None else keep[positions - 1]
    sample = _rows(frame, rows)
    sample.insert(2, "previous_ts_event", frame["ts_event"].iloc[previous[:SAMPLE_ROWS]].array)
    return _result(
        RULE_TIME_ORDER,
        len(positions),
        "",
        f"{_plural(len(positions), 'bar')} out of time order or repeating an earlier bar "
        f"({duplicates} repeated, {backwards} going back in time).",
        sample,
        {"duplicates": duplicates, "out_of_order": backwards},
    )


_OHLC_WORDS = {
    "high_below_open_or_close": "high below open or close",
    "low_above_open_or_close": "low above open or close",
    "high_below_low": "high below low",
}


@_rule(RULE_OHLC)
def check_ohlc(frame: pd.DataFrame) -> RuleResult:
    """high >= max(open, close), low <= min(open, close), high >= low.

    Rows with a missing or infinite price are left to the schema rule.
    """
    o, h, low, c = (_floats(frame, name) for name in PRICE_COLUMNS)
    finite = np.isfinite(o) & np.isfinite(h) & np.isfinite(low) & np.isfinite(c)
    high_bad = finite & (h < np.maximum(o, c))
    low_bad = finite & (low > np.minimum(o, c))
    cross = finite & (h < low)
    positions = np.flatnonzero(high_bad | low_bad | cross)
    counts = {
        "high_below_open_or_close": int(high_bad.sum()),
        "low_above_open_or_close": int(low_bad.sum()),
        "high_below_low": int(cross.sum()),
    }
    sample = None
    if len(positions):
        sample = _rows(frame, positions)
        head = positions[:SAMPLE_ROWS]
        words = [
            np.where(high_bad[head], "high below open/close; ", ""),
            np.where(low_bad[head], "low above open/close; ", ""),
            np.where(cross[head], "high below low; ", ""),
        ]
        problem = np.char.add(np.char.add(words[0], words[1]), words[2])
        sample["problem"] = np.char.rstrip(problem, "; ")
    return _result(
        RULE_OHLC,
        len(positions),
        "In every bar the high is the highest price and the low the lowest.",
        f"{_plural(len(positions), 'bar')} with impossible prices: "
        + ", ".join(f"{_OHLC_WORDS[k]} ({n})" for k, n in counts.items() if n)
        + ".",
        sample,
        counts,
    )


@_rule(RULE_IN_MONTH)
def check_inside_month(frame: pd.DataFrame, month: Month) -> RuleResult:
    """Every ``ts_event`` in ``[month.start, month.end)`` (missing timestamps: schema rule)."""
    ts = _ts(frame)
    outside = (ts != _NAT) & ((ts < month.start_ns) | (ts >= month.end_ns))
    positions = np.flatnonzero(outside)
    before = int(np.sum(outside & (ts < month.start_ns)))
    window = f"{_ts_text(month.start_ns)} to {_ts_text(month.end_ns)} UTC"
    return _result(
        RULE_IN_MONTH,
        len(positions),
        f"Every bar lies inside {month} ({window}).",
        f"{_plural(len(positions), 'bar')} outside {month} ({window}): "
        f"{before} before it, {len(positions) - before} after it.",
        _rows(frame, positions) if len(positions) else None,
        {"before_month": before, "after_month": len(positions) - before},
    )


@_rule(RULE_ALIGNED)
def check_alignment(frame: pd.DataFrame, timeframe: Timeframe) -> RuleResult:
    """Every bar opens on a multiple of the timeframe since the Unix epoch (UTC)."""
    ts = _ts(frame)
    offset = np.remainder(ts, timeframe.nanos)
    positions = np.flatnonzero((offset != 0) & (ts != _NAT))
    sample = None
    if len(positions):
        sample = _rows(frame, positions)
        sample["past_boundary"] = pd.to_timedelta(offset[positions[:SAMPLE_ROWS]], unit="ns")
    return _result(
        RULE_ALIGNED,
        len(positions),
        f"Every bar starts exactly on a {timeframe.label} boundary.",
        f"{_plural(len(positions), 'bar')} not starting on a {timeframe.label} boundary.",
        sample,
    )


# --------------------------------------------------------------------------- pair matching


def _pair_keys(*pairs: tuple[np.ndarray, np.ndarray]) -> list[np.ndarray]:
    """One int64 key per (timestamp, instrument_id), ordered like the pairs, shared by all sets.

    Keys compare exactly when the pairs are equal, and sort like (timestamp, instrument_id).
    """
    ts_codes, _ = pd.factorize(np.concatenate([p[0] for p in pairs]), sort=True)
    id_codes, ids = pd.factorize(np.concatenate([p[1] for p in pairs]), sort=True)
    keys = ts_codes.astype(np.int64) * max(len(ids), 1) + id_codes
    bounds = np.cumsum([len(p[0]) for p in pairs])[:-1]
    return np.split(keys, bounds)


def _find(sorted_keys: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Index of each wanted key in a sorted, duplicate-free key array, or -1 when absent."""
    if len(sorted_keys) == 0:
        return np.full(len(wanted), -1, dtype=np.int64)
    pos = np.minimum(np.searchsorted(sorted_keys, wanted), len(sorted_keys) - 1)
    return np.where(sorted_keys[pos] == wanted, pos, -1)


def _first_of_each(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows in key order keeping the first of equal keys, rows repeating an earlier key)."""
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    repeat = np.zeros(len(keys), dtype=bool)
    if len(keys) > 1:
        np.equal(ordered[1:], ordered[:-1], out=repeat[1:])
    return order[~repeat], order[repeat]


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    """Sorted distinct values; no sort at all when ``values`` is already strictly increasing."""
    if len(values) < 2 or bool(np.all(values[1:] > values[:-1])):
        return values
    ordered = np.sort(values)
    return ordered[np.r_[True, ordered[1:] != ordered[:-1]]]


def _runs(ordered: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct values, run lengths) of a sorted array."""
    if len(ordered) == 0:
        return ordered, np.empty(0, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    return ordered[starts], np.diff(np.append(starts, len(ordered)))


def _id_codes(iid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct instrument_ids, code of each row): cheap for the usual one or two ids."""
    if len(iid) == 0:
        return iid, np.zeros(0, dtype=np.int64)
    run_starts = np.flatnonzero(np.r_[True, iid[1:] != iid[:-1]])
    run_ids = iid[run_starts]
    ids = np.unique(run_ids)
    if len(ids) == 1:
        return ids, np.zeros(len(iid), dtype=np.int64)
    run_lengths = np.diff(np.append(run_starts, len(iid)))
    return ids, np.repeat(np.searchsorted(ids, run_ids), run_lengths)


def _bins_in_raw(raw: pd.DataFrame, timeframe: Timeframe) -> tuple[np.ndarray, np.ndarray]:
    """The distinct (bin open, instrument_id) pairs of the raw bars, sorted by bin then id."""
    ts, iid = _ts(raw), _ints(raw, "instrument_id")
    valid = ts != _NAT
    if not valid.all():
        ts, iid = ts[valid], iid[valid]
    if len(ts) == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.uint32)
    step = timeframe.nanos
    ids, codes = _id_codes(iid)
    key = np.floor_divide(ts, step)
    if len(ids) > 1:
        key = key * len(ids) + codes
    change = np.ones(len(key), dtype=bool)
    np.not_equal(key[1:], key[:-1], out=change[1:])  # sorted raw: a bin's rows are adjacent
    unique = _sorted_unique(key[change])
    return (unique // len(ids)) * step, ids[unique % len(ids)].astype(np.uint32)


# --------------------------------------------------------------------------- rolls


def _roll_events(raw: pd.DataFrame) -> dict[str, Any]:
    """Where the instrument_id changes from one raw bar to the next in time (the rolls)."""
    ts, iid = _ts(raw), _ints(raw, "instrument_id")
    valid = ts != _NAT
    if not valid.all():
        ts, iid = ts[valid], iid[valid]
    if len(ts) > 1 and not bool(np.all(ts[1:] >= ts[:-1])):
        order = np.argsort(ts, kind="stable")
        ts, iid = ts[order], iid[order]
    at = np.flatnonzero(iid[1:] != iid[:-1]) + 1
    dates = pd.DatetimeIndex(ts[at].view("datetime64[ns]")).strftime("%Y-%m-%d")
    shown = at[:LISTED]
    events = [
        {"at": _ts_text(t), "from_instrument_id": int(a), "to_instrument_id": int(b)}
        for t, a, b in zip(ts[shown], iid[shown - 1], iid[shown], strict=True)
    ]
    return {
        "roll_count": len(at),
        "roll_dates": sorted(set(dates))[:LISTED],
        "rolls": events,
        "instrument_ids": [int(i) for i in _id_codes(iid)[0][:LISTED]],
    }


def _roll_text(rolls: dict[str, Any]) -> str:
    dates = rolls["roll_dates"]
    return f"; the contract changes on {_few(dates)}" if dates else ""


@_rule(RULE_NO_ROLL_IN_BAR)
def check_rolls(raw: pd.DataFrame) -> RuleResult:
    """Raw 1s bars: no second holds bars of two instrument_ids; report the month's rolls.

    A violation is a second with bars of several instrument_ids (that second's bar would mix
    contracts). ``extra`` lists ``roll_dates`` (UTC dates on which the instrument_id changes
    from one bar to the next), the roll events (``at``, ``from_instrument_id``,
    ``to_instrument_id``) and the ``instrument_ids`` seen.
    """
    ts, iid = _ts(raw), _ints(raw, "instrument_id")
    valid = ts != _NAT
    st, si = (ts, iid) if valid.all() else (ts[valid], iid[valid])
    if not _sorted_by_time(st, si):
        order = np.lexsort((si, st))
        st, si = st[order], si[order]
    mixed = _sorted_unique(st[1:][(st[1:] == st[:-1]) & (si[1:] != si[:-1])])
    rolls = _roll_events(raw)
    sample = None
    if len(mixed):
        sample = _rows(raw, np.flatnonzero(valid & np.isin(ts, mixed)))
    return _result(
        RULE_NO_ROLL_IN_BAR,
        len(mixed),
        f"No bar mixes two contracts{_roll_text(rolls)}.",
        f"{_plural(len(mixed), 'second')} with bars of two different contracts at once"
        f"{_roll_text(rolls)}.",
        sample,
        {**rolls, "mixed_seconds": len(mixed)},
    )


@_rule(RULE_NO_ROLL_IN_BAR)
def check_rolls_aggregated(
    agg: pd.DataFrame, raw: pd.DataFrame, timeframe: Timeframe
) -> RuleResult:
    """Each aggregated bar's interval holds raw bars of exactly one instrument_id: its own.

    A violation is an aggregated bar whose ``timeframe`` bin (the one containing its open) has
    raw bars of several instrument_ids (a roll inside the bar) or none of its own
    instrument_id. ``extra`` carries the raw frame's rolls as in :func:`check_rolls`.
    """
    bins, ids = _bins_in_raw(raw, timeframe)
    ts, iid = _ts(agg), _ints(agg, "instrument_id")
    step = timeframe.nanos
    agg_bins = np.floor_divide(ts, step) * step
    if np.array_equal(bins, agg_bins) and np.array_equal(ids, iid):
        own = np.ones(len(ts), dtype=bool)  # the usual case: one bar per raw (bin, id) pair
    else:
        raw_keys, agg_keys = _pair_keys((bins, ids), (agg_bins, iid))
        own = _find(raw_keys, agg_keys) >= 0
    unique_bins, per_bin = _runs(bins)
    where = _find(unique_bins, agg_bins)
    ids_in_bin = np.zeros(len(agg_bins), dtype=np.int64)
    ids_in_bin[where >= 0] = per_bin[where[where >= 0]]
    bad = (ts != _NAT) & (~own | (ids_in_bin != 1))
    positions = np.flatnonzero(bad)
    rolls = _roll_events(raw)
    sample = None
    if len(positions):
        sample = _rows(agg, positions)
        listed = pd.Series(ids.astype(str), index=bins).groupby(level=0).agg(", ".join)
        head = agg_bins[positions[:SAMPLE_ROWS]]
        sample["instrument_ids_in_raw"] = listed.reindex(head).fillna("none").to_numpy()
    return _result(
        RULE_NO_ROLL_IN_BAR,
        len(positions),
        f"Every {timeframe.label} bar holds a single contract{_roll_text(rolls)}.",
        f"{_plural(len(positions), 'bar')} mixing contracts or carrying a contract the 1s bars "
        f"do not have in that interval{_roll_text(rolls)}.",
        sample,
        {**rolls, "bins_with_several_instruments": int(np.sum(per_bin > 1))},
    )


# --------------------------------------------------------------------------- bar-by-bar comparison


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


def _strictly_sorted(ts: np.ndarray, iid: np.ndarray) -> bool:
    """Rows strictly increasing by (ts, instrument_id)."""
    dts = np.diff(ts)
    return bool(np.all((dts > 0) | ((dts == 0) & (iid[1:] > iid[:-1]))))


def _sorted_by_time(ts: np.ndarray, iid: np.ndarray) -> bool:
    """Rows non-decreasing by (ts, instrument_id)."""
    dts = np.diff(ts)
    return bool(np.all((dts > 0) | ((dts == 0) & (iid[1:] >= iid[:-1]))))


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


def _compare(
    actual: pd.DataFrame, expected: pd.DataFrame, other: str, words: dict[str, str]
) -> _Comparison:
    """Compare two bar frames exactly (prices are exact decimals, volumes integers).

    Bars are matched on (``ts_event``, ``instrument_id``). ``other`` suffixes the expected
    values in the sample (``open_<other>``); ``words`` labels the problems ``missing``,
    ``unexpected``, ``repeated`` and ``differs``.
    """
    a_ts, a_id = _ts(actual), _ints(actual, "instrument_id")
    e_ts, e_id = _ts(expected), _ints(expected, "instrument_id")
    a_val = {c: _values(actual, c) for c in VALUE_COLUMNS}
    e_val = {c: _values(expected, c) for c in VALUE_COLUMNS}
    none = np.empty(0, dtype=np.int64)
    if (
        len(a_ts) == len(e_ts)
        and np.array_equal(a_ts, e_ts)
        and np.array_equal(a_id, e_id)
        and _strictly_sorted(e_ts, e_id)
    ):  # the usual case: the same bars in the same order, compare column against column
        a_rows = e_rows = np.arange(len(a_ts))
        a_only = e_only = a_repeat = none
    else:
        a_keys, e_keys = _pair_keys((a_ts, a_id), (e_ts, e_id))
        a_first, a_repeat = _first_of_each(a_keys)
        e_first, _ = _first_of_each(e_keys)  # a repeated expected bar adds nothing
        a_sorted, e_sorted = a_keys[a_first], e_keys[e_first]
        in_expected = _find(e_sorted, a_sorted)
        found = in_expected >= 0
        a_rows, e_rows = a_first[found], e_first[in_expected[found]]
        a_only, e_only = a_first[~found], e_first[_find(a_sorted, e_sorted) < 0]
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


# --------------------------------------------------------------------------- reconciliation


def _volume_per_instrument(frame: pd.DataFrame) -> pd.Series:
    """Exact (integer) total volume per instrument_id."""
    volume = pd.Series(_ints(frame, "volume"), index=_ints(frame, "instrument_id"))
    return volume.groupby(level=0).sum()


@_rule(RULE_RECONCILED)
def check_reconciliation(agg: pd.DataFrame, raw: pd.DataFrame, timeframe: Timeframe) -> RuleResult:
    """Prove an aggregated frame from the raw 1s frame it was built from.

    Three sub-checks, all in ``extra``: total volume per instrument_id equals the raw total;
    the number of bars equals the number of non-empty (bin, instrument_id) pairs in raw (both
    computed from raw directly, independently of the aggregation kernel); and every bar equals
    its recomputation by :func:`dbento_assets.core.aggregate.aggregate_bars` (exact equality,
    matched on ``ts_event`` and ``instrument_id``). ``violations`` counts the wrong bars
    (missing, unexpected or different); if only a total disagrees it counts those instead.
    """
    try:
        expected = aggregate_bars(raw, timeframe)
    except (ValueError, TypeError, KeyError) as exc:
        raise _Unusable(f"the 1-second bars cannot be aggregated: {exc}") from exc
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
    bins, _ = _bins_in_raw(raw, timeframe)
    raw_totals = _volume_per_instrument(raw)
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
        f"; total volume differs for {_plural(len(wrong_totals), 'instrument')}"
        if len(wrong_totals)
        else ""
    )
    count_text = "" if count_ok else f"; {len(agg)} bars for {len(bins)} non-empty intervals"
    fail = (
        f"{_plural(diff.problems, 'bar')} not matching the 1-second bars they come from "
        f"({', '.join(p for p in parts if p)}){totals_text}{count_text}."
        if diff.problems
        else f"Every bar matches its recomputation, yet the totals disagree{totals_text}"
        f"{count_text}: the aggregation itself is suspect."
    )
    return _result(
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


# --------------------------------------------------------------------------- vendor cross-check


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
    ts = _ts(frame)
    keep = np.ones(len(ts), dtype=bool)
    if month is not None:
        keep &= (ts >= month.start_ns) & (ts < month.end_ns)
    if minutes is not None:
        keep &= np.isin(np.floor_divide(ts, MINUTE_NS) * MINUTE_NS, minutes)
    return frame if keep.all() else frame.iloc[np.flatnonzero(keep)]


@_rule(RULE_VENDOR)
def check_vendor(
    bars_1min: pd.DataFrame,
    vendor_1m: pd.DataFrame,
    *,
    covered_minutes: Iterable[pd.Timestamp | str | int] | pd.DatetimeIndex | None = None,
    month: Month | None = None,
) -> RuleResult:
    """``bars_1min`` must equal Databento's own ohlcv-1m bar for bar (exact prices, volume).

    Bars are matched on (``ts_event``, ``instrument_id``). Both frames are first restricted to
    ``month`` (when given) and to ``covered_minutes`` (when given: the minutes whose 1-second
    data is known to be complete, e.g. when a 1s file is partial). Inside that range both
    vendors' rule "no trade, no bar" makes the bar sets identical, so a minute present on one
    side only is a violation either way: a vendor bar missing here means lost trades, a bar
    missing at the vendor means trades the vendor never saw. ``violations`` is the number of
    such one-sided minutes plus the minutes whose values differ.
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
    scope = "all minutes" if minutes is None else _plural(len(minutes), "covered minute")
    parts = [
        f"{diff.missing} missing here" if diff.missing else "",
        f"{diff.unexpected} absent at Databento" if diff.unexpected else "",
        f"{diff.differing} with different values" if diff.differing else "",
    ]
    return _result(
        RULE_VENDOR,
        diff.problems,
        f"All {diff.matched} one-minute bars{window} equal Databento's own 1-minute bars "
        f"({scope} compared).",
        f"{_plural(diff.problems, 'one-minute bar')}{window} disagreeing with Databento's own "
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


# --------------------------------------------------------------------------- trading calendar


def calendar_name(instrument: Instrument) -> str | None:
    """The exchange calendar an instrument trades on (catalog entry, else its dataset's
    default, see :func:`~dbento_assets.core.catalog.calendar_for`), or None."""
    return calendar_for(instrument)


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
    schedule = _sessions(calendar, first, last)
    return schedule.set_axis(schedule.index.strftime("%Y-%m-%d"), axis=0)


def _sessions(calendar: str, first: pd.Timestamp, last: pd.Timestamp) -> pd.DataFrame:
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
    schedule = _sessions(
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


@_rule(RULE_CALENDAR)
def check_calendar(
    bars: pd.DataFrame, month: Month, calendar: str, *, asof: pd.Timestamp | None = None
) -> RuleResult:
    """WARN for each session of ``calendar`` in ``month`` with no bar at all.

    A session belongs to the month of its label (the exchange's trading date). Its window is
    ``[open, close)`` from ``exchange_calendars``, in UTC, clipped to the month: a CME session
    labelled Monday opens on Sunday evening Chicago time, so the session labelled with the
    month's first date starts before the month and only its part inside the month is searched
    (its evening before the month belongs to the previous partition's file); the first evening
    of the next month's first session, which falls inside this month, is not counted here.
    Every session is thus counted in exactly one month. For NYSE the window is the regular
    session (09:30-16:00 New York, early closes included): pre- and post-market bars do not
    count. With ``asof``, sessions closing after it (not over yet) are skipped.
    """
    sessions = _month_sessions(calendar, month.year, month.month)
    opens = np.maximum(sessions["open"].array.as_unit("ns").asi8, month.start_ns)
    closes = np.minimum(sessions["close"].array.as_unit("ns").asi8, month.end_ns)
    if asof is not None:
        over = closes <= pd.Timestamp(asof).tz_convert("UTC").value
        sessions, opens, closes = sessions[over], opens[over], closes[over]
    ts = _ts(bars)
    ts = ts[ts != _NAT]
    if len(ts) > 1 and not bool(np.all(ts[1:] >= ts[:-1])):
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
    return _result(
        RULE_CALENDAR,
        len(missing),
        f"Bars were found in all {len(sessions)} {calendar} trading sessions of {month}.",
        f"{len(missing)} of {len(sessions)} {calendar} trading sessions in {month} without "
        f"any bar: {_few(labels)}.",
        sample,
        {
            "calendar": calendar,
            "sessions": len(sessions),
            "missing_sessions": labels[: LISTED * 2],
        },
    )


# --------------------------------------------------------------------------- runners


def run_raw_rules(
    raw: pd.DataFrame,
    month: Month,
    instrument: Instrument,
    *,
    asof: pd.Timestamp | None = None,
    rules: Iterable[str] = RAW_RULES,
) -> list[RuleResult]:
    """The rules for a raw 1s partition (all of :data:`RAW_RULES` unless ``rules`` says which).

    Results come in :data:`RAW_RULES` order. ``rules=RAW_BLOCKING_RULES`` runs only those
    whose failure stops the data (what the aggregation step re-checks before using raw bars).
    """
    wanted = set(rules)
    unknown = wanted - set(RAW_RULES)
    if unknown:
        raise ValueError(f"not raw rules: {', '.join(sorted(unknown))}")
    runners: dict[str, Callable[[], RuleResult]] = {
        RULE_SCHEMA: lambda: check_schema(raw),
        RULE_TIME_ORDER: lambda: check_time_order(raw),
        RULE_OHLC: lambda: check_ohlc(raw),
        RULE_IN_MONTH: lambda: check_inside_month(raw, month),
        RULE_ALIGNED: lambda: check_alignment(raw, ONE_SECOND),
        RULE_NO_ROLL_IN_BAR: lambda: check_rolls(raw),
        RULE_CALENDAR: lambda: (
            calendar_skipped(instrument, month)
            if (calendar := calendar_name(instrument)) is None
            else check_calendar(raw, month, calendar, asof=asof)
        ),
    }
    return [runners[name]() for name in RAW_RULES if name in wanted]


def vendor_skipped(reason: str) -> RuleResult:
    """The vendor cross-check when there is nothing to compare with: a failed WARN, not a pass.

    A green "passed" would claim a comparison that did not happen; a WARN is shown in the UI
    as a warning and never blocks the data (only a failed ERROR does). ``reason`` says why in
    plain words (no ohlcv-1m file, the download is off, ...); it is in the description and in
    ``extra["skipped_because"]``, and ``extra["skipped"]`` is True.
    """
    return RuleResult(
        rule=RULE_VENDOR,
        passed=False,
        severity=WARN,
        violations=0,
        description=f"Not compared with Databento's own 1-minute bars: {reason}.",
        extra={"skipped": True, "skipped_because": reason},
    )


def run_aggregated_rules(
    agg: pd.DataFrame,
    raw: pd.DataFrame,
    month: Month,
    timeframe: Timeframe,
    instrument: Instrument,
    *,
    vendor_1m: pd.DataFrame | None = None,
    covered_minutes: Iterable[pd.Timestamp | str | int] | pd.DatetimeIndex | None = None,
) -> list[RuleResult]:
    """All rules for an aggregated partition, in :data:`AGGREGATED_RULES` order.

    When ``timeframe`` is one minute and ``vendor_1m`` (Databento's own ohlcv-1m for the same
    instrument and month) is given, the vendor cross-check is appended. Calendar completeness
    is a raw-only rule: reconciliation proves the aggregated frame covers the same sessions.
    ``instrument`` is accepted for symmetry with :func:`run_raw_rules`.
    """
    del instrument  # the aggregated rules do not depend on the calendar
    results = [
        check_schema(agg, aggregated=True),
        check_time_order(agg),
        check_ohlc(agg),
        check_inside_month(agg, month),
        check_alignment(agg, timeframe),
        check_reconciliation(agg, raw, timeframe),
        check_rolls_aggregated(agg, raw, timeframe),
    ]
    if vendor_1m is not None and timeframe.seconds == 60:
        results.append(check_vendor(agg, vendor_1m, covered_minutes=covered_minutes, month=month))
    return results
