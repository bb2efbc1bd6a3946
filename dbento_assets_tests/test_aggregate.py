"""Property and edge tests for the aggregation kernel against a pandas resample oracle."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dbento_assets.core import aggregate
from dbento_assets.core.aggregate import aggregate_bars, aggregate_many
from dbento_assets.core.bars import COLUMNS, DTYPES, make_bars, sort_bars
from dbento_assets.core.months import Month
from dbento_assets.core.timeframes import Timeframe, parse_timeframe

NS = 1_000_000_000
TIMEFRAMES = [parse_timeframe(t) for t in ("2s", "15s", "30s", "45s", "1min", "5min", "1h")]


def oracle(bars: pd.DataFrame, timeframe: Timeframe) -> pd.DataFrame:
    """What the seed scripts did, per instrument: resample(label/closed left) + dropna."""
    pieces = []
    for iid, group in bars.groupby("instrument_id", sort=True):
        res = (
            group.set_index("ts_event")
            .resample(timeframe.pandas_freq, label="left", closed="left", origin="epoch")
            .agg({"open": "first", "high": "max", "low": "min", "close": "last", "volume": "sum"})
            .dropna(subset=["open"])
            .reset_index()
        )
        res["instrument_id"] = iid
        pieces.append(res)
    out = pd.concat(pieces, ignore_index=True)
    out["symbol"] = bars["symbol"].iloc[0]
    out = out[list(COLUMNS)].astype(DTYPES)
    return sort_bars(out)


def random_bars(draw_seed: int, n: int, n_instruments: int, month: Month) -> pd.DataFrame:
    rng = np.random.default_rng(draw_seed)
    span = month.end_ns - month.start_ns
    # Cluster seconds near both month edges and spread the rest, so edge bins get exercised.
    edge = rng.integers(0, 120, size=n) * NS
    spread = rng.integers(0, span // NS, size=n) * NS
    where = rng.integers(0, 3, size=n)
    ts = np.where(
        where == 0,
        month.start_ns + edge,
        np.where(where == 1, month.end_ns - NS - edge, month.start_ns + spread),
    )
    iid = rng.integers(100, 100 + n_instruments, size=n).astype("uint32")
    pairs = np.unique(
        np.stack([ts, iid.astype("int64")], axis=1), axis=0
    )  # one bar per second per instrument
    ts, iid = pairs[:, 0], pairs[:, 1].astype("uint32")
    m = len(ts)
    ticks_open = rng.integers(18000, 18100, size=m)
    ticks_close = rng.integers(18000, 18100, size=m)
    hi = np.maximum(ticks_open, ticks_close) + rng.integers(0, 3, size=m)
    lo = np.minimum(ticks_open, ticks_close) - rng.integers(0, 3, size=m)
    frame = make_bars(
        ts,
        "ES",
        iid,
        ticks_open * 0.25,
        hi * 0.25,
        lo * 0.25,
        ticks_close * 0.25,
        rng.integers(0, 50, size=m),
    )
    return frame.sample(frac=1.0, random_state=draw_seed % 1000).reset_index(drop=True)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 400),
    n_instruments=st.integers(1, 3),
    month=st.sampled_from([Month(2024, 1), Month(2024, 2), Month(2023, 12), Month(2024, 3)]),
    timeframe=st.sampled_from(TIMEFRAMES),
    presorted=st.booleans(),
)
def test_kernel_equals_resample_oracle(seed, n, n_instruments, month, timeframe, presorted):
    bars = random_bars(seed, n, n_instruments, month)
    if presorted:
        bars = sort_bars(bars)
    got = aggregate_bars(bars, timeframe)
    pd.testing.assert_frame_equal(got, oracle(bars, timeframe), check_exact=True)


def test_roll_never_mixes_instruments_in_one_bar():
    # Contract 1 trades until 12:00:07, contract 2 from 12:00:05: the 15s bin at 12:00:00
    # holds both, so it must become two bars, one per instrument.
    base = pd.Timestamp("2024-03-14T12:00:00Z").value
    ts = np.array([0, 3, 7, 5, 9, 20]) * NS + base
    iid = np.array([1, 1, 1, 2, 2, 2])
    bars = sort_bars(
        make_bars(
            ts,
            "ES",
            iid,
            [10, 11, 12, 20, 21, 22],
            [10, 11, 12, 20, 21, 22],
            [10, 11, 12, 20, 21, 22],
            [10, 11, 12, 20, 21, 22],
            [1, 1, 1, 5, 5, 5],
        )
    )
    out = aggregate_bars(bars, parse_timeframe("15s"))
    assert list(out["instrument_id"]) == [1, 2, 2]
    assert list(out["open"]) == [10.0, 20.0, 22.0]
    assert list(out["close"]) == [12.0, 21.0, 22.0]
    assert list(out["volume"]) == [3, 10, 5]
    assert (out["ts_event"] == pd.Timestamp("2024-03-14T12:00:00Z")).sum() == 2


def test_last_second_of_month_is_its_own_bar_and_labelled_at_bin_open():
    month = Month(2024, 1)
    ts = np.array([month.end_ns - NS, month.end_ns - 40 * NS])
    bars = sort_bars(
        make_bars(ts, "ES", [1, 1], [1.0, 2.0], [1.0, 2.0], [1.0, 2.0], [1.0, 2.0], [4, 6])
    )
    out = aggregate_bars(bars, parse_timeframe("1min"))
    assert list(out["ts_event"]) == [pd.Timestamp("2024-01-31T23:59:00Z")]
    assert out["volume"].tolist() == [10]
    assert out["open"].tolist() == [2.0] and out["close"].tolist() == [1.0]


def test_empty_input_and_dtypes():
    out = aggregate_bars(
        make_bars(np.array([], dtype="int64"), "ES", [], [], [], [], [], []), parse_timeframe("15s")
    )
    assert len(out) == 0
    assert dict(out.dtypes) == dict(DTYPES)


def test_refuses_two_symbols():
    a = make_bars(np.array([0]), "ES", [1], [1.0], [1.0], [1.0], [1.0], [1])
    b = make_bars(np.array([0]), "NQ", [2], [1.0], [1.0], [1.0], [1.0], [1])
    with pytest.raises(ValueError, match="one symbol"):
        aggregate_bars(pd.concat([a, b], ignore_index=True), parse_timeframe("15s"))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 400),
    n_instruments=st.integers(1, 3),
    month=st.sampled_from([Month(2024, 1), Month(2024, 2), Month(2023, 12)]),
    timeframes=st.sets(st.sampled_from(TIMEFRAMES), min_size=1),
)
def test_cascade_equals_each_timeframe_from_the_seconds(seed, n, n_instruments, month, timeframes):
    # aggregate_many builds 30s from 15s, 1min from 30s, 5min from 1min...: the result must
    # be exactly what aggregating the 1-second bars directly gives, for every timeframe.
    bars = random_bars(seed, n, n_instruments, month)
    got = aggregate_many(bars, timeframes)
    assert set(got) == set(timeframes)
    for timeframe in timeframes:
        pd.testing.assert_frame_equal(got[timeframe], aggregate_bars(bars, timeframe))


@pytest.mark.parametrize("block", [1, 2, 3, 7])
def test_bar_boundaries_are_found_across_computation_blocks(monkeypatch, block):
    # The kernel finds where bars start in fixed-size blocks of rows; a bar (or a roll)
    # straddling two blocks must come out the same as with one block for everything.
    bars = sort_bars(random_bars(11, 300, 2, Month(2024, 1)))
    expected = {tf: oracle(bars, tf) for tf in TIMEFRAMES}
    monkeypatch.setattr(aggregate, "_BLOCK", block)
    for timeframe, want in expected.items():
        pd.testing.assert_frame_equal(aggregate_bars(bars, timeframe), want, check_exact=True)
