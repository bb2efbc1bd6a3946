"""Tests for the pure validation rules (:mod:`dbento_assets.core.rules` and the modules it names).

Valid months (the demo generator's ES month with a roll, a QQQ month, and their aggregates)
pass every rule. Each corruption below breaks one thing and must make exactly the rules that
can see it fail, with the expected count and wording; where one defect is necessarily seen by
two rules (a misaligned aggregated bar is also not its recomputation), the test names both.
The vendor cross-check runs on Databento's real EQUS.MINI QQQ sample files.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections import Counter
from collections.abc import Callable
from functools import cache
from pathlib import Path
from zoneinfo import ZoneInfo

import databento
import numpy as np
import pandas as pd
import pytest

from dbento_assets.core import calendars, comparison, run_rules
from dbento_assets.core.aggregate import aggregate_bars
from dbento_assets.core.bars import make_bars, sort_bars
from dbento_assets.core.calendars import check_calendar
from dbento_assets.core.catalog import DEFAULT_CATALOG, calendar_for, load_catalog
from dbento_assets.core.comparison import check_reconciliation, check_vendor
from dbento_assets.core.dbn import PRICE_SCALE, decode_month, encode_month
from dbento_assets.core.demo import demo_contract_schedule, generate_month_records
from dbento_assets.core.frame_rules import (
    check_alignment,
    check_ohlc,
    check_schema,
    check_time_order,
)
from dbento_assets.core.months import Month
from dbento_assets.core.rendering import SAMPLE_ROWS, frame_markdown
from dbento_assets.core.rolls import check_rolls, check_rolls_aggregated
from dbento_assets.core.rules import (
    AGGREGATED_RULES,
    RAW_BLOCKING_RULES,
    RAW_RULES,
    RULE_ALIGNED,
    RULE_CALENDAR,
    RULE_IN_MONTH,
    RULE_NO_ROLL_IN_BAR,
    RULE_OHLC,
    RULE_RECONCILED,
    RULE_SCHEMA,
    RULE_SEVERITY,
    RULE_TIME_ORDER,
    WARN,
    RuleResult,
)
from dbento_assets.core.run_rules import ONE_SECOND, run_aggregated_rules, run_raw_rules
from dbento_assets.core.timeframes import parse_timeframe

CATALOG = load_catalog(DEFAULT_CATALOG)
ES = CATALOG.instrument("ES")
QQQ = CATALOG.instrument("QQQ")
MARCH = Month(2024, 3)  # the demo ES rolls from the March to the June contract on 2024-03-07
JANUARY = Month(2024, 1)
FEBRUARY = Month(2024, 2)
MINUTE = parse_timeframe("1min")
CHICAGO = ZoneInfo("America/Chicago")
NEW_YORK = ZoneInfo("America/New_York")
UTC = ZoneInfo("UTC")
SAMPLES = Path(__file__).parent / "fixtures" / "databento" / "EQUS.MINI"
SECOND = 1_000_000_000


# --------------------------------------------------------------------------- data


@cache
def _demo(symbol: str, month: Month) -> pd.DataFrame:
    """A demo month at 1% activity, through the real DBN encode/decode path."""
    instrument = CATALOG.instrument(symbol)
    records = generate_month_records(instrument, month, activity=0.01)
    payload = encode_month(records, instrument, month)
    return decode_month([payload], symbol, month).bars


def raw_es() -> pd.DataFrame:
    return _demo("ES", MARCH).copy()


def raw_qqq() -> pd.DataFrame:
    return _demo("QQQ", JANUARY).copy()


def agg_es(frame: pd.DataFrame | None = None) -> pd.DataFrame:
    return aggregate_bars(raw_es() if frame is None else frame, MINUTE)


def failing(results: list[RuleResult]) -> set[str]:
    return {r.rule for r in results if not r.passed}


def by_rule(results: list[RuleResult]) -> dict[str, RuleResult]:
    return {r.rule: r for r in results}


def utc_ns(text: str, zone: ZoneInfo = UTC) -> int:
    """Nanoseconds of a wall-clock time in ``zone``."""
    return pd.Timestamp(dt.datetime.fromisoformat(text).replace(tzinfo=zone)).value


def row_where(frame: pd.DataFrame, mask: np.ndarray) -> int:
    """The position of the first row (past the first 100) where ``mask`` holds."""
    hits = np.flatnonzero(mask)
    return int(hits[hits > 100][0])


def insert_row(frame: pd.DataFrame, position: int, row: pd.DataFrame) -> pd.DataFrame:
    """``row`` (a one-row frame) inserted after ``position``."""
    return pd.concat(
        [frame.iloc[: position + 1], row, frame.iloc[position + 1 :]], ignore_index=True
    )


def drop_between(frame: pd.DataFrame, start_ns: int, end_ns: int) -> pd.DataFrame:
    ts = frame["ts_event"].array.asi8
    return frame[~((ts >= start_ns) & (ts < end_ns))].reset_index(drop=True)


def every_ten_minutes(month: Month, symbol: str = "ES") -> pd.DataFrame:
    """A bar every 10 minutes, all month, weekends included (covers every session)."""
    ts = np.arange(month.start_ns, month.end_ns, 600 * SECOND)
    price = np.full(len(ts), 100.0)
    return make_bars(ts, symbol, np.full(len(ts), 7), price, price, price, price, np.ones(len(ts)))


# --------------------------------------------------------------------------- valid data


def test_valid_raw_months_pass_every_rule() -> None:
    for frame, month, instrument in ((raw_es(), MARCH, ES), (raw_qqq(), JANUARY, QQQ)):
        results = run_raw_rules(frame, month, instrument)
        assert [r.rule for r in results] == list(RAW_RULES)
        assert failing(results) == set(), [r.description for r in results if not r.passed]
        for r in results:
            assert r.violations == 0 and r.sample.empty and r.sample_markdown() == ""
            assert r.severity == RULE_SEVERITY[r.rule] and not r.blocking


def test_valid_aggregates_pass_every_rule() -> None:
    for frame, month in ((raw_es(), MARCH), (raw_qqq(), JANUARY)):
        for label in ("15s", "30s", "1min", "5min", "1h"):
            tf = parse_timeframe(label)
            results = run_aggregated_rules(aggregate_bars(frame, tf), frame, month, tf)
            assert [r.rule for r in results] == list(AGGREGATED_RULES)
            assert failing(results) == set(), (label, [r.description for r in results])


def test_reconciliation_and_the_roll_check_share_one_computation_of_the_bin_pairs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Each takes the (bin, contract) pairs of the bars it comes from; on a month of raw bars
    # that is the costliest part of the roll check, so it is computed once for both. An
    # unusable frame still fails the rules (not the call).
    calls: list[int] = []
    real = run_rules.bins_in_raw
    for module in ("rolls", "comparison", "run_rules"):  # wherever it is called from
        monkeypatch.setattr(
            f"dbento_assets.core.{module}.bins_in_raw", lambda *a: calls.append(1) or real(*a)
        )
    raw = raw_es()
    results = by_rule(run_aggregated_rules(agg_es(raw), raw, MARCH, MINUTE))
    assert failing(list(results.values())) == set() and len(calls) == 1
    broken = raw.drop(columns=["instrument_id"])
    results = by_rule(run_aggregated_rules(agg_es(raw), broken, MARCH, MINUTE))
    for name in (RULE_RECONCILED, RULE_NO_ROLL_IN_BAR):
        assert results[name].description.startswith("Not checked: column instrument_id")


def test_rolls_report_the_roll_dates_of_the_month() -> None:
    schedule = demo_contract_schedule(ES, MARCH)
    assert len(schedule) == 2  # the test relies on one roll in March
    raw = check_rolls(raw_es())
    agg = check_rolls_aggregated(agg_es(), raw_es(), MINUTE)
    for result in (raw, agg):
        assert result.passed
        assert result.extra["roll_dates"] == [schedule[1].start_date.isoformat()]
        assert result.extra["roll_count"] == 1
        (roll,) = result.extra["rolls"]
        assert roll["from_instrument_id"] == schedule[0].instrument_id
        assert roll["to_instrument_id"] == schedule[1].instrument_id
        assert schedule[1].start_date.isoformat() in result.description
    assert check_rolls(raw_qqq()).extra["roll_dates"] == []


# --------------------------------------------------------------------------- raw corruptions


def _set(frame: pd.DataFrame, row: int, **values: object) -> pd.DataFrame:
    for column, value in values.items():
        frame.loc[row, column] = value
    return frame


def _zero_prices(f: pd.DataFrame) -> pd.DataFrame:
    return _set(f, 500, open=0.0, high=0.0, low=0.0, close=0.0)


def _moving_bar(f: pd.DataFrame, nth: int = 0) -> int:
    """The position of the ``nth`` bar (past the first 100) whose open differs from its close."""
    hits = np.flatnonzero(f["open"].to_numpy() != f["close"].to_numpy())
    return int(hits[hits > 100][nth])


def _high_below_close(f: pd.DataFrame, nth: int = 0) -> pd.DataFrame:
    k = _moving_bar(f, nth)
    return _set(f, k, high=min(f.loc[k, "open"], f.loc[k, "close"]))


def _low_above_open(f: pd.DataFrame, nth: int = 0) -> pd.DataFrame:
    k = _moving_bar(f, nth)
    return _set(f, k, low=max(f.loc[k, "open"], f.loc[k, "close"]))


def _high_below_low(f: pd.DataFrame, row: int = 500) -> pd.DataFrame:
    return _set(f, row, high=f.loc[row, "low"] - 0.25)


def _duplicate_row(f: pd.DataFrame) -> pd.DataFrame:
    return insert_row(f, 500, f.iloc[[500]])


def _swap_rows(f: pd.DataFrame) -> pd.DataFrame:
    order = np.arange(len(f))
    order[[500, 501]] = [501, 500]
    return f.iloc[order].reset_index(drop=True)


def _after_month(f: pd.DataFrame) -> pd.DataFrame:
    return _set(f, len(f) - 1, ts_event=MARCH.end)


def _before_month(f: pd.DataFrame) -> pd.DataFrame:
    return _set(f, 0, ts_event=MARCH.start - pd.Timedelta(seconds=1))


def _bar_at(f: pd.DataFrame, ns: int) -> pd.DataFrame:
    """A copy of the bar before ``ns`` inserted at ``ns``, in time order."""
    position = int(np.searchsorted(f["ts_event"].array.asi8, ns)) - 1
    row = f.iloc[[position]].copy()
    row["ts_event"] = pd.to_datetime([ns], unit="ns", utc=True)
    return insert_row(f, position, row)


def _half_second_bar(f: pd.DataFrame) -> pd.DataFrame:
    return _bar_at(f, utc_ns("2024-03-12T05:29:37.500"))


def _last_nanosecond_bar(f: pd.DataFrame) -> pd.DataFrame:
    return _bar_at(f, MARCH.end_ns - 1)  # 2024-03-31 23:59:59.999999999


def _two_contracts_one_second(f: pd.DataFrame) -> pd.DataFrame:
    other = f.iloc[[500]].copy()
    other["instrument_id"] = other["instrument_id"] + 1
    return insert_row(f, 500, other)


def _session_removed(f: pd.DataFrame) -> pd.DataFrame:
    # The CME session labelled Tuesday 2024-03-12 runs Monday 17:00 to Tuesday 17:00 Chicago.
    return drop_between(f, utc_ns("2024-03-11T17:00", CHICAGO), utc_ns("2024-03-12T17:00", CHICAGO))


RAW_CASES: dict[str, tuple[Callable[[pd.DataFrame], pd.DataFrame], str, int, str]] = {
    # name: (corruption, failing rule, violations, words in the description)
    "zero prices": (_zero_prices, RULE_SCHEMA, 4, "open not above 0 (1)"),
    "NaN high": (lambda f: _set(f, 500, high=np.nan), RULE_SCHEMA, 1, "high missing values (1)"),
    "infinite close": (
        lambda f: _set(f, 500, close=np.inf),
        RULE_SCHEMA,
        1,
        "close infinite values (1)",
    ),
    "signed volume": (
        lambda f: f.astype({"volume": "int64"}),
        RULE_SCHEMA,
        1,
        "volume has type int64 instead of uint64",
    ),
    "Chicago timestamps": (
        lambda f: f.assign(ts_event=f["ts_event"].dt.tz_convert(CHICAGO)),
        RULE_SCHEMA,
        1,
        "ts_event has type datetime64[ns, America/Chicago] instead of datetime64[ns, UTC]",
    ),
    "microsecond timestamps": (
        lambda f: f.assign(ts_event=f["ts_event"].dt.as_unit("us")),
        RULE_SCHEMA,
        1,
        "ts_event has type datetime64[us, UTC]",
    ),
    "missing timestamp": (
        lambda f: _set(f, 500, ts_event=pd.NaT),
        RULE_SCHEMA,
        1,
        "ts_event missing values (1)",
    ),
    "object symbol": (
        lambda f: f.astype({"symbol": object}),
        RULE_SCHEMA,
        1,
        "symbol not text",
    ),
    "missing symbol": (
        lambda f: _set(f, 500, symbol=None),
        RULE_SCHEMA,
        1,
        "symbol missing values (1)",
    ),
    "extra column": (lambda f: f.assign(note="x"), RULE_SCHEMA, 1, "unexpected column note"),
    "duplicate bar": (
        _duplicate_row,
        RULE_TIME_ORDER,
        1,
        "1 bar out of time order or repeating an earlier bar (1 repeated, 0 going back",
    ),
    "swapped bars": (_swap_rows, RULE_TIME_ORDER, 1, "(0 repeated, 1 going back in time)"),
    "high below close": (_high_below_close, RULE_OHLC, 1, "high below open or close (1)"),
    "low above open": (_low_above_open, RULE_OHLC, 1, "low above open or close (1)"),
    "high below low": (_high_below_low, RULE_OHLC, 1, "high below low (1)"),
    "bar after the month": (_after_month, RULE_IN_MONTH, 1, "0 before it, 1 after it"),
    "bar before the month": (_before_month, RULE_IN_MONTH, 1, "1 before it, 0 after it"),
    "two contracts in one second": (
        _two_contracts_one_second,
        RULE_NO_ROLL_IN_BAR,
        1,
        "1 second with bars of two different contracts",
    ),
    "bar at 05:29:37.5": (_half_second_bar, RULE_ALIGNED, 1, "1 bar not starting on a 1s"),
    "bar at 23:59:59.999999999": (
        _last_nanosecond_bar,
        RULE_ALIGNED,
        1,
        "1 bar not starting on a 1s boundary",
    ),
    "session without bars": (
        _session_removed,
        RULE_CALENDAR,
        1,
        "1 of 20 CMES trading sessions in 2024-03 without any bar: 2024-03-12",
    ),
}


@pytest.mark.parametrize("case", list(RAW_CASES))
def test_each_raw_corruption_fails_exactly_its_rule(case: str) -> None:
    corrupt, rule, violations, words = RAW_CASES[case]
    results = by_rule(run_raw_rules(corrupt(raw_es()), MARCH, ES))
    assert failing(list(results.values())) == {rule}, {
        r.rule: r.description for r in results.values() if not r.passed
    }
    result = results[rule]
    assert result.violations == violations
    assert words in result.description, result.description
    assert not result.sample.empty and result.sample_markdown().startswith("| ")
    assert result.blocking == (rule != RULE_CALENDAR)


_SCHEMA_WORDS = """
import sys
import numpy as np
import pandas as pd
from dbento_assets.core.bars import make_bars
from dbento_assets.core.months import Month
from dbento_assets.core.run_rules import run_aggregated_rules, run_raw_rules
from dbento_assets.core.catalog import DEFAULT_CATALOG, load_catalog
from dbento_assets.core.timeframes import parse_timeframe

