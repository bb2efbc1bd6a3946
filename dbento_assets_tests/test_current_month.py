"""Issue 13: the current month, kept up to date and paid for once.

A month's whole life runs through Dagster and the real ``databento`` client against the test
gateway, whose available end is moved forward between runs (``gateway.set_range``): three
top-ups while the month is open, then the close. The gateway's request log proves that no
second is bought twice (the ``get_range`` windows follow one another without overlap and
together make the month; the bytes billed add up to the month's once), the metadata and the
files' own identity say ``complete: false`` until the close, and the closed month's bar files
are byte for byte those of the same month bought in one piece after it closed. The same life
runs on the demo source, whose "now" is ``DBENTO_DEMO_NOW``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import io
import itertools
import json
import threading
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from dagster import (
    AssetKey,
    AssetSelection,
    DagsterInstance,
    DefaultScheduleStatus,
    build_schedule_context,
    materialize,
)
from pandas.testing import assert_frame_equal

from dbento_assets import report, status
from dbento_assets.assets import FORCE_TAG
from dbento_assets.assets import WHOLE_MONTH_TAG as WHOLE
from dbento_assets.backfill import UsageError, plan_partitions
from dbento_assets.checks import all_check_keys
from dbento_assets.core.catalog import load_catalog
from dbento_assets.core.coverage import IncompleteMonth, VendorMonth, require_whole_month
from dbento_assets.core.databento_api import VENDOR_SCHEMA, DatabentoSource
from dbento_assets.core.dbn import decode_month
from dbento_assets.core.dbn_files import DbnFilesSource
from dbento_assets.core.months import Month, instant_text
from dbento_assets.core.source import DownloadRefused, FetchRequest, SourceError
from dbento_assets.core.storage import BarStore
from dbento_assets.core.timeframes import parse_timeframe
from dbento_assets.definitions import build_definitions
from dbento_assets.history import evaluation_of
from dbento_assets.partitions import partition_key
from dbento_assets.resources import DatabentoResource
from dbento_assets.schedules import DAILY_SCHEDULE_NAME, SCHEDULE_NAME, topup_month
from dbento_assets_tests.gateway import (
    GET_RANGE,
    RECORD_BYTES,
    TEST_KEY,
    Query,
)
from dbento_assets_tests.test_cache_integrity import (
    quarantined,
    serve_a_bar_outside_the_window,
    serve_bad_data,
    serve_good_data,
    sha,
    source_for,
)
from dbento_assets_tests.test_databento_dagster import (
    FAILED,
    PASSED,
    SETTINGS,
    VENDOR_CHECK,
    failure_text,
    latest_evaluation,
)
from dbento_assets_tests.test_dbn_files import contracts_on, write_day_file

MARCH = Month(2024, 3)
DATASET = "GLBX.MDP3"
DATASET_START = "2010-06-06"
# Three top-ups while March is open (day 3, day 12, day 18), then the close.
LIFE = ["2024-03-04", "2024-03-12", "2024-03-18", "2024-04-02"]
RAW = AssetKey("raw_1s_bars")
MINUTE_NS = 60 * 10**9


@pytest.fixture
def clean(tmp_path, monkeypatch) -> None:
    """No DBENTO_* / DATABENTO_* settings from outside, and a working folder without .env."""
    for name in (*SETTINGS, "DBENTO_DEMO_NOW"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")


@pytest.fixture
def instance(fresh_instance: DagsterInstance) -> DagsterInstance:
    """The test's own instance: runs of other tests recorded nothing in it."""
    return fresh_instance


def all_assets() -> list[AssetKey]:
    return [RAW, *(AssetKey(f"bars_{tf.label}") for tf in load_catalog().timeframes)]


def build(
    instance: DagsterInstance,
    month: Month = MARCH,
    symbol: str = "ES",
    resource: DatabentoResource | None = None,
    tags: dict[str, str] | None = None,
    assets: list[AssetKey] | None = None,
):
    job = build_definitions(databento=resource).resolve_implicit_global_asset_job_def()
    return job.execute_in_process(
        instance=instance,
        partition_key=partition_key(month, symbol),
        asset_selection=assets or all_assets(),
        tags=tags,
        raise_on_error=False,
    )


def checks_alone(instance: DagsterInstance, assets: list[AssetKey]):
    """A run of the checks of ``assets`` alone for ES March, as the UI launches it."""
    defs = build_definitions()
    return materialize(
        list(defs.assets or []),
        selection=AssetSelection.checks_for_assets(*assets),
        tags={"dagster/partition": partition_key(MARCH, "ES")},
        resources=dict(defs.resources or {}),
        instance=instance,
        raise_on_error=False,
    )


def raw_metadata(result) -> dict[str, object]:
    (mat,) = [
        e.event_specific_data.materialization
        for e in result.get_asset_materialization_events()
        if e.event_specific_data.materialization.asset_key == RAW
    ]
    return {k: getattr(v, "value", v) for k, v in mat.metadata.items()}


