"""The one DBN decoding path: month window, instrument filter, schemas, record layout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import databento
import databento_dbn
import numpy as np
import pandas as pd
import pytest
import zstandard

from dbento_assets.core import dbn
from dbento_assets.core.catalog import load_catalog
from dbento_assets.core.dbn import (
    DbnError,
    TruncatedDbn,
    decode_month,
    encode_month,
    encode_ohlcv,
    ohlcv_records,
    read_metadata,
)
from dbento_assets.core.months import Month

NS = 1_000_000_000
FEB = Month(2024, 2)
SAMPLES = Path(__file__).resolve().parent / "fixtures" / "databento"


def month_edge_payload(compress: bool) -> bytes:
    ts = np.array(
        [FEB.start_ns - NS, FEB.start_ns, FEB.end_ns - NS, FEB.end_ns, FEB.end_ns - NS],
        dtype="int64",
    )
    iid = np.array([1, 1, 1, 1, 2])
    px = np.array([100, 101, 102, 103, 104]) * 250_000_000
    records = ohlcv_records(ts, iid, px, px, px, px, np.array([1, 2, 3, 4, 5]))
    return encode_ohlcv(
        records,
        dataset="GLBX.MDP3",
        symbols=["ES.v.0"],
        stype_in="continuous",
        start_ns=FEB.start_ns - NS,
        end_ns=FEB.end_ns + NS,
        compress=compress,
    )


@pytest.mark.parametrize("compress", [True, False])
def test_month_window_keeps_last_second_and_drops_neighbours(compress):
    decoded = decode_month([month_edge_payload(compress)], "ES", FEB)
    bars = decoded.bars
    assert decoded.records_read == 5
    assert list(bars["ts_event"]) == [
        pd.Timestamp("2024-02-01T00:00:00Z"),
        pd.Timestamp("2024-02-29T23:59:59Z"),
        pd.Timestamp("2024-02-29T23:59:59Z"),
    ]
    assert list(bars["instrument_id"]) == [1, 1, 2]  # sorted by time, then instrument
    assert list(bars["volume"]) == [2, 3, 5]
    assert list(bars["close"]) == [25.25, 25.5, 26.0]


def test_instrument_filter_and_file_paths(tmp_path):
    path = tmp_path / "feb.dbn.zst"
    path.write_bytes(month_edge_payload(True))
    bars = decode_month([path, str(path)], "ES", FEB, instrument_ids=[2]).bars
    assert list(bars["instrument_id"]) == [2, 2] and set(bars["symbol"]) == {"ES"}


def test_chunked_decoding_equals_whole(monkeypatch):
    payload = month_edge_payload(False)
    whole = decode_month([payload], "ES", FEB).bars
    monkeypatch.setattr(dbn, "CHUNK_RECORDS", 2)
    pd.testing.assert_frame_equal(decode_month([payload], "ES", FEB).bars, whole)


def test_record_layout_is_the_dbn_ohlcv_message():
    records = ohlcv_records(
        np.array([FEB.start_ns]), np.array([5482]), [7], [9], [6], [8], [11], publisher_id=95
    )
    message = databento_dbn.OHLCVMsg(
        rtype=databento_dbn.RType.OHLCV_1S,
        publisher_id=95,
        instrument_id=5482,
        ts_event=FEB.start_ns,
        open=7,
        high=9,
        low=6,
        close=8,
        volume=11,
    )
    assert records.tobytes() == bytes(message)


def test_real_glbx_sample_decodes_with_exact_prices():
    bars = decode_month(
        [SAMPLES / "GLBX.MDP3" / "test_data.ohlcv-1s.dbn.zst"], "ES", Month(2020, 12)
    ).bars
    assert len(bars) == 4 and set(bars["instrument_id"]) == {5482}
    assert bars["ts_event"].iloc[0] == pd.Timestamp("2020-12-28T00:00:00Z")
    assert (bars["ts_event"].array.asi8 % NS == 0).all()
    prices = bars[["open", "high", "low", "close"]].to_numpy()
    assert np.all(prices * 4 == np.round(prices * 4))  # ES trades in quarter points


def test_wrong_schema_and_garbage_are_refused():
    one_minute = SAMPLES / "EQUS.MINI" / "test_data.ohlcv-1m.dbn.zst"
    with pytest.raises(DbnError, match="holds schema ohlcv-1m, expected ohlcv-1s"):
        decode_month([one_minute], "QQQ", Month(2023, 3))
    vendor = decode_month([one_minute], "QQQ", Month(2023, 3), schema="ohlcv-1m").bars
    assert list(vendor["volume"])[:2] == [1800, 1062]
    with pytest.raises(DbnError, match="cannot read DBN"):
        decode_month([b"not dbn at all"], "ES", FEB)
    with pytest.raises(DbnError, match="schema 'trades'"):
        decode_month([one_minute], "QQQ", Month(2023, 3), schema="trades")


SAMPLE_FILES = sorted(SAMPLES.glob("*/*.dbn.zst"))


@pytest.mark.parametrize("sample", SAMPLE_FILES, ids=lambda p: f"{p.parent.name}-{p.name}")
def test_a_header_is_read_as_the_real_client_reads_it(sample: Path):
    expected = databento.DBNStore.from_file(sample).metadata
    plain = zstandard.ZstdDecompressor().decompressobj().decompress(sample.read_bytes())
    # A writer may end a zstd frame anywhere, inside the header too.
    split = 8 + int.from_bytes(plain[4:8], "little") // 2
    compress = zstandard.ZstdCompressor().compress
    frames = compress(plain[:split]) + compress(plain[split:])
    for payload in (sample, sample.read_bytes(), plain, str(sample), frames):
        found = read_metadata(payload, schema=None)
        assert found == expected and found.encode() == expected.encode()
    assert str(read_metadata(sample, schema=str(expected.schema)).dataset) == sample.parent.name


def test_a_header_cut_short_or_not_dbn_is_refused():
    plain = zstandard.ZstdDecompressor().decompressobj().decompress(SAMPLE_FILES[0].read_bytes())
    header = 8 + int.from_bytes(plain[4:8], "little")
    compressed = zstandard.ZstdCompressor().compress(plain)
    for cut in (2, 3, 8, header // 2, header - 1):
        for payload in (plain[:cut], zstandard.ZstdCompressor().compress(plain[:cut])):
            with pytest.raises(TruncatedDbn, match="ends inside the DBN metadata header"):
                read_metadata(payload, schema=None)
    # A download cut inside its first zstd frame, which holds the header.
    for cut in (4, 12, 40):
        with pytest.raises(TruncatedDbn, match="ends inside the DBN metadata header"):
            read_metadata(compressed[:cut], schema=None)
    assert read_metadata(plain[:header], schema=None).dataset  # the header alone is whole
    with pytest.raises(DbnError, match=r"cannot read DBN from .*: it is empty"):
        read_metadata(b"", schema=None)
    for foreign in (b"PK\x03\x04" + plain[4:], b"PK", b"D\x00"):
        with pytest.raises(DbnError, match="bad magic"):
            read_metadata(foreign, schema=None)
    with pytest.raises(DbnError, match="cannot read DBN"):
        read_metadata(b"DBN\x03" + (4).to_bytes(4, "little") + b"\xff" * 4, schema=None)
    with pytest.raises(DbnError, match=r"cannot read DBN from .*missing\.dbn\.zst"):
        read_metadata(SAMPLES / "missing.dbn.zst", schema=None)  # as the client's reader did


def test_a_header_claiming_gigabytes_is_truncated_without_reserving_them(tmp_path: Path):
    # A foreign file under a DBN name can claim a 4 GB header; reading it must not reserve
    # 4 GB (the child's address space is capped 1 GB above what it has).
    plain = zstandard.ZstdDecompressor().decompressobj().decompress(SAMPLE_FILES[0].read_bytes())
    path = tmp_path / "foreign.dbn"
    path.write_bytes(plain[:4] + (4_000_000_000).to_bytes(4, "little") + plain[8:])
    code = f"""