month, minute = Month(2024, 1), parse_timeframe("1min")
ts = month.start_ns + np.arange(3) * 60_000_000_000
price = np.array([100.0, np.inf, 100.0])
bad = make_bars(ts, "ES", [7, 7, 7], price, price, price, price, [1, 1, 1])
bad["symbol"] = bad["symbol"].astype(object)
for step in sys.argv[1:]:
    if step == "raw":
        results = run_raw_rules(bad, month, load_catalog(DEFAULT_CATALOG).instrument("ES"))
    else:
        results = run_aggregated_rules(bad, bad, month, minute)
    print(step, results[0].description)
"""


@pytest.mark.parametrize("order", [("raw", "bars"), ("bars", "raw")])
def test_the_schema_rule_words_each_failure_alike_in_either_step_and_order(
    order: tuple[str, str], tmp_path: Path
) -> None:
    # As a run checks them: one process, the raw month's rules then the bars' (or, in a step
    # of its own, the bars' first). Each names every failure in words, never by the name of
    # the function behind the check.
    import subprocess
    import sys

    script = tmp_path / "schema_words.py"
    script.write_text(_SCHEMA_WORDS)
    done = subprocess.run(
        [sys.executable, str(script), *order], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines] == list(order)
    for line in lines:
        assert "close infinite values (1)" in line and "symbol not text" in line, line
        assert "_prices_finite" not in line and "_symbol_is_text" not in line, line


def test_ohlc_counts_each_kind_of_impossible_bar() -> None:
    frame = raw_es()
    frame = _high_below_low(_low_above_open(_high_below_close(frame, 0), 1), _moving_bar(frame, 2))
    result = check_ohlc(frame)
    assert result.violations == 3
    assert result.extra == {
        "high_below_open_or_close": 2,  # a high below the low is below open/close too
        "low_above_open_or_close": 1,
        "high_below_low": 1,
    }
    assert set(result.sample["problem"]) == {
        "high below open/close",
        "low above open/close",
        "high below open/close; high below low",
    }


def test_schema_counts_every_bad_value_lazily() -> None:
    frame = raw_es()
    frame.loc[[10, 20, 30], "open"] = -1.0
    frame.loc[40, "low"] = np.nan
    result = check_schema(frame.astype({"volume": "int64"}))
    assert result.violations == 5
    assert result.extra["failures"] == {
        "open: greater_than(0)": 3,
        "low: not_nullable": 1,
        "volume: dtype('uint64')": 1,
    }
    assert sorted(result.sample["row"].dropna().astype(int)) == [10, 20, 30, 40]


def test_missing_column_fails_schema_and_marks_dependent_rules_not_checked() -> None:
    results = by_rule(run_raw_rules(raw_es().drop(columns=["low"]), MARCH, ES))
    assert failing(list(results.values())) == {RULE_SCHEMA, RULE_OHLC}
    assert "column missing low" in results[RULE_SCHEMA].description
    ohlc = results[RULE_OHLC]
    assert ohlc.violations == 0 and ohlc.blocking
    assert ohlc.description == "Not checked: column low is missing (see the schema check)."


def test_time_order_sample_shows_the_previous_timestamp() -> None:
    frame = _swap_rows(raw_es())
    result = check_time_order(frame)
    (row,) = result.sample.to_dict("records")
    assert row["row"] == 501
    assert row["ts_event"] == frame.loc[501, "ts_event"]
    assert row["previous_ts_event"] == frame.loc[500, "ts_event"]
    assert row["previous_ts_event"] > row["ts_event"]


# --------------------------------------------------------------------------- aggregated corruptions


def _agg_shift(f: pd.DataFrame) -> pd.DataFrame:
    return _set(f, 500, ts_event=f.loc[500, "ts_event"] + pd.Timedelta(seconds=1))


def _agg_volume(f: pd.DataFrame) -> pd.DataFrame:
    return _set(f, 500, volume=f.loc[500, "volume"] + 1)


def _agg_close(f: pd.DataFrame) -> pd.DataFrame:
    k = _moving_bar(f)
    return _set(f, k, close=f.loc[k, "open"])


def _agg_fabricated(f: pd.DataFrame) -> pd.DataFrame:
    # Saturday noon UTC: no CME trading, so no raw bar in that minute.
    at = pd.Timestamp("2024-03-09 12:00", tz="UTC")
    row = f.iloc[[0]].copy()
    row["ts_event"] = at
    row["instrument_id"] = f.loc[f["ts_event"] < at, "instrument_id"].iloc[-1]
    return sort_bars(pd.concat([f, row], ignore_index=True))


def _agg_other_contract(f: pd.DataFrame) -> pd.DataFrame:
    ids = np.unique(f["instrument_id"])
    k = 500
    return _set(f, k, instrument_id=ids[ids != f.loc[k, "instrument_id"]][0])


AGG_CASES: dict[str, tuple[Callable[[pd.DataFrame], pd.DataFrame], dict[str, int], str, str]] = {
    # name: (corruption, {failing rule: violations}, rule to read, words in its description)
    "bar shifted by 1s": (
        _agg_shift,
        {RULE_ALIGNED: 1, RULE_RECONCILED: 2},
        RULE_ALIGNED,
        "1 bar not starting on a 1min boundary",
    ),
    "volume changed": (
        _agg_volume,
        {RULE_RECONCILED: 1},
        RULE_RECONCILED,
        "1 bar not matching the 1-second bars they come from (1 with different values); "
        "total volume differs for 1 instrument",
    ),
    "close changed": (
        _agg_close,
        {RULE_RECONCILED: 1},
        RULE_RECONCILED,
        "(1 with different values).",
    ),
    "bar dropped": (
        lambda f: f.drop(index=500).reset_index(drop=True),
        {RULE_RECONCILED: 1},
        RULE_RECONCILED,
        "(1 missing); total volume differs for 1 instrument",
    ),
    "bar invented": (
        _agg_fabricated,
        {RULE_RECONCILED: 1, RULE_NO_ROLL_IN_BAR: 1},
        RULE_RECONCILED,
        "(1 not backed by the 1s bars)",
    ),
    "bar repeated": (
        _duplicate_row,
        {RULE_TIME_ORDER: 1, RULE_RECONCILED: 1},
        RULE_RECONCILED,
        "(1 not backed by the 1s bars)",
    ),
    "bar given the other contract": (
        _agg_other_contract,
        {RULE_RECONCILED: 2, RULE_NO_ROLL_IN_BAR: 1},
        RULE_NO_ROLL_IN_BAR,
        "1 bar mixing contracts or carrying a contract the 1s bars do not have",
    ),
    "impossible high": (
        _high_below_close,
        {RULE_OHLC: 1, RULE_RECONCILED: 1},
        RULE_OHLC,
        "high below open or close (1)",
    ),
}


@pytest.mark.parametrize("case", list(AGG_CASES))
def test_each_aggregated_corruption_fails_exactly_its_rules(case: str) -> None:
    corrupt, expected, rule, words = AGG_CASES[case]
    raw = raw_es()
    results = by_rule(run_aggregated_rules(corrupt(agg_es(raw)), raw, MARCH, MINUTE))
    assert {r.rule: r.violations for r in results.values() if not r.passed} == expected
    assert words in results[rule].description, results[rule].description
    assert results[rule].sample_markdown().startswith("| ")


def test_reconciliation_sample_puts_wrong_and_expected_values_side_by_side() -> None:
    raw = raw_es()
    good = agg_es(raw)
    result = check_reconciliation(_agg_volume(agg_es(raw)), raw, MINUTE)
    (row,) = result.sample.to_dict("records")
    assert row["ts_event"] == good.loc[500, "ts_event"]
    assert row["problem"] == "differs from the 1s bars in volume"
    assert (row["volume"], row["volume_expected"]) == (
        good.loc[500, "volume"] + 1,
        good.loc[500, "volume"],
    )
    assert row["close"] == row["close_expected"] == good.loc[500, "close"]
    iid = str(good.loc[500, "instrument_id"])
    mismatch = result.extra["volume_mismatch"][iid]
    assert mismatch["aggregated"] == mismatch["raw"] + 1
    assert f"| {good.loc[500, 'ts_event']:%Y-%m-%d %H:%M:%S} |" in result.sample_markdown()


def test_reconciliation_counts_bins_and_volume_independently_of_the_kernel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A recomputation that loses a bar cannot vouch for an aggregate that lost the same bar."""
    raw = raw_es()
    lossy = aggregate_bars(raw, MINUTE).iloc[1:].reset_index(drop=True)
    # The bars' recomputation made as lossy as the aggregate: the totals still catch it.
    monkeypatch.setattr(comparison, "expected_bars", lambda bars, tf: lossy.copy())
    result = check_reconciliation(lossy, raw, MINUTE)
    assert not result.passed
    assert result.extra["differing_bars"] == result.extra["missing_bars"] == 0
    assert result.extra["non_empty_bins"] == len(lossy) + 1
    assert result.violations == 2  # one instrument's volume total, one bar count
    assert "aggregation itself is suspect" in result.description


