"""Tests of the demo source: deterministic, realistic synthetic ohlcv-1s months as real DBN.

Everything is read back through the real decoding path (``decode_month``) or the real
``databento`` client, and trading hours are checked against pandas' own time-zone conversion,
so the generator's calendar arithmetic is not trusted to check itself.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import itertools
import os
import subprocess
import sys
import warnings
from dataclasses import dataclass, replace
from functools import cache

import databento
import exchange_calendars as xcals
import numpy as np
import pandas as pd
import pytest
from databento.common.symbology import InstrumentMap

from dbento_assets.core.catalog import Instrument, calendar_for
from dbento_assets.core.dbn import OHLCV_RECORD_DTYPE, PRICE_SCALE, decode_month
from dbento_assets.core.demo import (
    DemoSource,
    demo_contract_schedule,
    generate_month_records,
)
from dbento_assets.core.months import Month
from dbento_assets.core.rules import RULE_CALENDAR
from dbento_assets.core.run_rules import run_raw_rules
from dbento_assets.core.source import FetchedMonth, FetchRequest, SourceError, origin_of

INSTRUMENTS = {
    "ES": Instrument("ES", "GLBX.MDP3", "ES.v.0", "continuous", 0.25, "future"),
    "NQ": Instrument("NQ", "GLBX.MDP3", "NQ.v.0", "continuous", 0.25, "future"),
    "GC": Instrument("GC", "GLBX.MDP3", "GC.v.0", "continuous", 0.10, "future"),
    "SPY": Instrument("SPY", "EQUS.MINI", "SPY", "raw_symbol", 0.01, "equity"),
    "QQQ": Instrument("QQQ", "EQUS.MINI", "QQQ", "raw_symbol", 0.01, "equity"),
}
NOMINAL_LEVEL = {"ES": 4800.0, "NQ": 17000.0, "GC": 2050.0, "SPY": 480.0, "QQQ": 410.0}
SECOND = 1_000_000_000


LOGS: dict[tuple[str, str], list[str]] = {}


@cache
def fetched(symbol: str, month: str) -> FetchedMonth:
    """One DemoSource fetch per partition for the whole module (its log kept in LOGS)."""
    request = FetchRequest(INSTRUMENTS[symbol], Month.parse(month))
    return DemoSource().fetch(request, LOGS.setdefault((symbol, month), []).append)


@cache
def generated(symbol: str, month: str, activity: float = 1.0) -> np.ndarray:
    return generate_month_records(INSTRUMENTS[symbol], Month.parse(month), activity)


@cache
def bars(symbol: str, month: str) -> pd.DataFrame:
    answer = fetched(symbol, month)
    return decode_month(answer.payloads, symbol, Month.parse(month), answer.instrument_ids).bars


def records_of(payload: bytes) -> np.ndarray:
    # A BytesIO, not bytes: the client stores repr(bytes) as the source name, which costs
    # 0.3 s and hundreds of MB on a 57 MB payload.
    return databento.DBNStore.from_bytes(io.BytesIO(payload)).to_ndarray()


@dataclass
class LocalClock:
    """Wall-clock facts of each bar in a time zone, by pandas' own tz conversion."""

    days: np.ndarray  # local calendar day, as days since 1970-01-01
    weekday: np.ndarray  # Monday = 0
    minutes: np.ndarray  # minutes after local midnight

    def per_day(self, values: np.ndarray, reduce: np.ufunc) -> dict[int, int]:
        """``reduce`` over each local day's values (bars are sorted, so days are runs)."""
        unique, first = np.unique(self.days, return_index=True)
        return dict(zip(unique.tolist(), reduce.reduceat(values, first).tolist(), strict=True))


