"""The local DBN files source on Databento's real sample files and on batch-style folders.

The real samples (see ``fixtures/databento/README.md``) prove decoding, symbol mapping and
timestamps, and the vendor cross-check: QQQ 1-second bars aggregated to one minute equal
Databento's own 1-minute bars for the minutes the 1s file fully covers. Synthetic folders,
written with the project's DBN encoder, prove file selection by dataset, month and
symbology, day-split files holding several symbols, continuous futures rolling mid-month,
that a file mapping two continuous symbols onto the same contract never mixes them, that such
a file, filtered, still claims only the time its original covered, and that the folder's
ohlcv-1m files serve the vendor cross-check the same way.
"""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import databento
import numpy as np
import pandas as pd
import pytest
import zstandard

from dbento_assets.core.aggregate import aggregate_bars
from dbento_assets.core.catalog import Instrument, load_catalog
from dbento_assets.core.coverage import dbn_coverage
from dbento_assets.core.dbn import decode_month, encode_ohlcv, ohlcv_records
from dbento_assets.core.dbn_files import DbnFilesSource
from dbento_assets.core.months import Month
from dbento_assets.core.source import FetchRequest, SourceError
from dbento_assets.core.timeframes import parse_timeframe

SAMPLES = Path(__file__).parent / "fixtures" / "databento"
CATALOG = load_catalog()
QQQ = CATALOG.instrument("QQQ")
ES = CATALOG.instrument("ES")
ESH1 = Instrument("ESH1", "GLBX.MDP3", "ESH1", "raw_symbol", 0.25, "future")
MAR23 = Month(2023, 3)
NS = 1_000_000_000


def fetch(source: DbnFilesSource, inst: Instrument, month: Month):
    logs: list[str] = []
    fetched = source.fetch(FetchRequest(inst, month), logs.append)
    return fetched, logs


def utc(text: str) -> pd.Timestamp:
    return pd.Timestamp(text, tz="UTC")


# --------------------------------------------------------------------------- real samples


def test_equity_sample_decodes_with_mapping_and_exact_timestamps():
    fetched, logs = fetch(DbnFilesSource(SAMPLES), QQQ, MAR23)
    assert fetched.payloads == [SAMPLES / "EQUS.MINI" / "test_data.ohlcv-1s.dbn.zst"]
    assert fetched.instrument_ids == frozenset({13340})
    assert fetched.metadata["symbol_mappings"] == ["QQQ -> 13340 [2023-03-28, 2023-03-29)"]
    assert fetched.metadata["days_covered"] == 1 and fetched.metadata["days_in_month"] == 31
    assert fetched.metadata["coverage_complete"] is False
    assert any("not ohlcv-1s" in line and "ohlcv-1m" in line for line in logs)

    bars = decode_month(fetched.payloads, "QQQ", MAR23, fetched.instrument_ids).bars
    assert list(bars["ts_event"]) == [
        utc("2023-03-28 11:08:14"),
        utc("2023-03-28 11:10:31"),
        utc("2023-03-28 11:10:36"),
        utc("2023-03-28 11:11:22"),
    ]
    assert list(bars["symbol"]) == ["QQQ"] * 4
    assert list(bars["instrument_id"]) == [13340] * 4
    assert list(bars["open"]) == [307.83, 307.97, 307.96, 308.04]
    assert list(bars["low"]) == [307.80, 307.97, 307.96, 308.04]
    assert list(bars["volume"]) == [1800, 900, 162, 99]


def test_futures_sample_decodes_raw_symbol_mapping_and_timestamps():
    fetched, _ = fetch(DbnFilesSource(SAMPLES), ESH1, Month(2020, 12))
    assert fetched.payloads == [SAMPLES / "GLBX.MDP3" / "test_data.ohlcv-1s.dbn.zst"]
    assert fetched.instrument_ids == frozenset({5482})
    bars = decode_month(fetched.payloads, "ESH1", Month(2020, 12), fetched.instrument_ids).bars
    assert [t.isoformat() for t in bars["ts_event"]] == [
        "2020-12-28T00:00:00+00:00",
        "2020-12-28T00:00:01+00:00",
        "2020-12-28T00:00:02+00:00",
        "2020-12-28T00:00:07+00:00",
    ]
    assert list(bars["open"]) == [3702.75, 3702.5, 3702.5, 3702.5]
    assert list(bars["high"]) == [3702.75, 3702.5, 3702.5, 3702.5]
    assert list(bars["volume"]) == [13, 1, 14, 3]
    assert set(bars["instrument_id"]) == {5482}