def _bins_shifted_by_one_second(bars: pd.DataFrame, timeframe) -> pd.DataFrame:
    """A wrong kernel: every bin opens a second late (off by one)."""
    ts = bars["ts_event"].array.asi8 - SECOND
    return aggregate_bars(bars.assign(ts_event=pd.to_datetime(ts, utc=True)), timeframe)


def _high_of_the_first_second(bars: pd.DataFrame, timeframe) -> pd.DataFrame:
    """A wrong kernel: the high of a bar is its first second's high, not the highest."""
    out = aggregate_bars(bars, timeframe)
    first = bars.groupby(bars["ts_event"].dt.floor(timeframe.label))["high"].first()
    return out.assign(high=first.to_numpy())


@pytest.mark.parametrize("kernel", [_bins_shifted_by_one_second, _high_of_the_first_second])
def test_reconciliation_catches_a_wrong_kernel(kernel: Callable, monkeypatch) -> None:
    """The recomputation is not the kernel: bars from a wrong kernel fail, from raw or from
    the finer bars they were built from, whatever the kernel makes of them."""
    raw = raw_es()
    fine = aggregate_bars(raw, parse_timeframe("30s"))
    for source in (raw, fine):
        wrong = kernel(source, MINUTE)
        # Even with the wrong kernel in force everywhere, the recomputation stays right.
        monkeypatch.setattr("dbento_assets.core.aggregate.aggregate_bars", kernel)
        result = check_reconciliation(wrong, raw, MINUTE, None if source is raw else fine)
        monkeypatch.undo()
        assert not result.passed
        assert result.extra["differing_bars"] + result.extra["missing_bars"] > 0