def bar_files(data: Path) -> dict[str, str]:
    """SHA-256 of every bar file (raw and aggregated) under a data root."""
    return {
        str(p.relative_to(data)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(data.rglob("*.parquet"))
    }


def identities(data: Path) -> dict[str, tuple[bool, str]]:
    store = BarStore.at(str(data), "parquet")
    out = {}
    for path in sorted(data.rglob("*.parquet")):
        _, identity = store.read_with_identity(store.root / str(path.relative_to(data)))
        assert identity is not None
        out[path.name] = (identity.complete, identity.through_text)
    return out


def windows(gateway, schema: str = "ohlcv-1s") -> list[tuple[int, int]]:
    """The ``get_range`` windows of one schema the gateway served, in order."""
    return [
        (int(pd.Timestamp(c.fields["start"]).value), int(pd.Timestamp(c.fields["end"]).value))
        for c in gateway.calls(GET_RANGE)
        if c.fields.get("schema") == schema
    ]


def billed_bytes(gateway, window: tuple[int, int], schema: str = "ohlcv-1s") -> int:
    """What the gateway bills for a window of ES (its billable size: records x 56 bytes)."""
    inst = load_catalog().instrument("ES")
    query = Query(DATASET, (inst.request_symbol,), schema, inst.stype_in, *window)
    return len(gateway.records_for(query)[0]) * RECORD_BYTES


def follow_one_another(asked: list[tuple[int, int]]) -> bool:
    """The windows start at the month's start, end at its end, without gap or overlap."""
    return (
        asked[0][0] == MARCH.start_ns
        and asked[-1][1] == MARCH.end_ns
        and all(before[1] == after[0] for before, after in itertools.pairwise(asked))
    )


@pytest.fixture
def api_env(gateway, clean, tmp_path, monkeypatch):
    monkeypatch.setenv("DATABENTO_API_KEY", TEST_KEY)
    monkeypatch.setenv("DBENTO_GATEWAY", gateway.url)
    monkeypatch.setenv("DBENTO_RETRY_ATTEMPTS", "2")
    monkeypatch.setenv("DBENTO_RETRY_BACKOFF_SECONDS", "0")

    def data_root(name: str) -> Path:
        data = tmp_path / name
        monkeypatch.setenv("DBENTO_DATA_DIR", str(data))
        return data

    return data_root


def test_a_month_life_on_the_gateway_pays_each_second_once(gateway, api_env, instance):
    data = api_env("growing")
    bought_until = MARCH.start.isoformat()
    for day in LIFE:
        gateway.set_range(DATASET, DATASET_START, day)
        result = build(instance)
        assert result.success, failure_text(result)
        meta = raw_metadata(result)
        through = min(pd.Timestamp(day, tz="UTC"), MARCH.end)
        assert meta["complete"] is (through == MARCH.end)
        assert pd.Timestamp(meta["through"]) == through
        # Every file of the month says the same about itself.
        assert set(identities(data).values()) == {(through == MARCH.end, through.isoformat())}
        # Only the tail was priced and paid for in this run.
        assert pd.Timestamp(meta["source_request_start"]) == pd.Timestamp(bought_until)
        tail = (pd.Timestamp(bought_until).value, through.value)
        assert meta["source_billable_size_bytes"] == billed_bytes(gateway, tail)
        bought_until = meta["through"]

    # The request log: one get_range per run, the windows follow one another exactly.
    asked = windows(gateway)
    assert len(asked) == len(LIFE)
    assert follow_one_another(asked)  # no gap, no second bought twice
    billed = sum(billed_bytes(gateway, w) for w in asked)
    whole = billed_bytes(gateway, (MARCH.start_ns, MARCH.end_ns))
    assert billed == whole > 0

    # A closed month held in pieces is a cache hit: no request at all.
    before = gateway.count()
    again = build(instance)
    assert again.success and gateway.count() == before
    assert raw_metadata(again)["complete"] is True

    # The same month bought in one piece after it closed: the same bar files, byte for byte.
    grown = bar_files(data)
    one_piece = api_env("one_piece")
    result = build(instance)
    assert result.success, failure_text(result)
    assert windows(gateway)[-1] == (MARCH.start_ns, MARCH.end_ns)
    assert bar_files(one_piece) == grown
    assert len(grown) == len(all_assets())


def closing_tags(month: Month = MARCH, symbol: str = "ES") -> dict[str, str]:
    """The tags of the monthly schedule's run of ``month`` (its tick on the 2nd after it)."""
    defs = build_definitions(databento=DatabentoResource(source="demo", data_dir="./data"))
    tick = pd.Timestamp(month.end) + pd.Timedelta(days=1, hours=6)
    result = defs.resolve_schedule_def(SCHEDULE_NAME).evaluate_tick(
        build_schedule_context(
            scheduled_execution_time=tick.to_pydatetime(), repository_def=defs.get_repository_def()
        )
    )
    (request,) = [r for r in result.run_requests if str(r.partition_key).endswith(f"|{symbol}")]
    assert str(request.partition_key) == partition_key(month, symbol)
    return dict(request.tags)


def test_the_monthly_close_of_a_month_databento_is_late_with_buys_nothing_and_fails(
    gateway, api_env, instance
):
    # March has closed but Databento has published it only to the 31st, 22:17 (late). The
    # monthly schedule's run fails without buying (a green partial month would never be
    # visited again); what the daily top-ups stored stays; the run once Databento has the
    # whole month buys only the rest.
    data = api_env("late")
    gateway.set_range(DATASET, DATASET_START, "2024-03-18")
    assert build(instance).success  # a daily top-up: stored partial
    before = bar_files(data)
    gateway.set_range(DATASET, DATASET_START, "2024-03-31T22:17:33")

    closing = build(instance, tags=closing_tags())

    assert not closing.success
    text = failure_text(closing)
    assert "not fully available yet" in text and "Nothing was downloaded or written" in text
    assert "re-execute it once Databento has published the rest" in text
    assert len(windows(gateway)) == 1  # nothing bought
    assert bar_files(data) == before

    gateway.set_range(DATASET, DATASET_START, "2024-04-02")
    again = build(instance, tags=closing_tags())
    assert again.success, failure_text(again)
    assert raw_metadata(again)["complete"] is True
    asked = windows(gateway)
    assert len(asked) == 2 and follow_one_another(asked)  # the rest, once


def test_the_monthly_close_of_a_demo_month_not_over_writes_nothing(
    clean, tmp_path, monkeypatch, instance
):
    data = tmp_path / "closing"
    result = build(instance, resource=demo(data, now="2024-03-17"), tags=closing_tags())
    assert not result.success
    assert "holds 2024-03 only up to 2024-03-17" in failure_text(result)
    assert not list(data.rglob("*.parquet"))
    # The tag as a user may type it: yes means yes, a typo is refused, never ignored.
    typed = build(instance, resource=demo(data, now="2024-03-17"), tags={WHOLE: "Yes"})
    assert "holds 2024-03 only up to 2024-03-17" in failure_text(typed)
    typo = build(instance, resource=demo(data, now="2024-03-17"), tags={WHOLE: "ture"})
    assert "dbento/whole-month='ture' is not understood" in failure_text(typo)
    assert not list(data.rglob("*.parquet"))


def test_a_month_available_to_mid_minute_stores_no_bar_still_open(
    gateway, api_env, instance, monkeypatch
):
    # Databento's data ends between two trades of one minute: that minute's bar (and its
    # 30s bar) is still open there, so no timeframe stores it. Each file says where its bars
    # end, and every bar stored equals that of the month once it has closed.
    data = api_env("mid-minute")
    monkeypatch.setenv("DBENTO_VENDOR_CHECK", "true")
    inst = load_catalog().instrument("ES")
    query = Query(
        DATASET, (inst.request_symbol,), "ohlcv-1s", inst.stype_in, MARCH.start_ns, MARCH.end_ns
    )
    ts = gateway.records_for(query)[0]["ts_event"].astype("int64")
    minutes = ts // 60_000_000_000
    later = minutes[ts >= pd.Timestamp("2024-03-12", tz="UTC").value]
    busy = next(m for m in later if (minutes == m).sum() >= 2)
    end = pd.Timestamp(np.sort(ts[minutes == busy])[1], tz="UTC")  # after its first trade
    gateway.set_range(DATASET, DATASET_START, end.isoformat())
    assert build(instance).success
    store = BarStore.at(str(data))
    timeframes = [parse_timeframe(label) for label in ("15s", "30s", "1min")]
    partial = {
        tf: store.read_with_identity(store.aggregated_path("ES", MARCH, tf)) for tf in timeframes
    }

    gateway.set_range(DATASET, DATASET_START, "2024-04-02")
    assert build(instance).success  # the month closed: bought to its end
    for tf, (bars, identity) in partial.items():
        assert identity is not None and not identity.complete
        ends = pd.Timestamp(identity.through_text)
        assert ends == end.floor(pd.Timedelta(seconds=tf.seconds)), tf.label
        assert (bars["ts_event"] + pd.Timedelta(seconds=tf.seconds)).max() <= ends, tf.label
        closed = store.read(store.aggregated_path("ES", MARCH, tf))
        assert_frame_equal(bars, closed[closed["ts_event"] < ends], check_exact=True)


def test_bars_stored_before_a_topup_are_checked_on_what_they_cover(
    gateway, api_env, instance, monkeypatch
):
    # Bars stored on the 12th, raw topped up alone on the 18th: the bars files are right for
    # what they cover. Run alone, their checks judge them on that (not as missing the days
    # since; the vendor cross-check too), say that raw_1s_bars now covers more, and leave
    # the files as they are.
    data = api_env("behind")
    monkeypatch.setenv("DBENTO_VENDOR_CHECK", "true")
    gateway.set_range(DATASET, DATASET_START, "2024-03-12")
    assert build(instance).success
    gateway.set_range(DATASET, DATASET_START, "2024-03-18")
    assert build(instance, assets=[RAW]).success
    bars_assets = all_assets()[1:]
    before = bar_files(data)
    result = checks_alone(instance, bars_assets)
    assert result.success, failure_text(result)
    assert bar_files(data) == before
    checks = [k for k in all_check_keys(load_catalog()) if k.asset_key in bars_assets]
    assert VENDOR_CHECK in checks
    for key in checks:
        record = latest_evaluation(instance, key, partition_key(MARCH, "ES"))
        assert record is not None and record.run_id == result.run_id, key
        assert record.status == PASSED, key
        outcome = {k: getattr(m, "value", m) for k, m in evaluation_of(record).metadata.items()}
        assert "2024-03-12" in outcome["outcome"] and "2024-03-18" in outcome["outcome"], key

    # Judged on what it covers, a wrong bar there still fails.
    store = BarStore.at(str(data))
    path = store.aggregated_path("ES", MARCH, parse_timeframe("1min"))
    bars, identity = store.read_with_identity(path)
    bars = bars.copy()
    bars.loc[len(bars) - 1, "volume"] += 1
    store.write(bars, path, identity)
    again = checks_alone(instance, [AssetKey("bars_1min")])
    assert not again.success
    assert "1 bar not matching the 1-second bars" in failure_text(again)


def test_no_new_data_means_no_purchase_and_the_estimate_prices_only_the_tail(
    gateway, api_env, instance
):
    data = api_env("estimate")
    gateway.set_range(DATASET, DATASET_START, "2024-03-10")
    assert build(instance).success
    paid = gateway.count(GET_RANGE)
    again = build(instance)  # the available end has not moved: nothing new to buy
    assert again.success and gateway.count(GET_RANGE) == paid
    assert raw_metadata(again)["complete"] is False

    gateway.set_range(DATASET, DATASET_START, "2024-03-20")
    source = DatabentoSource(TEST_KEY, data, gateway=gateway.url)
    estimate = source.estimate(load_catalog().instrument("ES"), MARCH)
    tail = (pd.Timestamp("2024-03-10", tz="UTC").value, pd.Timestamp("2024-03-20", tz="UTC").value)
    assert not estimate.cached
    assert estimate.billable_size_bytes == billed_bytes(gateway, tail)
    assert gateway.count(GET_RANGE) == paid  # estimating buys nothing


def note_path(data: Path) -> Path:
    return data / "dbn" / "ES" / "ES_2024_03.ohlcv-1s.dbn.zst.refused.json"


def cached_pieces(data: Path) -> dict[str, str]:
    """SHA-256 of every cached file of ES March 2024 ohlcv-1s (pieces and manifests)."""
    folder = data / "dbn" / "ES"
    return {p.name: sha(p) for p in sorted(folder.glob("ES_2024_03.ohlcv-1s.*-*.dbn.zst*"))}


def test_a_refused_tail_is_quarantined_alone_and_the_pieces_bought_before_it_are_kept(
    gateway, api_env, instance
):
    data = api_env("refused_tail")
    gateway.set_range(DATASET, DATASET_START, "2024-03-04")
    assert build(instance).success
    pieces, stored = cached_pieces(data), bar_files(data)
    assert len(pieces) == 2 and len(stored) == len(all_assets())  # one piece, its manifest
    day3, day17 = (pd.Timestamp(d, tz="UTC") for d in ["2024-03-04", "2024-03-18"])
    tail = (day3.value, day17.value)
    serve_bad_data(gateway)  # the next tail's first minute has its high below its low
    gateway.set_range(DATASET, DATASET_START, "2024-03-18")

    refused = build(instance)

    # Only the tail is quarantined, named by its window; what was bought and stored stays.
    assert not refused.success
    (moved,) = quarantined(data)
    assert moved.name.startswith("ES_2024_03.ohlcv-1s.20240304T000000Z-20240318T000000Z.")
    window = f"[{day3.isoformat()}, {day17.isoformat()})"
    text = failure_text(refused)
    assert f"The download of ES 2024-03 ohlcv-1s {window} was refused, moved to {moved}" in text
    assert "the 1 piece(s) bought before it are kept" in text and "dbento/force=true" in text
    assert cached_pieces(data) == pieces and bar_files(data) == stored
    note = json.loads(note_path(data).read_text(encoding="utf-8"))
    assert note["piece"] == list(tail)

    # Not bought again without force: the run fails at once, naming the refused piece.
    paid = gateway.count(GET_RANGE)
    again = build(instance)
    assert not again.success and gateway.count(GET_RANGE) == paid
    assert f"ES 2024-03 ohlcv-1s {window} was refused" in failure_text(again)
    assert cached_pieces(data) == pieces and bar_files(data) == stored

    # Forced: only the refused tail is bought again; the piece before it is kept as it was.
    serve_good_data(gateway)
    forced = build(instance, tags={FORCE_TAG: "true"})
    assert forced.success, failure_text(forced)
    assert windows(gateway) == [(MARCH.start_ns, day3.value), tail, tail]
    assert pieces.items() <= cached_pieces(data).items()
    meta = raw_metadata(forced)
    assert (meta["complete"], pd.Timestamp(meta["through"])) == (False, day17)
    assert not note_path(data).exists()


def test_forcing_a_refused_tail_never_buys_the_1m_pieces_again(
    gateway, api_env, instance, monkeypatch
):
    api_env("refused_tail_vendor")
    monkeypatch.setenv("DBENTO_VENDOR_CHECK", "true")
    gateway.set_range(DATASET, DATASET_START, "2024-03-04")
    assert build(instance).success
    serve_bad_data(gateway)
    gateway.set_range(DATASET, DATASET_START, "2024-03-18")
    assert not build(instance).success
    serve_good_data(gateway)
    forced = build(instance, tags={FORCE_TAG: "true"})
    assert forced.success, failure_text(forced)
    day3, day17 = (pd.Timestamp(d, tz="UTC").value for d in ["2024-03-04", "2024-03-18"])
    # The force retried the refused 1s tail; the 1m bought on day 3 was not bought again.
    assert windows(gateway, VENDOR_SCHEMA) == [(MARCH.start_ns, day3), (day3, day17)]
    assert vendor_evaluation(instance, forced)[0].status == PASSED


def test_forcing_the_1m_bars_alone_renews_a_month_held_in_pieces(
    gateway, api_env, instance, monkeypatch
):
    # March grown by two top-ups, then closed: its 1m bars are three pieces. The force of the
    # 1-minute bars alone buys them again whole, one request, and no 1-second data.
    api_env("forced_1m_pieces")
    monkeypatch.setenv("DBENTO_VENDOR_CHECK", "true")
    for day in ("2024-03-04", "2024-03-18", "2024-04-02"):
        gateway.set_range(DATASET, DATASET_START, day)
        assert build(instance).success
    seconds = windows(gateway)
    assert len(windows(gateway, VENDOR_SCHEMA)) == 3
    forced = build(instance, tags={FORCE_TAG: "vendor-1m"})
    assert forced.success, failure_text(forced)
    assert windows(gateway) == seconds  # no 1-second request
    assert windows(gateway, VENDOR_SCHEMA)[3:] == [(MARCH.start_ns, MARCH.end_ns)]
    assert vendor_evaluation(instance, forced)[0].status == PASSED


def test_two_topups_of_a_growing_month_at_once_buy_its_tail_once(gateway, api_env):
    data = api_env("two_topups")
    es = load_catalog().instrument("ES")
    gateway.set_range(DATASET, DATASET_START, "2024-03-04")
    source_for(gateway, data).fetch(FetchRequest(es, MARCH), lambda _m: None)
    gateway.set_range(DATASET, DATASET_START, "2024-03-18")
    gateway.gate(GET_RANGE, parties=2, timeout=1.5)  # lets two tail requests overlap, if made
    payloads: list[list[str]] = []

    def top_up() -> None:
        fetched = source_for(gateway, data).fetch(FetchRequest(es, MARCH), lambda _m: None)
        payloads.append([sha(Path(p)) for p in fetched.payloads])

    threads = [threading.Thread(target=top_up) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    day3, day17 = (pd.Timestamp(d, tz="UTC").value for d in ["2024-03-04", "2024-03-18"])
    assert windows(gateway) == [(MARCH.start_ns, day3), (day3, day17)]  # the tail, once
    assert len(payloads) == 2 and payloads[0] == payloads[1] and len(payloads[0]) == 2


def test_a_tail_cut_short_is_bought_again_whole_and_the_pieces_before_it_stay(gateway, api_env):
    data = api_env("cut_tail")
    es = load_catalog().instrument("ES")
    gateway.set_range(DATASET, DATASET_START, "2024-03-04")
    source_for(gateway, data).fetch(FetchRequest(es, MARCH), lambda _m: None)
    pieces = cached_pieces(data)
    gateway.set_range(DATASET, DATASET_START, "2024-03-18")
    gateway.fail("cut", endpoint=GET_RANGE)  # the tail's stream breaks half way
    fetched = source_for(gateway, data).fetch(FetchRequest(es, MARCH), lambda _m: None)
    day3, day17 = (pd.Timestamp(d, tz="UTC").value for d in ["2024-03-04", "2024-03-18"])
    tail = (day3, day17)
    assert windows(gateway) == [(MARCH.start_ns, day3), tail, tail]  # the cut one, retried
    assert pieces.items() <= cached_pieces(data).items()  # the first piece untouched
    decoded = decode_month(fetched.payloads, "ES", MARCH, fetched.instrument_ids)
    served = billed_bytes(gateway, (MARCH.start_ns, day17)) // RECORD_BYTES
    assert len(decoded.bars) == fetched.announced_records == served > 0  # none lost to the cut


def test_a_tail_failing_the_file_check_is_quarantined_as_that_piece(gateway, api_env):
    data = api_env("unusable_tail")
    es = load_catalog().instrument("ES")
    source = DatabentoSource(TEST_KEY, data, gateway=gateway.url)
    gateway.set_range(DATASET, DATASET_START, "2024-03-04")
    source.fetch(FetchRequest(es, MARCH), lambda _: None)
    pieces = cached_pieces(data)
    serve_a_bar_outside_the_window(gateway)
    gateway.set_range(DATASET, DATASET_START, "2024-03-18")
    with pytest.raises(SourceError, match="outside the requested window") as refused:
        source.fetch(FetchRequest(es, MARCH), lambda _: None)
    (moved,) = quarantined(data)
    assert moved.name.startswith("ES_2024_03.ohlcv-1s.20240304T000000Z-20240318T000000Z.")
    assert "the 1 piece(s) bought before it are kept" in str(refused.value)
    assert cached_pieces(data) == pieces
    with pytest.raises(SourceError, match="was refused"):
        source.fetch(FetchRequest(es, MARCH), lambda _: None)
    assert gateway.count(GET_RANGE) == 2

    serve_good_data(gateway)
    fetched = source.fetch(FetchRequest(es, MARCH, force=True), lambda _: None)
    tail = (pd.Timestamp("2024-03-04", tz="UTC").value, pd.Timestamp("2024-03-18", tz="UTC").value)
    assert windows(gateway)[-1] == tail and len(fetched.payloads) == 2
    assert pieces.items() <= cached_pieces(data).items()


# --------------------------------------------------------------------------- vendor 1m


def vendor_evaluation(instance: DagsterInstance, result) -> tuple[object, dict[str, object]]:
    """The vendor cross-check of bars_1min for March, as this run stored it."""
    record = latest_evaluation(instance, VENDOR_CHECK, partition_key(MARCH, "ES"))
    assert record is not None and record.run_id == result.run_id
    return record, {k: getattr(m, "value", m) for k, m in evaluation_of(record).metadata.items()}


def test_the_vendor_1m_grows_with_the_month_and_is_compared_on_what_both_cover(
    gateway, api_env, instance, monkeypatch
):
    data = api_env("vendor_life")
    monkeypatch.setenv("DBENTO_VENDOR_CHECK", "true")
    life = ["2024-03-04", "2024-03-18", "2024-04-02"]  # day 3, day 17, closed
    for day in life:
        gateway.set_range(DATASET, DATASET_START, day)
        result = build(instance)
        assert result.success, failure_text(result)
        through = min(pd.Timestamp(day, tz="UTC"), MARCH.end)
        # Evaluated on the partial month too, on the minutes both the 1s and the 1m cover.
        record, found = vendor_evaluation(instance, result)
        assert record.status == PASSED and "skipped" not in found
        ours = pd.read_parquet(data / "aggregated" / "1min" / "ES_2024_03_1min.parquet")
        assert found["compared"] == found["vendor_bars"] == len(ours) > 0
        assert found["differing"] == found["violations"] == 0
        minutes = (through.value - MARCH.start_ns) // MINUTE_NS
        assert found.get("covered_minutes") == (None if through == MARCH.end else minutes)
        assert raw_metadata(result)["vendor_1m_dbn_cache"] == "miss"  # only the new tail

    # Each run asked for the 1m tail only: the windows follow one another, the bytes billed
    # add up to the month's once, and the closed month's 1m is whole in the cache.
    asked = windows(gateway, VENDOR_SCHEMA)
    assert len(asked) == len(life) and follow_one_another(asked)
    assert asked == windows(gateway)  # the same tails as the 1-second month
    billed = sum(billed_bytes(gateway, w, VENDOR_SCHEMA) for w in asked)
    assert billed == billed_bytes(gateway, (MARCH.start_ns, MARCH.end_ns), VENDOR_SCHEMA) > 0
    before = gateway.count(GET_RANGE)
    again = build(instance)
    assert again.success and gateway.count(GET_RANGE) == before
    assert raw_metadata(again)["vendor_1m_dbn_cache"] == "hit"
    assert vendor_evaluation(instance, again)[0].status == PASSED


def test_a_vendor_1m_mismatch_in_the_partial_month_fails_the_check(
    gateway, api_env, instance, monkeypatch
):
    data = api_env("vendor_mismatch")
    monkeypatch.setenv("DBENTO_VENDOR_CHECK", "true")
    gateway.set_range(DATASET, DATASET_START, "2024-03-04")
    assert build(instance).success
    bars_1min = data / "aggregated" / "1min" / "ES_2024_03_1min.parquet"
    kept = hashlib.sha256(bars_1min.read_bytes()).hexdigest()
    gateway.corrupt_vendor_bar(3)  # the 4th 1m bar of the next tail disagrees
    gateway.set_range(DATASET, DATASET_START, "2024-03-18")

    result = build(instance)

    assert not result.success
    assert "bars_1min for 2024-03-01|ES was NOT saved" in failure_text(result)
    record, found = vendor_evaluation(instance, result)
    assert record.status == FAILED and found["violations"] == found["differing"] == 1
    assert (
        found["covered_minutes"]
        == (pd.Timestamp("2024-03-18", tz="UTC").value - MARCH.start_ns) // MINUTE_NS
    )
    assert hashlib.sha256(bars_1min.read_bytes()).hexdigest() == kept


def report_status(instance: DagsterInstance, out: Path) -> int:
    """``dbento report`` for ES on ``instance``: 1 when an error check failed."""
    return report.main(
        ["--symbol", "ES", "--out", str(out)], instance, io.StringIO(), io.StringIO()
    )


def test_a_check_skipped_by_a_later_run_no_longer_speaks_for_the_files(
    gateway, api_env, instance, monkeypatch, tmp_path
):
    # bars_1min fails the vendor cross-check (not saved); built again without the
    # cross-check, which the deployment then no longer has, it is saved. Like the UI, the
    # report and dbento status then show no failure: the old one was about bars never stored.
    api_env("skipped_later")
    monkeypatch.setenv("DBENTO_VENDOR_CHECK", "true")
    gateway.set_range(DATASET, DATASET_START, "2024-04-02")
    gateway.corrupt_vendor_bar(3)
    assert not build(instance).success
    assert report_status(instance, tmp_path / "report.md") == 1
    assert "matches_vendor_1m" in (tmp_path / "report.md").read_text()

    monkeypatch.setenv("DBENTO_VENDOR_CHECK", "false")
    assert build(instance).success
    assert report_status(instance, tmp_path / "report.md") == 0
    assert "matches_vendor_1m" not in (tmp_path / "report.md").read_text()
    line = next(li for li in status.render(instance, ["ES"]).splitlines() if "2024-03" in li)
    assert "4/4 files, pass" in line, line


def test_a_dbn_folder_holding_part_of_the_current_months_1m_gives_a_partial_vendor_month(
    tmp_path,
):
    folder = dbn_days(tmp_path / "m", [1, 2, 3, 4, 5])
    for d in [1, 2, 3, 4, 5]:
        day = dt.date(2024, 3, d)
        write_day_file(folder, day, contracts_on(day), schema=VENDOR_SCHEMA)
    source = DbnFilesSource(folder, now=pd.Timestamp("2024-03-06T09:00", tz="UTC"))
    found = source.vendor_bars(FetchRequest(load_catalog().instrument("ES"), MARCH), print)
    assert isinstance(found, VendorMonth)
    through = pd.Timestamp("2024-03-06", tz="UTC")
    assert found.covered == [(MARCH.start_ns, through.value)]
    assert len(found.bars) and found.bars["ts_event"].max() < through


def demo(data: Path, now: str | None = None) -> DatabentoResource:
    return DatabentoResource(source="demo", data_dir=str(data), demo_activity=0.02, demo_now=now)


def test_a_month_life_on_the_demo_source(clean, tmp_path, monkeypatch, instance):
    data = tmp_path / "demo"
    for day in ["2024-03-03T12:00", "2024-03-17", "2024-04-03"]:
        result = build(instance, resource=demo(data, now=day))
        assert result.success, failure_text(result)
        through = min(pd.Timestamp(day, tz="UTC").floor("D"), MARCH.end)
        meta = raw_metadata(result)
        assert (meta["complete"], pd.Timestamp(meta["through"])) == (through == MARCH.end, through)
        assert set(identities(data).values()) == {(through == MARCH.end, through.isoformat())}
        raw = pd.read_parquet(data / "raw_1s" / "ES" / "ES_2024_03.parquet")
        assert raw["ts_event"].max() < through
    grown = bar_files(data)
    fresh = tmp_path / "demo_closed"
    assert build(instance, resource=demo(fresh, now="2024-04-03")).success
    assert bar_files(fresh) == grown


def test_a_month_without_data_yet_is_not_materialized(clean, tmp_path, monkeypatch, instance):
    result = build(instance, resource=demo(tmp_path / "d", now="2024-03-01T08:00"))
    assert not result.success
    assert "has no data yet" in failure_text(result)
    assert not list((tmp_path / "d").rglob("*.parquet"))


# --------------------------------------------------------------------------- daily top-up


@pytest.mark.parametrize(
    ("at", "month"),
    [
        (datetime(2024, 3, 18, 6, tzinfo=UTC), Month(2024, 3)),
        (datetime(2024, 3, 3, 6, tzinfo=UTC), Month(2024, 3)),  # March 1st is served
        (datetime(2024, 3, 2, 6, tzinfo=UTC), Month(2024, 2)),  # nothing of March yet
        (datetime(2025, 1, 1, 6, tzinfo=UTC), Month(2024, 12)),
    ],
)
def test_the_daily_topup_extends_the_month_of_the_newest_served_day(at, month):
    assert topup_month(at) == month
    defs = build_definitions(databento=DatabentoResource(source="demo", data_dir="./data"))
    schedule = defs.resolve_schedule_def(DAILY_SCHEDULE_NAME)
    assert schedule.default_status == DefaultScheduleStatus.STOPPED
    assert schedule.cron_schedule == "0 6 * * *"
    assert schedule.job_name == defs.resolve_schedule_def(SCHEDULE_NAME).job_name
    result = schedule.evaluate_tick(
        build_schedule_context(
            scheduled_execution_time=at, repository_def=defs.get_repository_def()
        )
    )
    symbols = load_catalog().symbols
    assert [str(r.partition_key) for r in result.run_requests] == [
        f"{month.key}|{s}" for s in symbols
    ]
    day = at.strftime("%Y-%m-%d")
    assert [r.run_key for r in result.run_requests] == [f"topup|{day}|{s}" for s in symbols]
    assert all("dbento/force" not in r.tags for r in result.run_requests)
    assert all("dbento/whole-month" not in r.tags for r in result.run_requests)  # grows it


def test_the_partitions_include_the_current_month():
    defs = build_definitions(databento=DatabentoResource(source="demo", data_dir="./data"))
    months = defs.resolve_implicit_global_asset_job_def().partitions_def.get_partition_keys()
    now = pd.Timestamp.now(tz="UTC")
    assert f"{Month(now.year, now.month).key}|ES" in months


def test_a_partial_month_is_never_shown_complete(clean, tmp_path, monkeypatch, instance):
    data = tmp_path / "shown"
    result = build(instance, resource=demo(data, now="2024-03-17"))
    assert result.success, failure_text(result)
    # The asset metadata, every file's own identity and its description say partial.
    assert raw_metadata(result)["complete"] is False
    store = BarStore.at(str(data), "parquet")
    for path in data.rglob("*.parquet"):
        identity = store.identity_of(store.root / str(path.relative_to(data)))
        assert identity is not None and not identity.complete
        assert "up to 2024-03-17T00:00:00+00:00 (partial)" in identity.describe()
    # The calendar check judged the month up to through: no session after it is missing.
    (mat,) = [
        e
        for e in result.get_asset_check_evaluations()
        if e.check_name == "calendar_complete" and e.asset_key == RAW
    ]
    assert mat.passed
    # dbento status lists the current month's file as partial.
    monkeypatch.setenv("DBENTO_SOURCE", "demo")
    monkeypatch.setenv("DBENTO_DATA_DIR", str(data))
    line = next(li for li in status.render(instance, ["ES"]).splitlines() if "2024-03" in li)
    assert "partial to 2024-03-17" in line
    # So does the validation report.
    found = report.collect(instance, all_check_keys(load_catalog()), ["ES"])
    text = report.render(found, "test")
    line = next(li for li in text.splitlines() if li.startswith("| 2024-03 "))
    assert "partial to 2024-03-17" in line
    # Raw topped up alone once the month closed: its bars still end on the 17th.
    raw_only = build(instance, resource=demo(data, now="2024-04-05"), assets=[RAW])
    assert raw_only.success and raw_metadata(raw_only)["complete"] is True
    line = next(li for li in status.render(instance, ["ES"]).splitlines() if "2024-03" in li)
    assert "partial to 2024-03-17" in line, line
    found = report.collect(instance, all_check_keys(load_catalog()), ["ES"])
    text = report.render(found, "test")
    line = next(li for li in text.splitlines() if li.startswith("| 2024-03 "))
    assert "partial to 2024-03-17" in line, line


# --------------------------------------------------------------------------- DBN files


def dbn_days(folder: Path, days: list[int]) -> Path:
    folder.mkdir()
    for d in days:
        day = dt.date(2024, 3, d)
        write_day_file(folder, day, contracts_on(day))
    return folder


def month_from_files(folder: Path, now: str):
    source = DbnFilesSource(folder, now=pd.Timestamp(now, tz="UTC"))
    es = load_catalog().instrument("ES")
    fetched = source.fetch(FetchRequest(es, MARCH), lambda _: None)
    decoded = decode_month(fetched.payloads, "ES", MARCH, fetched.instrument_ids)
    require_whole_month(fetched, decoded, es, MARCH, source.name)
    return fetched, decoded


def test_a_dbn_folder_holding_part_of_the_current_month_gives_a_partial_month(tmp_path):
    fetched, decoded = month_from_files(
        dbn_days(tmp_path / "a", [1, 2, 3, 4, 5]), "2024-03-06T09:00"
    )
    assert not fetched.complete
    assert fetched.through_ns == pd.Timestamp("2024-03-06", tz="UTC").value
    assert decoded.bars["ts_event"].max() < pd.Timestamp("2024-03-06", tz="UTC")
    # A hole before "through" is still a hole.
    with pytest.raises(IncompleteMonth, match="2024-03-04"):
        month_from_files(dbn_days(tmp_path / "b", [1, 2, 3, 5]), "2024-03-06T09:00")
    # Once the month has closed, the same files are an incomplete month, never stored.
    with pytest.raises(IncompleteMonth):
        month_from_files(tmp_path / "a", "2024-04-02")


def test_dbento_build_accepts_the_current_month():
    defs = build_definitions(databento=DatabentoResource(source="demo", data_dir="./data"))
    partitions = defs.resolve_implicit_global_asset_job_def().partitions_def
    now = pd.Timestamp.now(tz="UTC")
    current = str(Month(now.year, now.month))
    assert plan_partitions(partitions, ["ES"], current, None) == [
        f"{Month(now.year, now.month).key}|ES"
    ]
    with pytest.raises(UsageError, match="is in the future"):
        plan_partitions(partitions, ["ES"], str(Month(now.year, now.month).next()), None)


def test_a_topup_over_a_day_without_trading_is_bought_once_and_kept(gateway, api_env):
    data = api_env("weekend")
    es = load_catalog().instrument("ES")
    source = DatabentoSource(TEST_KEY, data, gateway=gateway.url)
    found = []
    # Friday 1 March, then Saturday (no ES session: nothing to buy but the window), then Monday.
    for end in ["2024-03-02", "2024-03-03", "2024-03-05"]:
        gateway.set_range(DATASET, DATASET_START, end)
        fetched, (decoded, _) = source.fetch_accepted(
            FetchRequest(es, MARCH),
            lambda _: None,
            lambda f: (
                d := decode_month(f.payloads, "ES", MARCH, f.instrument_ids),
                require_whole_month(f, d, es, MARCH, "databento"),
            ),
        )
        found.append(
            (fetched.through_ns, len(decoded.bars), fetched.metadata["records_downloaded"])
        )
    ends = [pd.Timestamp(e, tz="UTC").value for e in ["2024-03-02", "2024-03-03", "2024-03-05"]]
    assert [f[0] for f in found] == ends
    assert found[1][2] == 0 and found[1][1] == found[0][1]  # Saturday: no record, kept
    assert found[2][1] > found[1][1]
    asked = windows(gateway)
    assert asked == [(MARCH.start_ns, ends[0]), (ends[0], ends[1]), (ends[1], ends[2])]


def test_force_on_a_growing_month_buys_it_again_in_one_piece(gateway, api_env):
    data = api_env("forced")
    es = load_catalog().instrument("ES")
    source = DatabentoSource(TEST_KEY, data, gateway=gateway.url)
    for end in ["2024-03-05", "2024-03-08"]:
        gateway.set_range(DATASET, DATASET_START, end)
        source.fetch(FetchRequest(es, MARCH), lambda _: None)
    folder = data / "dbn" / "ES"
    old = {p: p.read_bytes() for p in folder.glob("ES_2024_03.ohlcv-1s.*-*.dbn.zst*")}
    assert len(old) == 4  # two pieces, their manifests
    fetched = source.fetch(FetchRequest(es, MARCH, force=True), lambda _: None)
    end = pd.Timestamp("2024-03-08", tz="UTC").value
    assert windows(gateway)[-1] == (MARCH.start_ns, end)
    (piece,) = folder.glob("ES_2024_03.ohlcv-1s.*-*.dbn.zst")
    assert fetched.payloads == [piece] and fetched.through_ns == end

    # Stopped between its commit and removing the pieces it covers: the next run finishes
    # that, and uses the forced piece, without a request.
    for path, data_bytes in old.items():
        path.write_bytes(data_bytes)
    requests = len(windows(gateway))
    again = source.fetch(FetchRequest(es, MARCH), lambda _: None)
    assert again.payloads == [piece] and len(windows(gateway)) == requests
    assert sorted(folder.glob("ES_2024_03.ohlcv-1s.*-*.dbn.zst")) == [piece]


def no_inverted_bar(fetched) -> None:
    """A stricter rule than the one the first piece was bought under: refuse any month with
    a bar whose high is below its low (as an upgrade's rules would)."""
    bars = decode_month(fetched.payloads, "ES", MARCH).bars
    if (bars["high"] < bars["low"]).any():
        raise DownloadRefused("a bar has its high below its low", rules=["ohlc_consistent"])


def test_forcing_a_month_refused_for_a_piece_it_held_buys_it_again_in_one_piece(gateway, api_env):
    # March 1-3 was bought (with an inverted first minute) under rules that let it pass; the
    # tail bought on the 18th is refused because of that piece, not because of itself. A
    # forced run must not buy the tail alone again (refused again, run after forced run): the
    # held piece is checked on its own, without a request, and the month bought in one piece.
    data = api_env("refused_for_a_held_piece")
    es = load_catalog().instrument("ES")
    source = DatabentoSource(TEST_KEY, data, gateway=gateway.url)
    serve_bad_data(gateway)
    gateway.set_range(DATASET, DATASET_START, "2024-03-04")
    source.fetch_accepted(FetchRequest(es, MARCH), lambda _: None, lambda _f: None)
    serve_good_data(gateway)
    gateway.set_range(DATASET, DATASET_START, "2024-03-18")
    with pytest.raises(DownloadRefused):
        source.fetch_accepted(FetchRequest(es, MARCH), lambda _: None, no_inverted_bar)
    day3, day17 = (pd.Timestamp(d, tz="UTC").value for d in ["2024-03-04", "2024-03-18"])
    assert windows(gateway) == [(MARCH.start_ns, day3), (day3, day17)]
    logged: list[str] = []

    fetched, _ = source.fetch_accepted(
        FetchRequest(es, MARCH, force=True), logged.append, no_inverted_bar
    )

    # One request, for the whole month so far; the refused piece is replaced, not kept.
    assert windows(gateway)[2:] == [(MARCH.start_ns, day17)]
    assert any("refused on their own" in line for line in logged)
    folder = data / "dbn" / "ES"
    (piece,) = folder.glob("ES_2024_03.ohlcv-1s.*-*.dbn.zst")
    assert fetched.payloads == [piece] and fetched.through_ns == day17
    assert not note_path(data).exists()
    bars = decode_month([piece], "ES", MARCH).bars
    assert not (bars["high"] < bars["low"]).any() and bars["ts_event"].iloc[0] >= MARCH.start


def test_broken_1m_pieces_never_fail_a_forced_raw_month(gateway, api_env, instance, monkeypatch):
    # A forced download of the 1s month, while the cached 1m pieces do not follow one another:
    # the 1m bars are optional, so the raw month is stored anyway (paid once, not lost) and
    # the vendor check says why it compared nothing.
    data = api_env("broken_vendor_pieces")
    monkeypatch.setenv("DBENTO_VENDOR_CHECK", "true")
    gateway.set_range(DATASET, DATASET_START, "2024-04-02")
    folder = data / "dbn" / "ES"
    folder.mkdir(parents=True)
    for window in ["20240301T000000Z-20240304T000000Z", "20240305T000000Z-20240318T000000Z"]:
        (folder / f"ES_2024_03.ohlcv-1m.{window}.dbn.zst").write_bytes(b"")

    forced = build(instance, tags={FORCE_TAG: "true"})

    assert forced.success, failure_text(forced)
    assert gateway.count(GET_RANGE) == 1  # the 1s month; no 1m bought over the pieces
    assert "do not follow one another" in str(raw_metadata(forced)["vendor_1m_error"])
    assert vendor_evaluation(instance, forced)[0].status == FAILED


def test_a_lost_first_piece_never_makes_a_month_that_starts_late(gateway, api_env, instance):
    # Two pieces of March are cached and stored; the first piece's file is then damaged, so
    # the cache quarantines it. The piece left starts on March 4: a month assembled from it
    # would silently lack March 1-3 (the days before it look like a dataset starting
    # mid-month), and it would replace the whole raw file already stored.
    data = api_env("lost_first_piece")
    for day in ["2024-03-04", "2024-03-12"]:
        gateway.set_range(DATASET, DATASET_START, day)
        assert build(instance).success
    folder = data / "dbn" / "ES"
    first = folder / "ES_2024_03.ohlcv-1s.20240301T000000Z-20240304T000000Z.dbn.zst"
    first.write_bytes(first.read_bytes()[:-10])  # a damaged disk block
    stored, paid = bar_files(data), gateway.count(GET_RANGE)
    gateway.set_range(DATASET, DATASET_START, "2024-03-18")

    broken = build(instance)  # the damaged piece is found and quarantined
    again = build(instance)

    assert not broken.success and not again.success
    assert "2024-03-01" in failure_text(again) and "2024-03-04" in failure_text(again)
    assert bar_files(data) == stored  # the whole month stored so far is kept
    assert gateway.count(GET_RANGE) == paid  # nothing bought onto a month with a hole


@pytest.mark.parametrize(
    ("through", "shown"),
    [
        ("2024-03-17T00:00:00+00:00", "2024-03-17"),
        # Hours of the day are held: a date alone would read as "nothing of that day".
        ("2026-12-01T14:45:30+00:00", "2026-12-01 14:45:30 UTC"),
        ("2026-12-01T09:45:30-05:00", "2026-12-01 14:45:30 UTC"),
    ],
)
def test_a_partial_months_end_is_shown_to_the_second_unless_midnight(through, shown):
    assert instant_text(through) == shown


def test_pieces_of_two_requests_in_one_folder_are_never_deleted(gateway, api_env):
    # A growing month bought as ES.v.0, then under a typo (its pieces parked, NQ.v.0's bought
    # over a longer window), then as ES.v.0 again: ES.v.0's piece comes back next to NQ.v.0's,
    # which covers its window. Neither was forced: nothing paid for may be deleted.
    data = api_env("two_requests")
    es = load_catalog().instrument("ES")
    typo = dataclasses.replace(es, request_symbol="NQ.v.0")
    source = DatabentoSource(TEST_KEY, data, gateway=gateway.url)
    gateway.set_range(DATASET, DATASET_START, "2024-03-04")
    source.fetch(FetchRequest(es, MARCH), lambda _: None)
    with pytest.raises(SourceError):
        source.fetch(FetchRequest(typo, MARCH), lambda _: None)  # parks ES.v.0's piece
    gateway.set_range(DATASET, DATASET_START, "2024-03-12")
    source.fetch(FetchRequest(typo, MARCH), lambda _: None)
    paid = {_sha(p) for p in (data / "dbn").rglob("*.dbn.zst")}
    assert len(paid) == 2
    with pytest.raises(SourceError):
        source.fetch(FetchRequest(es, MARCH), lambda _: None)
    assert paid <= {_sha(p) for p in (data / "dbn").rglob("*.dbn.zst*") if p.suffix != ".json"}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