def test_vendor_cross_check_qqq_1s_aggregated_to_1min_equals_vendor_1m_bars():
    fetched, _ = fetch(DbnFilesSource(SAMPLES), QQQ, MAR23)
    ones = decode_month(fetched.payloads, "QQQ", MAR23, fetched.instrument_ids).bars
    ours = aggregate_bars(ones, parse_timeframe("1min")).set_index("ts_event")

    store = databento.DBNStore.from_file(SAMPLES / "EQUS.MINI" / "test_data.ohlcv-1m.dbn.zst")
    assert str(store.schema) == "ohlcv-1m"
    vendor = store.to_ndarray()
    vendor_ts = pd.DatetimeIndex(vendor["ts_event"].astype("int64"), tz="UTC")
    for minute in ("2023-03-28 11:08", "2023-03-28 11:10"):  # fully covered by the 1s file
        row = int(np.flatnonzero(vendor_ts == utc(minute))[0])
        mine = ours.loc[utc(minute)]
        for column in ("open", "high", "low", "close"):
            assert mine[column] == vendor[column][row] / 1e9, (minute, column)
        assert mine["volume"] == vendor["volume"][row]
        assert mine["instrument_id"] == vendor["instrument_id"][row] == 13340
    assert ours.loc[utc("2023-03-28 11:10"), "volume"] == 1062
    # No trade in 11:09: neither the vendor nor the aggregation has a bar there.
    assert utc("2023-03-28 11:09") not in ours.index
    assert utc("2023-03-28 11:09") not in vendor_ts


def test_a_symbol_the_files_do_not_map_is_a_clear_error():
    with pytest.raises(SourceError) as info:
        fetch(DbnFilesSource(SAMPLES), ES, Month(2020, 12))  # ES.v.0; the sample maps ESH1
    message = str(info.value)
    assert "'ES.v.0'" in message and "'continuous'" in message and "'GLBX.MDP3'" in message
    assert "GLBX.MDP3/test_data.ohlcv-1s.dbn.zst" in message and "[ESH1]" in message


def test_a_month_without_files_is_a_clear_error():
    with pytest.raises(SourceError, match="for 2023-04"):
        fetch(DbnFilesSource(SAMPLES), QQQ, Month(2023, 4))


def test_missing_or_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(SourceError, match=r"DBENTO_DBN_DIR=.*is not a folder"):
        fetch(DbnFilesSource(tmp_path / "nope"), QQQ, MAR23)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no data here")
    with pytest.raises(SourceError, match=r"holds no \.dbn or \.dbn\.zst files"):
        fetch(DbnFilesSource(tmp_path / "empty"), QQQ, MAR23)


def test_an_unreadable_dbn_file_is_named(tmp_path):
    shutil.copytree(SAMPLES, tmp_path / "data")
    (tmp_path / "data" / "broken.dbn.zst").write_bytes(b"this is not DBN")
    with pytest.raises(SourceError, match=r"broken\.dbn\.zst"):
        fetch(DbnFilesSource(tmp_path / "data"), QQQ, MAR23)


# --------------------------------------------------------------------------- batch folders

MAR24 = Month(2024, 3)
DAY = 86_400 * NS
ROLL = dt.date(2024, 3, 15)  # ES.v.0 rolls from ESH4 (100) to ESM4 (200); ES.v.1 from 200 to 300


def day_ns(day: dt.date) -> int:
    return int(pd.Timestamp(day, tz="UTC").value)


def records_for(day: dt.date, ids: list[int], base: int, schema: str = "ohlcv-1s") -> np.ndarray:
    """Three bars per instrument on ``day`` (seconds, or minutes for ohlcv-1m) from 01:00; the
    close encodes the id so rows are traceable."""
    step = 60 * NS if schema == "ohlcv-1m" else NS
    rows = [
        (day_ns(day) + 3600 * NS + k * step, iid, (base + iid) * NS + k)
        for iid in ids
        for k in range(3)
    ]
    ts, iids, px = (np.array(col, dtype=np.int64) for col in zip(*rows, strict=True))
    vol = np.full(len(ts), 5, dtype=np.uint64)
    order = np.lexsort((iids, ts))
    p = px[order]
    return ohlcv_records(ts[order], iids[order], p, p, p, p, vol, schema=schema)