def test_the_expected_bars_equal_the_kernels_from_raw_and_from_finer_bars() -> None:
    raw = raw_es()  # March: a roll, so two instruments
    fine = aggregate_bars(raw, parse_timeframe("15s"))
    for source in (raw, fine, raw.sample(frac=1, random_state=1)):  # unsorted raw too
        expected = comparison.expected_bars(source, MINUTE)
        pd.testing.assert_frame_equal(expected, aggregate_bars(raw, MINUTE))
    assert check_reconciliation(aggregate_bars(raw, MINUTE), raw, MINUTE, fine).passed


def test_bar_outside_the_month_in_raw_is_reported_in_the_aggregate() -> None:
    raw = _after_month(raw_es())
    results = run_aggregated_rules(agg_es(raw), raw, MARCH, MINUTE)
    assert failing(results) == {RULE_IN_MONTH}


@pytest.mark.parametrize("finer", [None, "15s", "30s"], ids=["from raw", "via 15s", "via 30s"])
def test_a_roll_inside_a_minute_fails_the_1min_bars_only(finer: str | None) -> None:
    # As the bars step checks them: from raw, or via the finer bars they were built from.
    raw = raw_es()
    schedule = demo_contract_schedule(ES, MARCH)
    ts = raw["ts_event"].array.asi8
    after = ts >= schedule[1].start_ns
    minute = ts // (60 * SECOND)
    # The first minute after the roll with two bars: move the roll between them.
    k = row_where(raw, after & np.r_[False, (minute[1:] == minute[:-1])] & np.r_[False, after[:-1]])
    raw.loc[(ts >= schedule[1].start_ns) & (ts < ts[k]), "instrument_id"] = np.uint32(
        schedule[0].instrument_id
    )
    assert failing(run_raw_rules(raw, MARCH, ES)) == set()
    built_from = None if finer is None else aggregate_bars(raw, parse_timeframe(finer))
    results = by_rule(run_aggregated_rules(agg_es(raw), raw, MARCH, MINUTE, built_from=built_from))
    assert failing(list(results.values())) == {RULE_NO_ROLL_IN_BAR}
    rolls = results[RULE_NO_ROLL_IN_BAR]
    assert rolls.violations == 2  # the minute became two bars, one per contract
    assert rolls.extra["bins_with_several_instruments"] == 1
    assert rolls.extra["roll_dates"] == [pd.Timestamp(ts[k], tz="UTC").strftime("%Y-%m-%d")]
    ids = sorted(str(c.instrument_id) for c in schedule)
    assert set(rolls.sample["instrument_ids_in_raw"]) == {", ".join(ids)}


