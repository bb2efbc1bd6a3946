"""Rules that read one bar frame alone: schema, time order, OHLC, inside the month, alignment.

Each is a few vectorized numpy passes (plus Pandera's column checks), so a 1.2M-row month
takes milliseconds; rows a rule cannot read (a missing timestamp, an infinite price) are
left to the schema rule.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pandera.pandas as pa

from dbento_assets.core.bars import PRICE_COLUMNS, steps_in_order
from dbento_assets.core.months import Month
from dbento_assets.core.rendering import SAMPLE_ROWS, few, plural, sample_rows, utc_text
from dbento_assets.core.rules import (
    NAT_NS,
    RULE_ALIGNED,
    RULE_IN_MONTH,
    RULE_OHLC,
    RULE_SCHEMA,
    RULE_TIME_ORDER,
    RuleResult,
    float_column,
    int_column,
    make_result,
    rule,
    ts_column,
)
from dbento_assets.core.schemas import BarsSchema
from dbento_assets.core.timeframes import Timeframe

_CHECK_WORDS: dict[str, str] = {
    "not_nullable": "missing values",
    "greater_than(0)": "not above 0",
    "greater_than_or_equal_to(0)": "below 0",
    "finite": "infinite values",
    "text_dtype": "not text",
    "column_in_dataframe": "column missing",
    "column_in_schema": "unexpected column",
}


def check_schema(frame: pd.DataFrame, *, negative_prices: bool = False) -> RuleResult:
    """Columns, dtypes, no nulls, finite prices > 0 (any finite price with
    ``negative_prices``: an instrument the catalog says trades at or below zero), volume >= 0,
    ``ts_event`` in UTC.

    Pandera runs lazily, so every failure is counted: one violation per failing value, plus
    one per wrong dtype, missing column or unexpected column.
    """
    prices = "finite" if negative_prices else "positive and finite"
    passed = make_result(
        RULE_SCHEMA,
        0,
        f"All columns are present with the right types, nothing is missing, prices are "
        f"{prices}, volumes are whole numbers and times are in UTC.",
        "",
    )
    try:
        BarsSchema.validate(frame, lazy=True, inplace=True)
    except pa.errors.SchemaErrors as exc:
        cases = exc.failure_cases
    else:
        return passed
    if negative_prices:
        real = (cases["check"] == "greater_than(0)") & cases["column"].isin(PRICE_COLUMNS)
        cases = cases[~real]
        if cases.empty:
            return passed
    kinds = cases.groupby(["column", "check"], sort=False, dropna=False).size()
    parts = [
        _describe_check(str(column), str(check), count, cases)
        for (column, check), count in kinds.items()
    ]
    sample = cases[["column", "check", "failure_case", "index"]].rename(columns={"index": "row"})
    return make_result(
        RULE_SCHEMA,
        len(cases),
        "",
        f"{plural(len(cases), 'problem')} with columns, types or values: {few(parts)}."
        + (
            " If this instrument really trades at or below zero (crude oil in April 2020, "
            "spreads), set negative_prices = true in its catalog entry."
            if not negative_prices and (cases["check"] == "greater_than(0)").any()
            else ""
        ),
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


@rule(RULE_TIME_ORDER)
def check_time_order(frame: pd.DataFrame) -> RuleResult:
    """Rows strictly increasing by (``ts_event``, ``instrument_id``): no duplicate, no disorder.

    This is the frame's sort contract, and it implies that each instrument's timestamps are
    strictly increasing. A violation is a row that is not after the row before it; rows with a
    missing timestamp are left to the schema rule.
    """
    ts, iid = ts_column(frame), int_column(frame, "instrument_id")
    keep = np.flatnonzero(ts != NAT_NS) if (ts == NAT_NS).any() else None
    if keep is not None:
        ts, iid = ts[keep], iid[keep]
    bad = ~steps_in_order(ts, iid, strict=True)
    positions = np.flatnonzero(bad) + 1
    if len(positions) == 0:
        return make_result(
            RULE_TIME_ORDER,
            0,
            "Every bar comes after the previous one; no bar is repeated.",
            "",
        )
    order = np.lexsort((iid, ts))
    duplicates = int(
        np.sum((ts[order][1:] == ts[order][:-1]) & (iid[order][1:] == iid[order][:-1]))
    )
    backwards = int(np.sum(bad & ~((ts[1:] == ts[:-1]) & (iid[1:] == iid[:-1]))))
    rows = positions if keep is None else keep[positions]
    previous = positions - 1 if keep is None else keep[positions - 1]
    sample = sample_rows(frame, rows)
    sample.insert(2, "previous_ts_event", frame["ts_event"].iloc[previous[:SAMPLE_ROWS]].array)
    return make_result(
        RULE_TIME_ORDER,
        len(positions),
        "",
        f"{plural(len(positions), 'bar')} out of time order or repeating an earlier bar "
        f"({duplicates} repeated, {backwards} going back in time).",
        sample,
        {"duplicates": duplicates, "out_of_order": backwards},
    )


_OHLC_WORDS = {
    "high_below_open_or_close": "high below open or close",
    "low_above_open_or_close": "low above open or close",
    "high_below_low": "high below low",
}


@rule(RULE_OHLC)
def check_ohlc(frame: pd.DataFrame) -> RuleResult:
    """high >= max(open, close), low <= min(open, close), high >= low.

    Rows with a missing or infinite price are left to the schema rule.
    """
    o, h, low, c = (float_column(frame, name) for name in PRICE_COLUMNS)
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
        sample = sample_rows(frame, positions)
        head = positions[:SAMPLE_ROWS]
        words = [
            np.where(high_bad[head], "high below open/close; ", ""),
            np.where(low_bad[head], "low above open/close; ", ""),
            np.where(cross[head], "high below low; ", ""),
        ]
        problem = np.char.add(np.char.add(words[0], words[1]), words[2])
        sample["problem"] = np.char.rstrip(problem, "; ")
    return make_result(
        RULE_OHLC,
        len(positions),
        "In every bar the high is the highest price and the low the lowest.",
        f"{plural(len(positions), 'bar')} with impossible prices: "
        + ", ".join(f"{_OHLC_WORDS[k]} ({n})" for k, n in counts.items() if n)
        + ".",
        sample,
        counts,
    )


@rule(RULE_IN_MONTH)
def check_inside_month(frame: pd.DataFrame, month: Month) -> RuleResult:
    """Every ``ts_event`` in ``[month.start, month.end)`` (missing timestamps: schema rule)."""
    ts = ts_column(frame)
    outside = (ts != NAT_NS) & ((ts < month.start_ns) | (ts >= month.end_ns))
    positions = np.flatnonzero(outside)
    before = int(np.sum(outside & (ts < month.start_ns)))
    window = f"{utc_text(month.start_ns)} to {utc_text(month.end_ns)} UTC"
    return make_result(
        RULE_IN_MONTH,
        len(positions),
        f"Every bar lies inside {month} ({window}).",
        f"{plural(len(positions), 'bar')} outside {month} ({window}): "
        f"{before} before it, {len(positions) - before} after it.",
        sample_rows(frame, positions) if len(positions) else None,
        {"before_month": before, "after_month": len(positions) - before},
    )


@rule(RULE_ALIGNED)
def check_alignment(frame: pd.DataFrame, timeframe: Timeframe) -> RuleResult:
    """Every bar opens on a multiple of the timeframe since the Unix epoch (UTC)."""
    ts = ts_column(frame)
    offset = np.remainder(ts, timeframe.nanos)
    positions = np.flatnonzero((offset != 0) & (ts != NAT_NS))
    sample = None
    if len(positions):
        sample = sample_rows(frame, positions)
        sample["past_boundary"] = pd.to_timedelta(offset[positions[:SAMPLE_ROWS]], unit="ns")
    return make_result(
        RULE_ALIGNED,
        len(positions),
        f"Every bar starts exactly on a {timeframe.label} boundary.",
        f"{plural(len(positions), 'bar')} not starting on a {timeframe.label} boundary.",
        sample,
    )