def write_day_file(
    folder: Path,
    day: dt.date,
    mappings: dict[str, int],
    *,
    dataset: str = "GLBX.MDP3",
    stype_in: str = "continuous",
    compress: bool = True,
    schema: str = "ohlcv-1s",
    limit: int | None = None,
) -> Path:
    """One batch file of one day holding several symbols, as Databento splits by day."""
    records = records_for(day, sorted(set(mappings.values())), base=1000, schema=schema)
    end = day + dt.timedelta(days=1)
    payload = encode_ohlcv(
        records,
        schema=schema,
        limit=limit,
        dataset=dataset,
        symbols=sorted(mappings),
        stype_in=stype_in,
        start_ns=day_ns(day),
        end_ns=day_ns(end),
        mappings={
            raw: [{"start_date": day, "end_date": end, "symbol": str(iid)}]
            for raw, iid in mappings.items()
        },
        compress=compress,
    )
    suffix = ".dbn.zst" if compress else ".dbn"
    path = folder / f"{dataset.lower()}-{day:%Y%m%d}.{schema}{suffix}"
    path.write_bytes(payload)
    return path


def contracts_on(day: dt.date) -> dict[str, int]:
    before = day < ROLL
    return {
        "ES.v.0": 100 if before else 200,
        "ES.v.1": 200 if before else 300,
        "NQ.v.0": 900,
    }


@pytest.fixture
def batch_folder(tmp_path) -> Path:
    folder = tmp_path / "batch"
    (folder / "nested").mkdir(parents=True)
    for day in (dt.date(2024, 3, 13), dt.date(2024, 3, 14), ROLL, dt.date(2024, 3, 18)):
        write_day_file(folder, day, contracts_on(day))
    write_day_file(folder / "nested", dt.date(2024, 3, 19), contracts_on(dt.date(2024, 3, 19)),
                   compress=False)  # fmt: skip
    write_day_file(folder, dt.date(2024, 2, 29), contracts_on(dt.date(2024, 2, 29)))
    write_day_file(folder, dt.date(2024, 4, 1), contracts_on(dt.date(2024, 4, 1)))
    write_day_file(folder, dt.date(2024, 3, 14), {"SPY": 15144}, dataset="EQUS.MINI",
                   stype_in="raw_symbol")  # fmt: skip
    return folder


def test_day_split_multi_symbol_files_give_the_continuous_contract_per_day(batch_folder):
    fetched, logs = fetch(DbnFilesSource(batch_folder), ES, MAR24)
    names = sorted(Path(p).name if isinstance(p, Path) else "<filtered>" for p in fetched.payloads)
    assert len(fetched.payloads) == 5  # four March .dbn.zst days plus the nested .dbn
    assert sorted(fetched.metadata["dbn_files"]) == sorted(
        [
            "glbx.mdp3-20240313.ohlcv-1s.dbn.zst",
            "glbx.mdp3-20240314.ohlcv-1s.dbn.zst",
            "glbx.mdp3-20240315.ohlcv-1s.dbn.zst",
            "glbx.mdp3-20240318.ohlcv-1s.dbn.zst",
            "nested/glbx.mdp3-20240319.ohlcv-1s.dbn",
        ]
    )
    assert "<filtered>" in names  # the files mapping ES.v.1 onto ESM4 are filtered by date
    assert fetched.instrument_ids == frozenset({100, 200})
    assert fetched.metadata["symbol_mappings"] == [
        "ES.v.0 -> 100 [2024-03-13, 2024-03-15)",
        "ES.v.0 -> 200 [2024-03-15, 2024-03-16)",
        "ES.v.0 -> 200 [2024-03-18, 2024-03-20)",
    ]
    assert any("date-aware" in line for line in logs)

    bars = decode_month(fetched.payloads, "ES", MAR24, fetched.instrument_ids).bars
    days = bars["ts_event"].dt.date
    # Before the roll ES is ESH4 (100) only: ESM4 (200), then ES.v.1, must not leak in.
    assert set(bars.loc[days < ROLL, "instrument_id"]) == {100}
    assert set(bars.loc[days >= ROLL, "instrument_id"]) == {200}
    assert sorted(set(days)) == [
        dt.date(2024, 3, 13),
        dt.date(2024, 3, 14),
        ROLL,
        dt.date(2024, 3, 18),
        dt.date(2024, 3, 19),
    ]
    assert len(bars) == 5 * 3  # three bars per day of the one mapped contract
    assert not bars.duplicated(["ts_event", "instrument_id"]).any()
    # Each bar's price was written as 1000 + its instrument id: no row was relabelled.
    assert (bars["close"].round() == 1000 + bars["instrument_id"].astype("int64")).all()