# --------------------------------------------------------------------------- calendar


def test_calendar_counts_a_cme_sunday_evening_for_monday() -> None:
    frame = every_ten_minutes(JANUARY)
    assert check_calendar(frame, JANUARY, "CMES").passed
    # Keep only Sunday 17:00-18:00 Chicago of the session labelled Monday 2024-01-08.
    kept = drop_between(
        frame, utc_ns("2024-01-07T18:00", CHICAGO), utc_ns("2024-01-08T17:00", CHICAGO)
    )
    assert check_calendar(kept, JANUARY, "CMES").passed
    # Without that hour the session is missing, though Monday evening (Tuesday's) has bars.
    gone = drop_between(
        kept, utc_ns("2024-01-07T17:00", CHICAGO), utc_ns("2024-01-07T18:00", CHICAGO)
    )
    result = check_calendar(gone, JANUARY, "CMES")
    assert (result.passed, result.severity, result.blocking) == (False, WARN, False)
    assert result.extra["missing_sessions"] == ["2024-01-08"]
    assert result.sample["session"].tolist() == ["2024-01-08"]
    assert result.sample["open"].iloc[0] == pd.Timestamp("2024-01-07 23:00", tz="UTC")


def test_calendar_counts_a_session_in_the_month_of_its_label() -> None:
    # The session labelled 2024-02-01 opens on 2024-01-31 at 17:00 Chicago (23:00 UTC).
    february = drop_between(
        every_ten_minutes(FEBRUARY), FEBRUARY.start_ns, utc_ns("2024-02-01T17:00", CHICAGO)
    )
    result = check_calendar(february, FEBRUARY, "CMES")
    assert result.extra["missing_sessions"] == ["2024-02-01"]
    # January's file holds that session's first hour, but January does not count it.
    january = drop_between(
        every_ten_minutes(JANUARY), utc_ns("2024-01-31T17:00", CHICAGO), JANUARY.end_ns
    )
    assert check_calendar(january, JANUARY, "CMES").passed


