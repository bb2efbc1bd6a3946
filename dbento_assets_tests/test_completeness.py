"""A stored month is whole: truncated DBN files, uncovered windows and empty months fail.

Real files: Databento's own sample (``fixtures/databento``) cut by bytes at several points
(inside its zstd frame, at 99.5% of its bytes, inside a record once recompressed, and as plain
DBN), and a batch-style folder holding a month of ES as one ``.dbn.zst`` file, cut the same
way, through the DBN-files source and through a real Dagster materialization that must store
nothing. Empty months fail in the demo and DBN-files sources with the same sentence (the
Databento source's empty month is proved through the gateway in test_databento_source.py and
test_databento_dagster.py). A month whose DBN headers leave part of it uncovered (a day
missing from a day-split folder, a request cut short by its ``limit``) fails too.
"""

from __future__ import annotations

import re
from pathlib import Path

import databento_dbn
import numpy as np
import pandas as pd
import pytest
import zstandard
from dagster import DagsterInstance

from dbento_assets.core import dbn
from dbento_assets.core.catalog import Instrument, load_catalog
from dbento_assets.core.coverage import IncompleteMonth, missing_windows, require_whole_month
from dbento_assets.core.dbn import (
    TruncatedDbn,
    check_dbn_file,
    decode_month,
    encode_month,
    encode_ohlcv,
    read_records,
)
from dbento_assets.core.dbn_files import DbnFilesSource
from dbento_assets.core.demo import DemoSource, demo_contract_schedule, symbology_mappings
from dbento_assets.core.months import Month
from dbento_assets.core.source import FetchRequest
from dbento_assets.core.storage import BarStore
from dbento_assets.resources import DatabentoResource
from dbento_assets_tests.test_checks_dagster import failure_message, run
from dbento_assets_tests.test_databento_source import fetch as fetch_databento
from dbento_assets_tests.test_databento_source import make_source

SAMPLES = Path(__file__).parent / "fixtures" / "databento"
SAMPLE = SAMPLES / "GLBX.MDP3" / "test_data.ohlcv-1s.dbn.zst"
CATALOG = load_catalog()
ES = CATALOG.instrument("ES")
JAN = Month(2024, 1)
DEC20 = Month(2020, 12)
ES_JAN = "2024-01-01|ES"
NS = 1_000_000_000


def plain(path: Path) -> bytes:
    return zstandard.ZstdDecompressor().decompressobj().decompress(path.read_bytes())


def records_start(data: bytes) -> int:
    return 8 + int.from_bytes(data[4:8], "little")


# --------------------------------------------------------------------------- the real sample

SAMPLE_BYTES = SAMPLE.read_bytes()
ZSTD_CUTS = {
    "inside the zstd frame header": 6,
    "half way": len(SAMPLE_BYTES) // 2,
    "at 99.5%": int(len(SAMPLE_BYTES) * 0.995),
    "one byte short": len(SAMPLE_BYTES) - 1,
}


@pytest.mark.parametrize("cut", list(ZSTD_CUTS))
def test_the_real_sample_cut_inside_its_zstd_frame_is_an_error_naming_it(tmp_path, cut):
    path = tmp_path / "test_data.ohlcv-1s.dbn.zst"
    path.write_bytes(SAMPLE_BYTES[: ZSTD_CUTS[cut]])
    with pytest.raises(dbn.DbnError, match=re.escape(str(path))):
        decode_month([path], "ES", DEC20)
    with pytest.raises(dbn.DbnError, match=re.escape(str(path))):
        check_dbn_file(path, DEC20.start_ns, DEC20.end_ns)


def test_the_real_sample_decodes_whole():
    decoded = decode_month([SAMPLE], "ES", DEC20)
    assert decoded.records_read == 4 and len(decoded.bars) == 4


@pytest.mark.parametrize("compressed", [True, False], ids=["dbn.zst", "dbn"])
def test_the_real_sample_cut_inside_a_record_is_truncated(tmp_path, compressed):
    data = plain(SAMPLE)
    cut = data[: records_start(data) + 2 * 56 + 20]  # two records and 20 bytes of the third
    path = tmp_path / ("cut.dbn.zst" if compressed else "cut.dbn")
    # Recompressed, the zstd frame is whole: only the record count gives the cut away.
    path.write_bytes(zstandard.ZstdCompressor().compress(cut) if compressed else cut)
    cut_message = rf"{re.escape(str(path))} ends with a partial record \(20 loose"
    with pytest.raises(TruncatedDbn, match=cut_message):
        decode_month([path], "ES", DEC20)
    with pytest.raises(TruncatedDbn, match="partial record"):
        read_records(path)