def test_another_symbol_of_the_same_files_gets_its_own_instruments(batch_folder):
    nq = CATALOG.instrument("NQ")
    fetched, _ = fetch(DbnFilesSource(batch_folder), nq, MAR24)
    assert fetched.instrument_ids == frozenset({900})
    assert all(isinstance(p, Path) for p in fetched.payloads)  # nothing ambiguous to filter
    bars = decode_month(fetched.payloads, "NQ", MAR24, fetched.instrument_ids).bars
    assert set(bars["instrument_id"]) == {900} and len(bars) == 5 * 3


def test_files_of_other_datasets_and_months_are_left_out(batch_folder):
    spy = CATALOG.instrument("SPY")
    fetched, _ = fetch(DbnFilesSource(batch_folder), spy, MAR24)
    assert fetched.metadata["dbn_files"] == ["equs.mini-20240314.ohlcv-1s.dbn.zst"]
    assert fetched.instrument_ids == frozenset({15144})
    feb, _ = fetch(DbnFilesSource(batch_folder), ES, Month(2024, 2))
    assert feb.metadata["dbn_files"] == ["glbx.mdp3-20240229.ohlcv-1s.dbn.zst"]
    assert feb.instrument_ids == frozenset({100})


def test_a_month_file_spanning_the_boundary_keeps_only_the_month(tmp_path):
    feb_20, mar_5 = dt.date(2024, 2, 20), dt.date(2024, 3, 5)
    records = np.concatenate(
        [records_for(feb_20 + dt.timedelta(days=k), [100], base=1000) for k in range(15)]
    )
    payload = encode_ohlcv(
        records,
        dataset="GLBX.MDP3",
        symbols=["ES.v.0"],
        stype_in="continuous",
        start_ns=day_ns(feb_20),
        end_ns=day_ns(mar_5 + dt.timedelta(days=1)),
        mappings={
            "ES.v.0": [
                {"start_date": feb_20, "end_date": mar_5 + dt.timedelta(days=1), "symbol": "100"}
            ]
        },
    )
    (tmp_path / "span.dbn.zst").write_bytes(payload)
    fetched, _ = fetch(DbnFilesSource(tmp_path), ES, MAR24)
    bars = decode_month(fetched.payloads, "ES", MAR24, fetched.instrument_ids).bars
    assert bars["ts_event"].min() >= MAR24.start and bars["ts_event"].max() < MAR24.end
    assert len(bars) == 5 * 3  # March 1..5
    assert fetched.metadata["first_day_covered"] == "2024-03-01"
    assert fetched.metadata["last_day_covered"] == "2024-03-05"


def test_the_same_data_twice_in_the_folder_is_refused_naming_both_files(tmp_path):
    # `zstd -d` keeps the original: a month's file and its decompressed copy side by side
    # would give every bar twice.
    month_days = [dt.date(2024, 3, 1) + dt.timedelta(days=k) for k in range(31)]
    records = np.concatenate([records_for(day, [100], base=1000) for day in month_days])
    payload = encode_ohlcv(
        records,
        dataset="GLBX.MDP3",
        symbols=["ES.v.0"],
        stype_in="continuous",
        start_ns=MAR24.start_ns,
        end_ns=MAR24.end_ns,
        mappings={
            "ES.v.0": [
                {"start_date": month_days[0], "end_date": dt.date(2024, 4, 1), "symbol": "100"}
            ]
        },
    )
    (tmp_path / "march.ohlcv-1s.dbn.zst").write_bytes(payload)
    assert len(
        decode_month(fetch(DbnFilesSource(tmp_path), ES, MAR24)[0].payloads, "ES", MAR24).bars
    )
    (tmp_path / "march.ohlcv-1s.dbn").write_bytes(zstandard.decompress(payload))
    with pytest.raises(SourceError, match="the same data twice") as info:
        fetch(DbnFilesSource(tmp_path), ES, MAR24)
    assert "march.ohlcv-1s.dbn and march.ohlcv-1s.dbn.zst" in str(info.value)


# --------------------------------------------------------------------------- filtered coverage


def header(payload: bytes | Path) -> tuple[int, int | None]:
    store = (
        databento.DBNStore.from_bytes(payload)
        if isinstance(payload, bytes)
        else databento.DBNStore.from_file(payload)
    )
    return int(store.metadata.start), store.metadata.end