def test_calendar_follows_holidays_and_early_closes() -> None:
    frame = every_ten_minutes(JANUARY, "QQQ")
    # NYSE is closed on Martin Luther King Jr. Day (2024-01-15): no bar is expected.
    holiday = drop_between(frame, utc_ns("2024-01-15T00:00"), utc_ns("2024-01-16T00:00"))
    assert check_calendar(holiday, JANUARY, "XNYS").passed
    # CME trades until noon Chicago that day: bars after the early close do not count.
    cme = drop_between(
        every_ten_minutes(JANUARY),
        utc_ns("2024-01-14T17:00", CHICAGO),
        utc_ns("2024-01-15T12:00", CHICAGO),
    )
    assert check_calendar(cme, JANUARY, "CMES").extra["missing_sessions"] == ["2024-01-15"]


def test_calendar_looks_at_regular_equity_hours_only() -> None:
    frame = every_ten_minutes(JANUARY, "QQQ")
    regular = (utc_ns("2024-01-10T09:30", NEW_YORK), utc_ns("2024-01-10T16:00", NEW_YORK))
    premarket_only = drop_between(frame, *regular)
    assert check_calendar(premarket_only, JANUARY, "XNYS").extra["missing_sessions"] == [
        "2024-01-10"
    ]

    def with_bar_at(ns: int) -> pd.DataFrame:
        one = make_bars(np.array([ns]), "QQQ", [7], [1.0], [1.0], [1.0], [1.0], [1])
        return sort_bars(pd.concat([premarket_only, one], ignore_index=True))

    assert check_calendar(with_bar_at(regular[0]), JANUARY, "XNYS").passed  # the open counts
    assert not check_calendar(with_bar_at(regular[1]), JANUARY, "XNYS").passed  # the close not


def test_calendar_lists_every_missing_session_and_skips_sessions_after_asof() -> None:
    frame = every_ten_minutes(JANUARY, "QQQ")
    early = frame[frame["ts_event"] < pd.Timestamp("2024-01-20", tz="UTC")]
    result = check_calendar(early, JANUARY, "XNYS")
    later = ["2024-01-22", "2024-01-23", "2024-01-24", "2024-01-25", "2024-01-26"]
    assert result.extra["missing_sessions"] == [*later, "2024-01-29", "2024-01-30", "2024-01-31"]
    assert result.violations == 8 and "2024-01-22, 2024-01-23" in result.description
    asof = pd.Timestamp("2024-01-20", tz="UTC")
    partial = check_calendar(early, JANUARY, "XNYS", asof=asof)
    assert partial.passed
    # It says which sessions it judged: not "all sessions of the month".
    assert partial.description == (
        "Bars were found in all 13 XNYS trading sessions of 2024-01 closed by "
        "2024-01-20 00:00:00 UTC."
    )


