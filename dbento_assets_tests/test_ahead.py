"""Work begun ahead on a frame (core.ahead): served to that very frame only, unchanged, once."""

from __future__ import annotations

import threading
import weakref

import numpy as np
import pandas as pd
import pytest

from dbento_assets.core import ahead, comparison, run_rules
from dbento_assets.core.aggregate import aggregate_many, built_from
from dbento_assets.core.bars import make_bars
from dbento_assets.core.catalog import DEFAULT_CATALOG, load_catalog
from dbento_assets.core.dbn import decode_month, encode_month
from dbento_assets.core.demo import generate_month_records
from dbento_assets.core.months import Month
from dbento_assets.core.rules import RULE_RECONCILED
from dbento_assets.core.timeframes import parse_timeframe

MARCH = Month(2024, 3)  # the demo ES rolls inside it: two instruments
SECOND = 1_000_000_000


def bars(rows: int = 5000) -> pd.DataFrame:
    ts = MARCH.start_ns + np.arange(rows, dtype=np.int64) * SECOND
    price = 100 + np.arange(rows) * 0.25
    return make_bars(ts, "ES", np.full(rows, 7), price, price, price, price, np.ones(rows))


def closes(frame: pd.DataFrame) -> np.ndarray:
    """The preparation (in the caller's thread): the arrays the work reads."""
    return frame["close"].to_numpy()


def total(close: np.ndarray) -> float:
    return float(close.sum())


def total_close(frame: pd.DataFrame) -> float:
    return total(closes(frame))


def settled() -> None:
    """Wait until the one worker has done what it was given."""
    ahead._WORKER.submit(lambda: None).result()


def test_work_begun_on_a_frame_is_taken_once_by_that_frame_and_kind_only() -> None:
    frame = bars()
    ahead.begin(frame, "sum", closes, total)
    assert ahead.take(frame.copy(), "sum") is None  # an equal copy is another frame
    assert ahead.take(frame, "other kind") is None
    taken = ahead.take(frame, "sum")
    assert taken is not None and taken.result() == total_close(frame)
    assert ahead.take(frame, "sum") is None  # it served one caller


def test_the_work_runs_beside_the_caller() -> None:
    started, release = threading.Event(), threading.Event()

    def waits(close: np.ndarray) -> int:
        started.set()
        assert release.wait(10)
        return threading.get_ident()

    frame = bars()
    ahead.begin(frame, "thread", closes, waits)
    assert started.wait(10)  # begun while this thread goes on
    release.set()
    taken = ahead.take(frame, "thread")
    assert taken is not None and taken.result() != threading.get_ident()


@pytest.mark.parametrize("change", ["a value set in place", "a column replaced", "rows dropped"])
def test_a_frame_changed_after_its_work_began_gets_none(
    change: str,
) -> None:
    frame = bars()
    ahead.begin(frame, "sum", closes, total)
    settled()
    if change == "a value set in place":
        frame.loc[0, "close"] = 1e6
    elif change == "a column replaced":
        frame["close"] = frame["close"] * 2
    else:
        frame.drop(index=[3], inplace=True)
    assert ahead.take(frame, "sum") is None


def test_a_value_set_in_place_while_the_work_runs_does_not_reach_it() -> None:
    # The work reads a shallow copy: pandas copies the column the caller writes into.
    started, release = threading.Event(), threading.Event()

    def slow_sum(close: np.ndarray) -> float:
        started.set()
        assert release.wait(10)
        return total(close)

    frame = bars()
    before = total_close(frame)
    ahead.begin(frame, "sum", closes, slow_sum)
    running = ahead._BEGUN[(id(frame), "sum")].future
    assert started.wait(10)
    frame.loc[0, "close"] = 1e6
    release.set()
    assert running.result() == before  # the frame as it was when the work began
    assert ahead.take(frame, "sum") is None  # and the caller is told to compute afresh