import resource
from dbento_assets.core.dbn import TruncatedDbn, read_metadata
size = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + 2**30, resource.RLIM_INFINITY))
try:
    read_metadata({str(path)!r}, schema=None)
except TruncatedDbn as exc:
    print("truncated:", exc)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "truncated:" in done.stdout and "ends inside the DBN metadata header" in done.stdout


def test_loading_the_code_location_and_reading_dbn_import_no_client(tmp_path: Path):
    # The client and its HTTP stack cost about 15 MB and 0.3 s in each process that loads
    # the code location (the UI, the daemon, every run); only a download needs them.
    sample = SAMPLES / "GLBX.MDP3" / "test_data.ohlcv-1s.dbn.zst"
    code = f"""
import sys
import dbento_assets.definitions
from dbento_assets.core.dbn import check_dbn_file, decode_month
from dbento_assets.core.dbn_files import DbnFilesSource
from dbento_assets.core.months import Month
month = Month(2020, 12)
assert len(DbnFilesSource({str(SAMPLES)!r}).scan()) == {len(SAMPLE_FILES)}
assert len(decode_month([{str(sample)!r}], "ES", month).bars) == 4
assert check_dbn_file({str(sample)!r}, month.start_ns, month.end_ns).records == 4
print(sorted(name for name in sys.modules if name.split(".")[0] in ("databento", "requests")))
"""
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_columns_grow_past_their_reserved_rows(monkeypatch):
    # Decoding reserves one month of seconds per column; more rows (several instruments
    # over a whole month) must grow the columns in place without losing or moving a value.
    monkeypatch.setattr(dbn, "CHUNK_RECORDS", 2)
    columns = dbn._GrowingColumns(capacity=1)
    ts = np.arange(9, dtype="int64") * NS
    px = np.arange(9) * 250_000_000
    records = ohlcv_records(ts, np.arange(9) % 2, px, px + 1, px - 1, px, np.arange(9))
    for lo in range(0, 9, 2):
        columns.append(records[lo : lo + 2])
    out = columns.finish()
    assert columns.rows == 9 and all(len(column) == 9 for column in out.values())
    assert out["ts_event"].tolist() == ts.tolist()
    assert out["high"].tolist() == ((px + 1) / 1e9).tolist()
    assert out["instrument_id"].tolist() == (np.arange(9) % 2).tolist()


def test_a_bad_record_in_a_later_chunk_stops_decoding(monkeypatch):
    # Records are checked chunk by chunk: a record of another schema in the third chunk
    # must still stop the decoding with a clear error.
    monkeypatch.setattr(dbn, "CHUNK_RECORDS", 2)
    ts = FEB.start_ns + np.arange(6, dtype="int64") * NS
    px = np.full(6, 100 * 250_000_000)
    records = ohlcv_records(ts, np.ones(6), px, px, px, px, np.ones(6))
    records["rtype"][5] = dbn.OHLCV_RTYPES["ohlcv-1m"]  # not an ohlcv-1s record
    payload = encode_month(records, load_catalog().instrument("ES"), FEB)
    with pytest.raises(DbnError, match="holds records that are not ohlcv-1s"):
        decode_month([payload], "ES", FEB)