def test_off_grid_raw_bars_are_refused_by_the_timeframe_alignment_rule() -> None:
    frame = _last_nanosecond_bar(_half_second_bar(raw_es()))
    result = check_alignment(frame, ONE_SECOND)
    assert result.blocking and result.violations == 2
    assert [str(t) for t in result.sample["ts_event"]] == [
        "2024-03-12 05:29:37.500000+00:00",
        "2024-03-31 23:59:59.999999999+00:00",
    ]
    assert list(result.sample["past_boundary"]) == [
        pd.Timedelta(milliseconds=500),
        pd.Timedelta(nanoseconds=999_999_999),
    ]
    assert RULE_ALIGNED in RAW_BLOCKING_RULES


def test_calendar_names_follow_the_venue() -> None:
    assert calendar_for(ES) == "CMES"
    assert calendar_for(QQQ) == "XNYS"
    eurex = dataclasses.replace(ES, symbol="FDAX", dataset="XEUR.EOBI")
    assert calendar_for(eurex) == "XEUR"  # a future, but not on CME
    with pytest.raises(ValueError, match="not an exchange_calendars calendar"):
        check_calendar(raw_es(), MARCH, "NOPE")


@pytest.mark.parametrize(
    "damage", ["none", "cut short", "another file's", "edited", "unwritable", "no home"]
)
def test_a_calendars_sessions_are_kept_once_computed_and_a_bad_copy_is_computed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    first, last = pd.Timestamp("2024-01-01"), pd.Timestamp("2024-01-31")
    computed = calendars._computed_sessions("XNYS", first, last)
    assert calendars._cached_sessions("XNYS", first, last).equals(computed)
    (kept,) = (tmp_path / "cache").rglob("*.json")
    assert "exchange_calendars-" in str(kept)  # a new library version computes them again
    if damage == "cut short":
        kept.write_text(kept.read_text()[:40])
    elif damage == "another file's":
        other = calendars._cache_path("XNYS", pd.Timestamp("2024-02-01"), last)
        assert other is not None
        calendars._write_sessions(other, computed.iloc[:3])
        kept.write_bytes(other.read_bytes())
    elif damage == "edited":  # whole and well formed, but not what was computed
        stored = json.loads(kept.read_text())
        stored.update({k: stored[k][:3] for k in ("sessions", "open_ns", "close_ns")})
        kept.write_text(json.dumps(stored))
    elif damage == "unwritable":  # a cache folder that cannot be made (root writes anywhere)
        (tmp_path / "not a folder").write_text("")
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "not a folder"))
    elif damage == "no home":

        def homeless(*args: object, **kwargs: object) -> str:
            raise RuntimeError("could not determine the home directory")

        monkeypatch.setattr(calendars.platformdirs, "user_cache_dir", homeless)
    files_before = sorted(tmp_path.rglob("*"))
    computing = Counter[str]()
    original = calendars._computed_sessions

    def counted(*args: object) -> pd.DataFrame:
        computing["calls"] += 1
        return original(*args)

    monkeypatch.setattr(calendars, "_computed_sessions", counted)
    again = calendars._cached_sessions("XNYS", first, last)
    pd.testing.assert_frame_equal(again, computed, check_freq=False)
    assert computing["calls"] == (damage != "none")
    if damage in ("none", "unwritable", "no home"):  # nothing written, nothing left behind
        assert sorted(tmp_path.rglob("*")) == files_before
    else:  # written again, whole, with no temporary file left beside it
        pd.testing.assert_frame_equal(calendars._read_sessions(kept), computed, check_freq=False)
        assert sorted(tmp_path.rglob("*")) == files_before