def test_a_filtered_file_claims_only_the_window_of_its_original(batch_folder):
    fetched, _ = fetch(DbnFilesSource(batch_folder), ES, MAR24)
    filtered = [p for p in fetched.payloads if isinstance(p, bytes)]
    assert len(filtered) == 2  # before the roll ES.v.1 is ESM4, ES.v.0's next contract
    originals = {header(path) for path in batch_folder.rglob("glbx*2024031*") if path.is_file()}
    assert {header(p) for p in filtered} <= originals  # each keeps its day, not the month
    # So the month is covered on the files' five days only, not whole.
    day = lambda d: day_ns(dt.date(2024, 3, d))  # noqa: E731
    assert dbn_coverage(fetched.payloads, MAR24, "ohlcv-1s") == [
        (day(13), day(16)),
        (day(18), day(20)),
    ]


def test_a_filtered_file_cut_by_its_limit_covers_up_to_its_last_record(tmp_path):
    # Two days across the roll, ES.v.0 and ES.v.1 in one request, cut short by its limit: the
    # file ends at its last record (the 15th, 01:00:02), not at the requested end (the 17th).
    first, second, end = dt.date(2024, 3, 14), ROLL, dt.date(2024, 3, 17)
    records = np.concatenate(
        [records_for(first, [100, 200], base=1000), records_for(second, [200, 300], base=1000)]
    )
    path = tmp_path / "roll.ohlcv-1s.dbn.zst"
    path.write_bytes(
        encode_ohlcv(
            records,
            dataset="GLBX.MDP3",
            symbols=["ES.v.0", "ES.v.1"],
            stype_in="continuous",
            start_ns=day_ns(first),
            end_ns=day_ns(end),
            limit=len(records),
            mappings={
                "ES.v.0": [
                    {"start_date": first, "end_date": second, "symbol": "100"},
                    {"start_date": second, "end_date": end, "symbol": "200"},
                ],
                "ES.v.1": [
                    {"start_date": first, "end_date": second, "symbol": "200"},
                    {"start_date": second, "end_date": end, "symbol": "300"},
                ],
            },
        )
    )
    last = day_ns(second) + (3600 + 2) * NS
    assert dbn_coverage([path], MAR24, "ohlcv-1s") == [(day_ns(first), last)]

    fetched, _ = fetch(DbnFilesSource(tmp_path), ES, MAR24)
    (payload,) = fetched.payloads
    assert isinstance(payload, bytes)  # ESM4 (200) is ES.v.1, then ES.v.0: filtered by date
    assert header(payload) == (day_ns(first), last)
    assert dbn_coverage(fetched.payloads, MAR24, "ohlcv-1s") == [(day_ns(first), last)]
    bars = decode_month(fetched.payloads, "ES", MAR24, fetched.instrument_ids).bars
    assert list(bars["instrument_id"]) == [100] * 3 + [200] * 3


# --------------------------------------------------------------------------- vendor 1m files


def test_vendor_1m_of_the_real_sample_covers_what_its_header_says():
    found = DbnFilesSource(SAMPLES).vendor_1m(QQQ, MAR23)
    assert found is not None and "test_data.ohlcv-1m.dbn.zst" in found.origin
    assert len(found.bars) == 4 and set(found.bars["instrument_id"]) == {13340}
    assert found.covered == [(day_ns(dt.date(2023, 3, 28)), utc("2023-03-28 11:19").value)]
    assert DbnFilesSource(SAMPLES).vendor_1m(QQQ, Month(2023, 4)) is None


def test_vendor_1m_files_are_chosen_and_filtered_like_the_1s_files(batch_folder):
    days = (dt.date(2024, 3, 14), ROLL)
    for day in days:
        write_day_file(batch_folder, day, contracts_on(day), schema="ohlcv-1m")
    found = DbnFilesSource(batch_folder).vendor_1m(ES, MAR24)
    assert found is not None
    # Only the two ohlcv-1m files, and in them only ES.v.0's contract of each day.
    assert found.origin.count("ohlcv-1m") == 2 and "ohlcv-1s" not in found.origin
    bars = found.bars
    assert list(bars["instrument_id"]) == [100] * 3 + [200] * 3
    assert (bars["close"].round() == 1000 + bars["instrument_id"].astype("int64")).all()
    assert found.covered == [(day_ns(days[0]), day_ns(ROLL + dt.timedelta(days=1)))]
    assert DbnFilesSource(batch_folder).vendor_1m(CATALOG.instrument("SPY"), MAR24) is None