def test_what_the_preparation_raises_is_raised_and_nothing_is_begun() -> None:
    frame = bars().drop(columns=["close"])
    with pytest.raises(KeyError, match="close"):
        ahead.begin(frame, "sum", closes, total)
    assert (id(frame), "sum") not in ahead._BEGUN and ahead.take(frame, "sum") is None


def test_a_frame_of_a_column_kind_not_known_here_is_never_served() -> None:
    frame = bars().assign(note=pd.array([1] * 5000, dtype="Int64"))  # a masked column
    ahead.begin(frame, "sum", closes, total)
    assert ahead.take(frame, "sum") is None


def test_python_stored_strings_and_a_changed_dtype_are_never_served() -> None:
    # pyarrow copies Python-stored strings into buffers it frees at once, so their addresses
    # can repeat after a change; a column whose dtype changed keeps its memory.
    frame = bars().assign(symbol=lambda f: f["symbol"].astype(pd.StringDtype("python")))
    ahead.begin(frame, "sum", closes, total)
    assert ahead.take(frame, "sum") is None
    frame = bars()
    ahead.begin(frame, "sum", closes, total)
    settled()
    frame["ts_event"] = frame["ts_event"].dt.tz_convert("America/New_York")
    assert ahead.take(frame, "sum") is None


def test_work_not_begun_yet_on_a_dropped_or_changed_frame_is_skipped() -> None:
    release = threading.Event()
    blocker = ahead._WORKER.submit(release.wait, 10)  # the one worker is busy
    ran: list[str] = []

    def noted(close: np.ndarray) -> float:
        ran.append("ran")
        return total(close)

    dropped, changed = bars(), bars()
    ahead.begin(dropped, "sum", closes, noted)
    ahead.begin(changed, "sum", closes, noted)
    del dropped
    changed["close"] = changed["close"] + 1
    assert ahead.take(changed, "sum") is None
    release.set()
    blocker.result()
    settled()
    assert ran == []


def take_in_a_forked_child(parent_frame: pd.DataFrame) -> None:
    # Work the parent began (still waiting in its worker) is not the child's to take, and
    # the child's own work runs in a worker of its own.
    assert ahead.take(parent_frame, "sum") is None
    frame = bars(100)
    ahead.begin(frame, "sum", closes, total)
    taken = ahead.take(frame, "sum")
    assert taken is not None and taken.result(timeout=20) == total_close(frame)


def test_a_process_forked_while_work_is_pending_takes_only_its_own() -> None:
    import multiprocessing

    release = threading.Event()
    blocker = ahead._WORKER.submit(release.wait, 30)
    frame = bars()
    ahead.begin(frame, "sum", closes, total)  # pending behind the blocker
    child = multiprocessing.get_context("fork").Process(
        target=take_in_a_forked_child, args=(frame,)
    )
    child.start()
    child.join(30)
    if child.exitcode is None:
        child.kill()
    release.set()
    blocker.result()
    assert child.exitcode == 0
    taken = ahead.take(frame, "sum")
    assert taken is not None and taken.result() == total_close(frame)


def test_work_on_a_frame_that_is_dropped_goes_with_it() -> None:
    frame = bars()
    ahead.begin(frame, "sum", closes, total)
    settled()
    key = (id(frame), "sum")
    assert key in ahead._BEGUN
    kept = weakref.ref(frame)
    del frame
    assert kept() is None and key not in ahead._BEGUN


def test_nothing_is_begun_once_the_worker_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    from concurrent.futures import ThreadPoolExecutor

    stopped = ThreadPoolExecutor(max_workers=1)
    stopped.shutdown()  # as the interpreter's exit leaves it
    monkeypatch.setattr(ahead, "_WORKER", stopped)
    frame = bars()
    ahead.begin(frame, "sum", closes, total)
    assert ahead.take(frame, "sum") is None


# --------------------------------------------------------------------------- reconciliation