def test_the_completeness_gate_computes_its_sessions_instead_of_reading_the_cache(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Days without a session excuse missing data: a cached file must never decide them.
    computed = calendars.days_without_session("CMES", Month(2024, 2))

    def wrong(*args: object) -> pd.DataFrame:
        raise AssertionError("the gate read the cache")

    monkeypatch.setattr(calendars, "_read_sessions", wrong)
    monkeypatch.setattr(calendars, "_cached_sessions", wrong)
    assert calendars.days_without_session("CMES", Month(2024, 2)) == computed
    assert len(computed) == 4  # February 2024's Saturdays


# --------------------------------------------------------------------------- vendor cross-check

QQQ_DAY = Month(2023, 3)
COVERED = [pd.Timestamp("2023-03-28 11:08", tz="UTC"), pd.Timestamp("2023-03-28 11:10", tz="UTC")]


def vendor_bars(path: Path, symbol: str) -> pd.DataFrame:
    """Databento's ohlcv-1m records as a bar frame (decode_month reads ohlcv-1s only)."""
    store = databento.DBNStore.from_file(path)
    assert str(store.schema) == "ohlcv-1m"
    rec = store.to_ndarray()
    bars = make_bars(
        rec["ts_event"].astype("int64"),
        symbol,
        rec["instrument_id"],
        *(rec[c] / PRICE_SCALE for c in ("open", "high", "low", "close")),
        rec["volume"],
    )
    return sort_bars(bars)


def qqq_sample() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(raw 1s bars, our 1min bars, Databento's 1m bars) of the real QQQ sample."""
    raw = decode_month([SAMPLES / "test_data.ohlcv-1s.dbn.zst"], "QQQ", QQQ_DAY).bars
    vendor = vendor_bars(SAMPLES / "test_data.ohlcv-1m.dbn.zst", "QQQ")
    return raw, aggregate_bars(raw, MINUTE), vendor


def test_vendor_cross_check_passes_on_the_covered_minutes_of_the_real_sample() -> None:
    raw, ours, vendor = qqq_sample()
    result = check_vendor(ours, vendor, covered_minutes=COVERED, month=QQQ_DAY)
    assert result.passed, result.description
    assert result.extra["compared"] == 2 and result.extra["covered_minutes"] == 2
    assert failing(run_aggregated_rules(ours, raw, QQQ_DAY, MINUTE)) == set()


def test_vendor_cross_check_without_coverage_flags_minutes_the_1s_file_lacks() -> None:
    _, ours, vendor = qqq_sample()
    result = check_vendor(ours, vendor)
    # The 1s sample stops at 11:11:22; Databento's 1m file goes on to 11:19.
    assert (result.passed, result.violations, result.extra["missing_here"]) == (False, 1, 1)
    (row,) = result.sample.to_dict("records")
    assert row["ts_event"] == pd.Timestamp("2023-03-28 11:19", tz="UTC")
    assert row["problem"] == "missing here (Databento has this bar)"
    assert row["volume"] is None and row["volume_databento"] == 262


def test_vendor_cross_check_fails_on_one_changed_value() -> None:
    _, ours, vendor = qqq_sample()
    at = vendor["ts_event"] == COVERED[1]
    vendor.loc[at, "close"] = vendor.loc[at, "close"] + 0.01
    result = check_vendor(ours, vendor, covered_minutes=COVERED)
    assert (result.passed, result.violations, result.extra["differing"]) == (False, 1, 1)
    assert result.blocking
    assert "1 one-minute bar disagreeing with Databento's own 1-minute bars" in result.description
    (row,) = result.sample.to_dict("records")
    assert row["problem"] == "differs from Databento in close"
    assert (row["close"], row["close_databento"]) == (307.96, 307.96 + 0.01)


def test_vendor_cross_check_fails_on_a_minute_missing_here() -> None:
    _, ours, vendor = qqq_sample()
    ours = ours[ours["ts_event"] != COVERED[0]]
    result = check_vendor(ours, vendor, covered_minutes=COVERED)
    assert (result.violations, result.extra["missing_here"], result.extra["compared"]) == (1, 1, 1)


def test_vendor_cross_check_refuses_covered_times_that_are_not_minutes() -> None:
    _, ours, vendor = qqq_sample()
    with pytest.raises(ValueError, match="whole minutes"):
        check_vendor(ours, vendor, covered_minutes=["2023-03-28 11:08:30+00:00"])


# --------------------------------------------------------------------------- markdown


def test_sample_markdown_is_a_small_table_with_a_count_of_what_is_not_shown() -> None:
    frame = raw_es()
    frame.loc[100:149, "open"] = 0.0
    result = check_schema(frame)
    table = result.sample_markdown()
    lines = table.splitlines()
    assert lines[0] == "| column | check | failure_case | row |"
    assert lines[1] == "|---|---|---|---|"
    assert lines[2] == "| open | greater_than(0) | 0.0 | 100 |"
    assert len([x for x in lines if x.startswith("| ")]) == 1 + SAMPLE_ROWS
    assert lines[-1] == "(first 10 of 50)"
    assert frame_markdown(pd.DataFrame({"a|b": ["x|y"]})) == "| a\\|b |\n|---|\n| x\\|y |"


@pytest.mark.parametrize("dataset", ["IFEU.IMPACT", "NDEX.IMPACT"])
def test_calendar_is_skipped_and_says_why_when_no_calendar_fits_the_venue(dataset: str) -> None:
    venue = dataclasses.replace(ES, symbol="BRN", dataset=dataset)
    results = by_rule(run_raw_rules(raw_es(), MARCH, venue))
    calendar = results[RULE_CALENDAR]
    # Not a silent pass: a (non-blocking) warning that names the reason.
    assert not calendar.passed and not calendar.blocking and calendar.severity == WARN
    assert calendar.extra["skipped"] is True and calendar.violations == 0
    assert f"no exchange calendar fits dataset {dataset}" in calendar.description
    assert "calendar =" in calendar.description and "[instruments.BRN]" in calendar.description
    assert failing(list(results.values())) == {RULE_CALENDAR}


def test_a_calendar_named_in_the_catalog_is_the_one_checked() -> None:
    london = dataclasses.replace(ES, symbol="BRN", dataset="IFEU.IMPACT", calendar="XLON")
    result = by_rule(run_raw_rules(every_ten_minutes(MARCH), MARCH, london))[RULE_CALENDAR]
    assert result.passed and result.extra["calendar"] == "XLON"
    assert "XLON trading sessions of 2024-03" in result.description


def test_negative_prices_are_refused_unless_the_catalog_says_they_are_real():
    # Crude oil on 2020-04-20 settled at -37.63: right data, which the schema rule takes for
    # corrupt unless the instrument's catalog entry says it trades at or below zero.
    cl = dataclasses.replace(ES, symbol="CL", request_symbol="CL.c.0", tick=0.01)
    month = Month(2020, 4)
    start = pd.Timestamp("2020-04-20 18:29:00", tz="UTC").value
    ts = start + np.arange(30, dtype=np.int64) * 1_000_000_000
    price = np.linspace(-37.50, -37.63, 30).round(2)
    ids = np.ones(30, dtype=np.uint32)
    raw = make_bars(ts, "CL", ids, price, price, price, price, np.full(30, 5, dtype=np.uint64))

    (refused,) = [r for r in run_raw_rules(raw, month, cl) if r.blocking]
    assert refused.rule == RULE_SCHEMA and "open not above 0 (30)" in refused.description
    assert "set negative_prices = true in its catalog entry" in refused.description

    real = dataclasses.replace(cl, negative_prices=True)
    assert not [r for r in run_raw_rules(raw, month, real) if r.blocking]
    bars = aggregate_bars(raw, parse_timeframe("15s"))
    results = run_aggregated_rules(bars, raw, month, parse_timeframe("15s"), negative_prices=True)
    assert [r.rule for r in results if not r.passed] == []
    # Anything else the rule checks still fails: a missing price is not a negative one.
    broken = raw.copy()
    broken.loc[3, "close"] = np.nan
    (schema,) = [r for r in run_raw_rules(broken, month, real) if r.rule == RULE_SCHEMA]
    assert not schema.passed and "close missing values (1)" in schema.description