def local_clock(frame: pd.DataFrame, tz: str) -> LocalClock:
    wall = pd.DatetimeIndex(frame["ts_event"]).tz_convert(tz).tz_localize(None).asi8
    days = wall // (86_400 * SECOND)
    return LocalClock(days, (days + 3) % 7, (wall % (86_400 * SECOND)) // (60 * SECOND))


def local_instant(day: int, hours: int, tz: str) -> pd.Timestamp:
    """``hours`` o'clock local time on local day number ``day``."""
    return pd.Timestamp(day, unit="D").tz_localize(tz) + pd.Timedelta(hours=hours)


def within(window: Month, day: int, start_hour: int, end_hour: int, tz: str) -> bool:
    """Whether local ``[start_hour, end_hour)`` of ``day`` lies inside the month window."""
    return (
        local_instant(day, start_hour, tz) >= window.start
        and local_instant(day, end_hour, tz) <= window.end
    )


@cache
def calendar_days(calendar: str, tz: str) -> tuple[frozenset[int], frozenset[int]]:
    """Local day numbers on which a session opens at its usual time, and those on which a
    session closes at its usual time (so not a holiday, not an early close), in 2024."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pd.errors.Pandas4Warning)
        schedule = xcals.get_calendar(calendar).schedule.loc["2023-12-01":"2025-01-31"]
    opens = pd.DatetimeIndex(schedule["open"]).tz_convert(tz)
    closes = pd.DatetimeIndex(schedule["close"]).tz_convert(tz)
    usual_open = opens.hour == opens.hour.to_series().mode()[0]
    usual_close = closes.hour == closes.hour.to_series().mode()[0]
    day = pd.Timedelta(days=1)
    as_days = lambda index: (index.tz_localize(None).normalize() - pd.Timestamp(0)) // day  # noqa: E731
    return frozenset(as_days(opens[usual_open])), frozenset(as_days(closes[usual_close]))


# --- determinism ------------------------------------------------------------------------------


def test_same_partition_gives_identical_bytes_and_other_partitions_differ() -> None:
    request = FetchRequest(INSTRUMENTS["ES"], Month(2024, 3))
    first = DemoSource().fetch(request, lambda _m: None).payloads[0]
    second = fetched("ES", "2024-03").payloads[0]  # another DemoSource instance
    assert isinstance(first, bytes)
    assert first == second

    march = records_of(first)
    for other in (fetched("ES", "2024-02"), fetched("NQ", "2024-03")):
        rec = records_of(other.payloads[0])
        n = min(len(rec), len(march))
        assert not np.array_equal(rec["ts_event"][:n], march["ts_event"][:n])
        assert not np.array_equal(rec["close"][:n], march["close"][:n])


def test_generator_does_not_depend_on_the_process_hash_seed() -> None:
    # The seed comes from hashlib; Python's salted hash() or set order would show up here.
    code = (
        "import hashlib;"
        "from dbento_assets.core.catalog import Instrument;"
        "from dbento_assets.core.demo import generate_month_records;"
        "from dbento_assets.core.months import Month;"
        "i = Instrument('GC', 'GLBX.MDP3', 'GC.v.0', 'continuous', 0.1, 'future');"
        "print(hashlib.sha256(generate_month_records(i, Month(2024, 1)).tobytes()).hexdigest())"
    )
    here = hashlib.sha256(generated("GC", "2024-01").tobytes()).hexdigest()
    env = {**os.environ, "PYTHONHASHSEED": "4242"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == here


def test_more_activity_gives_a_denser_month_with_the_same_calendar() -> None:
    base = generated("ES", "2024-01")
    dense = generated("ES", "2024-01", activity=1.25)
    assert 1_150_000 <= len(dense) <= 1_500_000
    assert len(dense) > len(base)
    # The same per-second draws decide which seconds trade, so a busier month is a superset.
    assert np.isin(base["ts_event"], dense["ts_event"]).all()


@pytest.mark.parametrize("activity", [0, -1.0, float("nan"), float("inf")])
def test_bad_activity_is_refused(activity: float) -> None:
    with pytest.raises(SourceError, match="DBENTO_DEMO_ACTIVITY="):
        DemoSource(activity=activity)
    with pytest.raises(ValueError, match="activity"):
        generate_month_records(INSTRUMENTS["ES"], Month(2024, 1), activity=activity)


def test_impossible_instruments_fail_with_a_source_error() -> None:
    option = Instrument("ESO", "GLBX.MDP3", "ESO", "raw_symbol", 0.25, "option")
    with pytest.raises(SourceError, match="kind 'option'"):
        DemoSource().fetch(FetchRequest(option, Month(2024, 1)), lambda _m: None)
    tiny = Instrument("XX", "GLBX.MDP3", "XX.v.0", "continuous", 1e-12, "future")
    with pytest.raises(SourceError, match="tick"):
        DemoSource().fetch(FetchRequest(tiny, Month(2024, 1)), lambda _m: None)


# --- calendar ---------------------------------------------------------------------------------


@pytest.mark.parametrize("month", ["2024-02", "2024-03"])
def test_an_es_month_has_about_a_million_bars(month: str) -> None:
    assert 900_000 <= len(bars("ES", month)) <= 1_200_000


@pytest.mark.parametrize(("symbol", "month"), [("ES", "2024-03"), ("SPY", "2024-11")])
def test_timestamps_are_whole_seconds_inside_the_month_and_strictly_increasing(
    symbol: str, month: str
) -> None:
    frame = bars(symbol, month)
    ts = frame["ts_event"].array.asi8
    window = Month.parse(month)
    assert ts.min() >= window.start_ns
    assert ts.max() < window.end_ns
    assert (ts % SECOND == 0).all()
    # Strictly increasing overall means also per instrument, and one instrument per second.
    assert (np.diff(ts) > 0).all()
    for _iid, group in frame.groupby("instrument_id"):
        assert (np.diff(group["ts_event"].array.asi8) > 0).all()


@pytest.mark.parametrize("month", ["2024-03", "2024-11"])  # US DST starts / ends in these
def test_futures_trade_globex_hours_in_chicago_across_dst(month: str) -> None:
    tz = "America/Chicago"
    clock = local_clock(bars("ES", month), tz)
    weekday, minutes = clock.weekday, clock.minutes
    assert not (weekday == 5).any(), "a bar on Saturday"
    assert not ((weekday == 6) & (minutes < 17 * 60)).any(), "a bar before Sunday 17:00"
    assert not ((weekday == 4) & (minutes >= 16 * 60)).any(), "a bar after Friday 16:00"
    assert not ((minutes >= 16 * 60) & (minutes < 17 * 60)).any(), "a bar in the daily halt"

    # The sessions open at 17:00 and close at 16:00 local time on both sides of the DST change
    # (an hour's error would open at 16:00 or 18:00, or close at 15:00). Sessions cut by the
    # month's UTC edges are skipped.
    window = Month.parse(month)
    opens = clock.per_day(np.where(minutes >= 17 * 60, minutes, 9_999), np.minimum)
    closes = clock.per_day(np.where(minutes < 16 * 60, minutes, -1), np.maximum)
    checked_opens = checked_closes = 0
    open_days, close_days = calendar_days("CMES", tz)  # holidays and early closes: below
    for day, weekday_of_day in zip(*np.unique(clock.days, return_index=True), strict=True):
        wd = int(weekday[weekday_of_day])
        if day in open_days and wd in (6, 0, 1, 2, 3) and within(window, day, 17, 18, tz):
            assert 17 * 60 <= opens[day] < 17 * 60 + 2, f"day {day}: no 17:00 open"
            checked_opens += 1
        if day in close_days and wd in (0, 1, 2, 3, 4) and within(window, day, 15, 16, tz):
            assert closes[day] >= 15 * 60 + 58, f"day {day}: the session ends before 16:00"
            checked_closes += 1
    assert checked_opens >= 17 and checked_closes >= 17
    # Sundays: the weekend closure ends at 17:00 local, the DST Sunday included.
    sundays = [day for day in opens if (day + 3) % 7 == 6]
    assert len(sundays) >= 4

    # Dense in regular hours, sparse overnight.
    weekday_bars = weekday < 5
    rth = weekday_bars & (minutes >= 8 * 60 + 30) & (minutes < 15 * 60)
    night = weekday_bars & (minutes >= 19 * 60)
    rth_days = len(np.unique(clock.days[rth]))
    night_days = len(np.unique(clock.days[night]))
    assert rth.sum() / (rth_days * 23_400) > 0.85
    assert 0.1 < night.sum() / (night_days * 5 * 3_600) < 0.6


@pytest.mark.parametrize("month", ["2024-03", "2024-11"])
def test_equities_trade_four_to_twenty_new_york_on_weekdays(month: str) -> None:
    tz = "America/New_York"
    clock = local_clock(bars("SPY", month), tz)
    minutes = clock.minutes
    assert (clock.weekday < 5).all()
    assert (minutes >= 4 * 60).all()
    assert (minutes < 20 * 60).all()
    window = Month.parse(month)
    first = clock.per_day(minutes, np.minimum)
    last = clock.per_day(minutes, np.maximum)
    for day in first:
        if within(window, day, 4, 5, tz):
            assert first[day] < 4 * 60 + 5, f"day {day}: pre-market does not open at 04:00"
        if day in calendar_days("XNYS", tz)[1] and within(window, day, 19, 20, tz):
            assert last[day] >= 19 * 60 + 55, f"day {day}: after-hours end early"
    assert len(first) >= 20
    regular = (minutes >= 9 * 60 + 30) & (minutes < 16 * 60)
    days = len(first)
    assert regular.sum() / (days * 23_400) > 0.9
    assert (~regular).sum() / (days * (16 * 3_600 - 23_400)) < 0.4


# --- prices and volume ------------------------------------------------------------------------


@pytest.mark.parametrize("symbol", ["ES", "GC", "SPY"])
def test_prices_sit_on_the_tick_grid_and_bars_are_consistent(symbol: str) -> None:
    tick = INSTRUMENTS[symbol].tick
    month = {"ES": "2024-03", "GC": "2024-01", "SPY": "2024-11"}[symbol]
    rec = records_of(fetched(symbol, month).payloads[0])
    tick_fp = round(tick * PRICE_SCALE)
    frame = bars(symbol, month)
    for column in ("open", "high", "low", "close"):
        assert (rec[column] % tick_fp == 0).all()
        ticks = frame[column].to_numpy() / tick
        assert np.abs(ticks - np.round(ticks)).max() < 1e-9 * np.abs(ticks).max()
        assert (frame[column] > 0).all()
    o, h, lo, c = (frame[col].to_numpy() for col in ("open", "high", "low", "close"))
    assert (lo <= np.minimum(o, c)).all()
    assert (np.maximum(o, c) <= h).all()
    assert (frame["volume"] >= 1).all()
    assert frame["volume"].dtype == np.uint64
    # Each bar opens near the previous close of the same contract.
    for _iid, group in frame.groupby("instrument_id"):
        gap = np.abs(group["open"].to_numpy()[1:] - group["close"].to_numpy()[:-1]) / tick
        assert gap.max() <= 3 + 1e-9
    # Prices move: a month is not flat.
    assert len(np.unique(c)) > 100


@pytest.mark.parametrize("symbol", sorted(INSTRUMENTS))
def test_prices_start_at_plausible_levels(symbol: str) -> None:
    rec = generated(symbol, "2024-01")
    first_open = rec["open"][0] / PRICE_SCALE
    assert abs(first_open / NOMINAL_LEVEL[symbol] - 1) < 0.01
    month_range = rec["close"].max() / rec["close"].min()
    assert 1.001 < month_range < 1.6


def test_consecutive_months_join_up() -> None:
    feb, mar = bars("ES", "2024-02"), bars("ES", "2024-03")
    assert feb["instrument_id"].iloc[-1] == mar["instrument_id"].iloc[0]
    assert abs(mar["open"].iloc[0] - feb["close"].iloc[-1]) <= 3 * 0.25


def test_volume_is_heavier_in_regular_hours() -> None:
    frame = bars("ES", "2024-03")
    clock = local_clock(frame, "America/Chicago")
    weekday, minutes = clock.weekday, clock.minutes
    rth = (weekday < 5) & (minutes >= 8 * 60 + 30) & (minutes < 15 * 60)
    volume = frame["volume"].to_numpy()
    assert volume[rth].mean() > 3 * volume[~rth].mean()


def test_an_unknown_symbol_gets_a_level_from_its_tick() -> None:
    unknown = Instrument("ZB", "GLBX.MDP3", "ZB.v.0", "continuous", 0.5, "future")
    rec = generate_month_records(unknown, Month(2024, 6))
    assert len(rec) > 500_000
    assert (rec["low"] > 0).all()
    assert (rec["open"] % round(0.5 * PRICE_SCALE) == 0).all()
    assert len(np.unique(rec["instrument_id"])) == 2  # quarterly: a roll in June


# --- rolls ------------------------------------------------------------------------------------


def test_es_march_2024_rolls_once_in_the_week_before_expiry() -> None:
    frame = bars("ES", "2024-03")
    ids = frame["instrument_id"].to_numpy()
    assert len(np.unique(ids)) == 2
    switches = np.flatnonzero(ids[1:] != ids[:-1])
    assert len(switches) == 1
    ts = frame["ts_event"]
    last_old, first_new = ts.iloc[switches[0]], ts.iloc[switches[0] + 1]
    # The March contract expires on Friday 15 March; the roll happens the week before.
    assert pd.Timestamp("2024-03-04", tz="UTC") <= first_new < pd.Timestamp("2024-03-15", tz="UTC")
    assert first_new - last_old < pd.Timedelta(hours=1)  # the roll is mid-session
    # The back month trades a little above the front month (carry): a small jump up.
    jump = frame["open"].iloc[switches[0] + 1] - frame["close"].iloc[switches[0]]
    assert 2.0 <= jump <= 0.02 * frame["close"].iloc[switches[0]]

    schedule = demo_contract_schedule(INSTRUMENTS["ES"], Month(2024, 3))
    assert [c.instrument_id for c in schedule] == [ids[0], ids[-1]]
    assert [c.raw_symbol for c in schedule] == ["ESH4", "ESM4"]
    assert schedule[1].start_ns == pd.Timestamp("2024-03-07", tz="UTC").value
    assert int(last_old.value) < schedule[1].start_ns <= int(first_new.value)


def test_contract_ids_are_stable_across_months_and_rolls_follow_the_cycle() -> None:
    es = INSTRUMENTS["ES"]
    feb = demo_contract_schedule(es, Month(2024, 2))
    mar = demo_contract_schedule(es, Month(2024, 3))
    apr = demo_contract_schedule(es, Month(2024, 4))
    assert [c.raw_symbol for c in feb] == ["ESH4"]
    assert [c.raw_symbol for c in apr] == ["ESM4"]
    assert feb[0].instrument_id == mar[0].instrument_id
    assert apr[0].instrument_id == mar[1].instrument_id
    assert len(bars("ES", "2024-02")["instrument_id"].unique()) == 1
    for month in range(1, 13):  # quarterly rolls: March, June, September, December
        assert len(demo_contract_schedule(es, Month(2024, month))) == (2 if month % 3 == 0 else 1)

    gc = INSTRUMENTS["GC"]
    for month in range(1, 13):  # even-month contracts rolled near the end of the month before
        schedule = demo_contract_schedule(gc, Month(2024, month))
        if month % 2:
            assert len(schedule) == 2
            roll = pd.Timestamp(schedule[1].start_ns, tz="UTC")
            assert roll.day >= 20 and roll.dayofweek < 5
            assert schedule[0].raw_symbol[2] == "FGHJKMNQUVXZ"[month % 12]
            assert schedule[1].raw_symbol[2] == "FGHJKMNQUVXZ"[(month + 2) % 12]
        else:
            assert len(schedule) == 1

    spy = INSTRUMENTS["SPY"]
    ids = {demo_contract_schedule(spy, Month(2024, m))[0].instrument_id for m in range(1, 13)}
    assert len(ids) == 1
    assert len(bars("SPY", "2024-03")["instrument_id"].unique()) == 1


def test_decoding_with_the_fetched_ids_keeps_every_record() -> None:
    answer = fetched("ES", "2024-03")
    assert answer.instrument_ids == frozenset(
        np.unique(records_of(answer.payloads[0])["instrument_id"])
    )
    assert len(bars("ES", "2024-03")) == len(records_of(answer.payloads[0]))


# --- DBN metadata and the real client ---------------------------------------------------------


@pytest.mark.parametrize(("symbol", "month"), [("ES", "2024-03"), ("SPY", "2024-11")])
def test_dbn_metadata_and_symbology_match_the_records(symbol: str, month: str) -> None:
    instrument = INSTRUMENTS[symbol]
    window = Month.parse(month)
    store = databento.DBNStore.from_bytes(io.BytesIO(fetched(symbol, month).payloads[0]))
    assert store.dataset == instrument.dataset
    assert str(store.schema) == "ohlcv-1s"
    assert str(store.stype_in) == instrument.stype_in
    assert str(store.stype_out) == "instrument_id"
    assert store.start == window.start
    assert store.end == window.end
    assert store.symbols == [instrument.request_symbol]

    intervals = store.symbology["mappings"][instrument.request_symbol]
    assert intervals[0]["start_date"] == window.start.date()
    assert intervals[-1]["end_date"] == window.end.date()
    for before, after in itertools.pairwise(intervals):
        assert before["end_date"] == after["start_date"]

    rec = store.to_ndarray()
    assert {int(i["symbol"]) for i in intervals} == set(np.unique(rec["instrument_id"]).tolist())
    # Every (instrument_id, UTC date) of the records resolves to the request symbol through the
    # client's own instrument map.
    dates = rec["ts_event"].astype("datetime64[ns]").astype("datetime64[D]")
    pairs = np.unique(
        np.stack([rec["instrument_id"].astype("uint64"), dates.view("uint64")], 1), axis=0
    )
    imap = InstrumentMap()
    imap.insert_metadata(store.metadata)
    resolved = imap.resolve_many(pairs[:, 0], pairs[:, 1].view("datetime64[D]"))
    assert set(resolved.tolist()) == {instrument.request_symbol}

    publisher = {"GLBX.MDP3": 1, "EQUS.MINI": 95}[instrument.dataset]
    assert (rec["publisher_id"] == publisher).all()


def test_the_real_client_decodes_the_generated_records_exactly() -> None:
    month = Month(2024, 3)
    expected = generate_month_records(INSTRUMENTS["ES"], month)  # not the fetch's own array
    assert expected.dtype == OHLCV_RECORD_DTYPE
    decoded = records_of(fetched("ES", "2024-03").payloads[0])
    assert len(decoded) == len(expected)
    for name in OHLCV_RECORD_DTYPE.names:
        assert np.array_equal(decoded[name], expected[name]), name
    frame = bars("ES", "2024-03")
    assert np.array_equal(frame["ts_event"].array.asi8, expected["ts_event"].astype("int64"))
    assert np.array_equal(frame["close"].to_numpy(), expected["close"] / PRICE_SCALE)
    assert np.array_equal(frame["volume"].to_numpy(), expected["volume"])
    assert (frame["symbol"] == "ES").all()


def test_a_compressed_payload_decodes_to_the_same_records() -> None:
    request = FetchRequest(INSTRUMENTS["GC"], Month(2024, 1))
    packed = DemoSource(compress=True).fetch(request, lambda _m: None).payloads[0]
    plain = fetched("GC", "2024-01").payloads[0]
    assert isinstance(packed, bytes)
    assert len(packed) < len(plain) / 2
    assert np.array_equal(records_of(packed), records_of(plain))


def test_fetch_marks_the_month_synthetic_and_logs_it() -> None:
    answer = fetched("GC", "2024-01")
    messages = LOGS[("GC", "2024-01")]
    assert DemoSource.name == "demo"
    assert origin_of(DemoSource.name) == "synthetic"
    assert answer.metadata["source"] == "demo"
    assert answer.metadata["synthetic"] is True
    assert "not market data" in answer.metadata["note"]
    contracts = answer.metadata["contracts"]
    assert [c["raw_symbol"] for c in contracts] == ["GCG4", "GCJ4"]
    assert {c["instrument_id"] for c in contracts} == answer.instrument_ids
    assert contracts[0]["start_date"] == dt.date(2024, 1, 1).isoformat()
    assert contracts[-1]["end_date"] == dt.date(2024, 2, 1).isoformat()
    assert answer.metadata["records"] == len(records_of(answer.payloads[0]))
    assert len(messages) == 1 and "SYNTHETIC" in messages[0] and "GC" in messages[0]


def test_the_demo_follows_the_exchange_calendar() -> None:
    """No trading on a holiday, none after an early close, and so calendar_complete passes."""
    chicago = pd.DatetimeIndex(bars("ES", "2024-01")["ts_event"]).tz_convert("America/Chicago")
    new_year = (chicago >= pd.Timestamp("2023-12-29 16:00", tz="America/Chicago")) & (
        chicago < pd.Timestamp("2024-01-01 17:00", tz="America/Chicago")
    )
    assert not new_year.any(), "a bar on the CME's New Year holiday"
    assert chicago[0] >= pd.Timestamp("2024-01-01 17:00", tz="America/Chicago")

    es = pd.DatetimeIndex(bars("ES", "2024-11")["ts_event"]).tz_convert("America/Chicago")
    thanksgiving = (es >= pd.Timestamp("2024-11-28 12:00", tz="America/Chicago")) & (
        es < pd.Timestamp("2024-11-28 17:00", tz="America/Chicago")
    )
    assert not thanksgiving.any(), "a bar after the Thanksgiving early close (12:00 Chicago)"
    assert (es.date == dt.date(2024, 11, 28)).any()  # the morning trades

    spy = pd.DatetimeIndex(bars("SPY", "2024-11")["ts_event"]).tz_convert("America/New_York")
    assert not (spy.date == dt.date(2024, 11, 28)).any(), "a bar on Thanksgiving (NYSE closed)"
    friday = spy[spy.date == dt.date(2024, 11, 29)]
    assert len(friday) and friday.max() < pd.Timestamp("2024-11-29 13:00", tz="America/New_York")

    for symbol, month in (("ES", "2024-01"), ("ES", "2024-11"), ("SPY", "2024-11")):
        instrument = INSTRUMENTS[symbol]
        results = run_raw_rules(bars(symbol, month), Month.parse(month), instrument)
        (calendar,) = [r for r in results if r.rule == RULE_CALENDAR]
        assert calendar.passed, (symbol, month, calendar.description)
        assert calendar.extra["calendar"] == calendar_for(instrument)


@pytest.mark.parametrize(("calendar", "dataset"), [("none", "GLBX.MDP3"), (None, "IFEU.IMPACT")])
def test_an_instrument_without_a_calendar_still_gets_demo_bars(calendar, dataset) -> None:
    # calendar = "none" or a venue without one (the check then says it was skipped): the demo
    # trades on the kind's usual days instead of failing.
    es = replace(INSTRUMENTS["ES"], dataset=dataset, calendar=calendar)
    assert calendar_for(es) is None
    records = generate_month_records(es, Month(2024, 1), activity=0.05)
    expected = generate_month_records(replace(es, calendar="CMES"), Month(2024, 1), activity=0.05)
    assert len(records) > 0 and np.array_equal(records, expected)