def test_the_sample_cut_inside_its_metadata_header_is_truncated(tmp_path):
    data = plain(SAMPLE)
    path = tmp_path / "header.dbn"
    path.write_bytes(data[: records_start(data) - 10])
    with pytest.raises(TruncatedDbn, match=re.escape(str(path))):
        decode_month([path], "ES", DEC20)


# --------------------------------------------------------------------------- a month file


@pytest.fixture(scope="module")
def es_month_file(tmp_path_factory) -> Path:
    """One month of ES as Databento's batch portal ships it: a .dbn.zst file with the
    continuous symbol's mappings and the month window in its header."""
    fetched = DemoSource(activity=0.05).fetch(FetchRequest(ES, JAN), lambda _m: None)
    records, _ = read_records(fetched.payloads[0])
    assert len(records) > 50_000
    folder = tmp_path_factory.mktemp("month")
    path = folder / "glbx-mdp3-20240101-20240131.ohlcv-1s.dbn.zst"
    path.write_bytes(zstandard.ZstdCompressor(level=3).compress(fetched.payloads[0]))
    return path


def folder_with(tmp_path: Path, data: bytes, name: str) -> Path:
    folder = tmp_path / "dbn"
    folder.mkdir(parents=True)
    (folder / name).write_bytes(data)
    return folder