def demo_month() -> pd.DataFrame:
    instrument = load_catalog(DEFAULT_CATALOG).instrument("ES")
    records = generate_month_records(instrument, MARCH, activity=0.02)
    return decode_month([encode_month(records, instrument, MARCH)], "ES", MARCH).bars


@pytest.mark.parametrize("from_finer", [False, True], ids=["from-raw", "from-raw-and-finer"])
def test_reconciliation_takes_its_recomputations_begun_ahead(
    monkeypatch: pytest.MonkeyPatch, from_finer: bool
) -> None:
    given: list[tuple[str, list[type]]] = []  # what the recomputation was handed, and where
    expected = comparison._expected

    def arrays_only(arrays: tuple, timeframe) -> pd.DataFrame:
        ts, iid, values, symbol = arrays
        kinds = [type(a) for a in (ts, iid, *values.values(), symbol)]
        given.append((threading.current_thread().name.split("_")[0], kinds))
        return expected(arrays, timeframe)

    monkeypatch.setattr(comparison, "_expected", arrays_only)
    raw = demo_month()
    timeframes = [parse_timeframe(label) for label in ("15s", "30s", "1min")]
    plan = built_from(timeframes)
    run_rules.reconcile_ahead(raw, plan)  # 15s: the one built from raw itself
    aggregated = aggregate_many(raw, timeframes)
    if from_finer:  # 30s from the 15s bars, 1min from the 30s bars
        run_rules.reconcile_ahead(raw, plan, aggregated)
    settled()
    in_caller: list[str] = []
    real = comparison.expected_bars

    def counted(source: pd.DataFrame, timeframe) -> pd.DataFrame:
        in_caller.append(timeframe.label)
        return real(source, timeframe)

    monkeypatch.setattr(comparison, "expected_bars", counted)
    proven: dict = {}
    for tf in timeframes:
        finer = proven.get(plan[tf])
        results = run_rules.run_aggregated_rules(aggregated[tf], raw, MARCH, tf, built_from=finer)
        passed = {r.rule: r.passed for r in results}
        assert all(passed.values()), passed
        proven[tf] = aggregated[tf]
    # What was begun came from the worker, which was handed arrays, never the caller's pandas
    # objects; the rest was recomputed here, from the finer bars.
    assert in_caller == ([] if from_finer else ["30s", "1min"])
    assert [where for where, _ in given] == ["dbento-ahead"] * (3 if from_finer else 1) + [
        "MainThread"
    ] * len(in_caller)
    assert all(set(kinds) <= {np.ndarray, str} for _, kinds in given)


@pytest.mark.parametrize("label", ["15s", "30s"], ids=["from-raw", "from-finer"])
def test_a_wrong_kernel_is_caught_with_the_recomputation_begun_ahead(
    monkeypatch: pytest.MonkeyPatch, label: str
) -> None:
    raw = demo_month()
    timeframes = [parse_timeframe(x) for x in ("15s", "30s")]
    plan = built_from(timeframes)
    tf = parse_timeframe(label)
    run_rules.reconcile_ahead(raw, plan)
    aggregated = aggregate_many(raw, timeframes)
    run_rules.reconcile_ahead(raw, plan, aggregated)
    settled()

    def not_here(source: pd.DataFrame, timeframe) -> pd.DataFrame:
        raise AssertionError("recomputed in the caller instead of taking the worker's")

    monkeypatch.setattr(comparison, "expected_bars", not_here)
    finer = None if plan[tf] is None else aggregated[plan[tf]]
    wrong = aggregated[tf]
    wrong.loc[10, "high"] = wrong.loc[10, "high"] + 0.25  # a kernel off on one bar
    results = run_rules.run_aggregated_rules(wrong, raw, MARCH, tf, built_from=finer)
    reconciled = next(r for r in results if r.rule == RULE_RECONCILED)
    assert not reconciled.passed and reconciled.extra["differing_bars"] == 1
    source = raw if finer is None else finer
    assert ahead.take(source, ("expected bars", tf.nanos)) is None  # it was taken