def month_cuts(path: Path) -> dict[str, bytes]:
    data = path.read_bytes()
    raw = plain(path)
    first = records_start(raw)
    return {
        "zstd cut at 99.5%": data[: int(len(data) * 0.995)],
        "zstd cut half way": data[: len(data) // 2],
        "zstd recompressed cut mid-record": zstandard.ZstdCompressor().compress(
            raw[: first + 1000 * 56 + 13]
        ),
        "plain dbn cut mid-record": raw[: first + 30_000 * 56 + 55],
    }


def test_a_month_file_cut_by_bytes_is_an_error_from_the_dbn_source(tmp_path, es_month_file):
    whole = DbnFilesSource(es_month_file.parent).fetch(FetchRequest(ES, JAN), lambda _m: None)
    assert len(decode_month(whole.payloads, "ES", JAN, whole.instrument_ids).bars) > 50_000
    for n, (case, data) in enumerate(month_cuts(es_month_file).items()):
        name = "es.ohlcv-1s.dbn" if case.startswith("plain") else "es.ohlcv-1s.dbn.zst"
        folder = folder_with(tmp_path / str(n), data, name)
        fetched = DbnFilesSource(folder).fetch(FetchRequest(ES, JAN), lambda _m: None)
        with pytest.raises(TruncatedDbn, match=re.escape(str(folder / name))):
            decode_month(fetched.payloads, "ES", JAN, fetched.instrument_ids)


def test_a_month_file_cut_to_99_5_percent_stores_nothing_through_dagster(tmp_path, es_month_file):
    data = es_month_file.read_bytes()
    folder = folder_with(tmp_path, data[: int(len(data) * 0.995)], es_month_file.name)
    root = tmp_path / "data"
    result = run(root, DagsterInstance.ephemeral(), ES_JAN, source="dbn", dbn_dir=folder)
    assert not result.success
    message = failure_message(result)
    assert "TruncatedDbn" in message and str(folder / es_month_file.name) in message
    assert "ends inside a zstd frame: the file is cut short" in message
    store = BarStore.at(root)
    assert not store.raw_path("ES", JAN).exists()
    assert not [p for p in root.rglob("*") if p.is_file() and p.suffix in (".parquet", ".csv")]


def test_the_whole_month_file_is_stored_through_dagster(tmp_path, es_month_file):
    folder = folder_with(tmp_path, es_month_file.read_bytes(), es_month_file.name)
    root = tmp_path / "data"
    result = run(root, DagsterInstance.ephemeral(), ES_JAN, source="dbn", dbn_dir=folder)
    assert result.success
    assert BarStore.at(root).raw_path("ES", JAN).exists()


# --------------------------------------------------------------------------- coverage


def test_a_folder_missing_the_last_day_of_the_month_fails(tmp_path, es_month_file):
    records, _ = read_records(es_month_file)
    last_day = JAN.end_ns - 86_400 * NS
    payload = encode_ohlcv(
        records[records["ts_event"] < last_day],
        dataset=ES.dataset,
        symbols=[ES.request_symbol],
        stype_in=ES.stype_in,
        start_ns=JAN.start_ns,
        end_ns=last_day,  # the batch request stopped a day early
        mappings=symbology_mappings(ES, demo_contract_schedule(ES, JAN)),
    )
    with pytest.raises(IncompleteMonth, match="is not whole") as info:
        gate(folder_with(tmp_path, payload, "es.dbn.zst"))
    assert "[2024-01-31T00:00:00+00:00, 2024-02-01T00:00:00+00:00)" in str(info.value)


def day_split_folder(tmp_path: Path, month_file: Path, skip: set[int]) -> Path:
    """The month file split by UTC day, as the batch portal splits it, leaving out the days
    of the month in ``skip``."""
    records, _ = read_records(month_file)
    folder = tmp_path / "days"
    folder.mkdir()
    mappings = symbology_mappings(ES, demo_contract_schedule(ES, JAN))
    for day in range(1, 32):
        if day in skip:
            continue
        start = JAN.start_ns + (day - 1) * 86_400 * NS
        end = start + 86_400 * NS
        ts = records["ts_event"]
        (folder / f"glbx-mdp3-202401{day:02d}.ohlcv-1s.dbn.zst").write_bytes(
            encode_ohlcv(
                records[(ts >= start) & (ts < end)],
                dataset=ES.dataset,
                symbols=[ES.request_symbol],
                stype_in=ES.stype_in,
                start_ns=start,
                end_ns=end,
                mappings=mappings,
            )
        )
    return folder


def gate(folder: Path, instrument: Instrument = ES, month: Month = JAN):
    """A DBN folder's month through the completeness gate: (covered windows, decoded)."""
    source = DbnFilesSource(folder)
    fetched = source.fetch(FetchRequest(instrument, month), lambda _m: None)
    decoded = decode_month(fetched.payloads, instrument.symbol, month, fetched.instrument_ids)
    return require_whole_month(fetched, decoded, instrument, month, source.name), decoded


def test_a_day_split_folder_may_lack_the_days_without_a_session(tmp_path, es_month_file):
    # CME Globex has no session on a Saturday (UTC): a batch split by day may ship no file.
    saturdays = {6, 13, 20, 27}
    covered, decoded = gate(day_split_folder(tmp_path, es_month_file, saturdays))
    assert len(covered) == 5  # the month minus its four Saturdays
    whole = decode_month([es_month_file], "ES", JAN)
    assert len(decoded.bars) == len(whole.bars)


def test_a_day_split_folder_lacking_a_trading_day_fails(tmp_path, es_month_file):
    # 2024-01-07 is a Sunday: Globex opens that evening, so its file is needed.
    with pytest.raises(IncompleteMonth, match=r"\[2024-01-07T00:00:00\+00:00, 2024-01-08"):
        gate(day_split_folder(tmp_path, es_month_file, {6, 7}))


def test_a_request_cut_short_by_its_limit_is_not_a_whole_month():
    qqq = CATALOG.instrument("QQQ")
    month = Month(2023, 3)
    # The sample holds the first 4 records of 2023-03-28 (limit=4): it covers 00:00 to its
    # last record, 11:11:22, so the rest of that Tuesday and every later session is missing.
    with pytest.raises(IncompleteMonth, match="is not whole") as info:
        gate(SAMPLES / "EQUS.MINI", qqq, month)
    assert "[2023-03-01T00:00:00+00:00, 2023-03-04T00:00:00+00:00)" in str(info.value)
    last = pd.Timestamp("2023-03-28 11:11:22", tz="UTC").value
    assert info.value.gaps[-1] == (last, month.end_ns)


def test_missing_windows():
    assert missing_windows((0, 100), [(0, 100)]) == []
    assert missing_windows((0, 100), [(10, 20), (20, 50), (60, 120)]) == [(0, 10), (50, 60)]
    assert missing_windows((0, 100), []) == [(0, 100)]
    assert missing_windows((0, 100), [(0, 90)]) == [(90, 100)]


def test_a_header_announcing_the_symbol_partial_fails(tmp_path, es_month_file):
    records, _ = read_records(es_month_file)
    fetched = DemoSource(activity=0.05).fetch(FetchRequest(ES, JAN), lambda _m: None)
    decoded = decode_month(fetched.payloads, "ES", JAN, fetched.instrument_ids)
    partial = (
        databento_dbn.Metadata(
            dataset=ES.dataset,
            schema=databento_dbn.Schema("ohlcv-1s"),
            start=JAN.start_ns,
            stype_in=databento_dbn.SType(ES.stype_in),
            stype_out=databento_dbn.SType.INSTRUMENT_ID,
            end=JAN.end_ns,
            symbols=[ES.request_symbol],
            partial=[ES.request_symbol],
            not_found=[],
            mappings=[],
        ).encode()
        + records.tobytes()
    )
    fetched.payloads = [partial]
    with pytest.raises(IncompleteMonth, match=r"lists 'ES\.v\.0' as partial"):
        require_whole_month(fetched, decoded, ES, JAN, "dbn")


def test_fewer_records_than_announced_fail():
    fetched = DemoSource(activity=0.05).fetch(FetchRequest(ES, JAN), lambda _m: None)
    decoded = decode_month(fetched.payloads, "ES", JAN, fetched.instrument_ids)
    fetched.announced_records = decoded.records_read + 1
    with pytest.raises(IncompleteMonth, match="were announced"):
        require_whole_month(fetched, decoded, ES, JAN, "databento")
    fetched.announced_records = decoded.records_read
    assert require_whole_month(fetched, decoded, ES, JAN, "databento") == [
        (JAN.start_ns, JAN.end_ns)
    ]


def test_a_month_starting_at_the_datasets_first_instant_is_whole_from_there():
    fetched = DemoSource(activity=0.05).fetch(FetchRequest(ES, JAN), lambda _m: None)
    records, _ = read_records(fetched.payloads[0])
    first = JAN.start_ns + 10 * 86_400 * NS
    fetched.payloads = [
        encode_ohlcv(
            records[records["ts_event"] >= first],
            dataset=ES.dataset,
            symbols=[ES.request_symbol],
            stype_in=ES.stype_in,
            start_ns=first,
            end_ns=JAN.end_ns,
        )
    ]
    decoded = decode_month(fetched.payloads, "ES", JAN, fetched.instrument_ids)
    with pytest.raises(IncompleteMonth, match="2024-01-01T00:00:00"):
        require_whole_month(fetched, decoded, ES, JAN, "databento")
    fetched.available_from_ns = first  # Databento said the dataset starts there
    assert require_whole_month(fetched, decoded, ES, JAN, "databento") == [(first, JAN.end_ns)]


# --------------------------------------------------------------------------- empty months

EMPTY = "holds no ohlcv-1s record in the month, and an empty month fails"


def test_an_empty_demo_month_fails_through_dagster_and_stores_nothing(tmp_path, monkeypatch):
    real = DatabentoResource.month_source

    def quiet(self, catalog_file=None):  # the demo at an activity where no second trades
        source = real(self, catalog_file)
        source.activity = 1e-12
        return source

    monkeypatch.setattr(DatabentoResource, "month_source", quiet)
    root = tmp_path / "data"
    result = run(root, DagsterInstance.ephemeral(), ES_JAN)
    assert not result.success
    message = failure_message(result)
    assert f"ES 2024-01 ('ES.v.0', GLBX.MDP3, source demo) {EMPTY}" in message
    assert not BarStore.at(root).raw_path("ES", JAN).exists()


def test_an_empty_dbn_month_fails_through_dagster_and_stores_nothing(tmp_path):
    empty = encode_month(
        np.empty(0, dtype=dbn.OHLCV_RECORD_DTYPE),
        ES,
        JAN,
        mappings=symbology_mappings(ES, demo_contract_schedule(ES, JAN)),
    )
    folder = folder_with(tmp_path, empty, "es.ohlcv-1s.dbn.zst")
    root = tmp_path / "data"
    result = run(root, DagsterInstance.ephemeral(), ES_JAN, source="dbn", dbn_dir=folder)
    assert not result.success
    assert f"ES 2024-01 ('ES.v.0', GLBX.MDP3, source dbn) {EMPTY}" in failure_message(result)
    assert not BarStore.at(root).raw_path("ES", JAN).exists()


# --------------------------------------------------------------------------- the Databento source


def test_a_databento_month_is_whole_from_the_datasets_start_fresh_and_from_the_cache(
    gateway, tmp_path
):
    # EQUS.MINI starts on 2023-03-28 at the gateway: March is whole from there, and the
    # sidecar of the cached file tells the gate so on a cache hit, with the announced count.
    qqq, march = CATALOG.instrument("QQQ"), Month(2023, 3)
    start = pd.Timestamp("2023-03-28", tz="UTC").value
    for expected in ("miss", "hit"):
        fetched, _ = fetch_databento(make_source(gateway, tmp_path), qqq, march)
        assert fetched.metadata["dbn_cache"] == expected
        assert fetched.available_from_ns == start
        assert fetched.announced_records == fetched.metadata["record_count"] > 0
        decoded = decode_month(fetched.payloads, "QQQ", march, fetched.instrument_ids)
        covered = require_whole_month(fetched, decoded, qqq, march, "databento")
        assert covered == [(start, march.end_ns)]
    assert gateway.count("timeseries.get_range") == 1
