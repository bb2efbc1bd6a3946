"""Bar files: layout, round-trips in both formats, atomic writes and one origin per root."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from dbento_assets.core import ahead, storage
from dbento_assets.core.bars import DTYPES, make_bars
from dbento_assets.core.databento_api import dbn_cache_path
from dbento_assets.core.months import Month
from dbento_assets.core.storage import BarStore, StorageError
from dbento_assets.core.timeframes import parse_timeframe

JAN = Month(2024, 1)


def sample_bars() -> pd.DataFrame:
    ts = np.array([JAN.start_ns, JAN.start_ns + 10**9, JAN.end_ns - 10**9])
    # Prices as the decoder makes them: int64 fixed-point (1e-9) divided once by 1e9.
    prices = np.array([4750250000000, 2050100000000, 4750250000001]) / 1e9
    return make_bars(ts, "ES", [5, 5, 6], prices, prices, prices, prices, [1, 2**63 + 7, 0])


def test_layout_keeps_the_seed_names(tmp_path):
    store = BarStore.at(tmp_path, "parquet")
    assert store.raw_path("ES", JAN).path.endswith("raw_1s/ES/ES_2024_01.parquet")
    assert store.aggregated_path("ES", JAN, parse_timeframe("15s")).path.endswith(
        "aggregated/15s/ES_2024_01_15s.parquet"
    )
    csv = BarStore.at(tmp_path, "csv")
    assert csv.aggregated_path("NQ", Month(2023, 12), parse_timeframe("60s")).path.endswith(
        "aggregated/1min/NQ_2023_12_1min.csv"
    )
    cache = dbn_cache_path(tmp_path, "ES", JAN)
    assert str(cache).endswith("dbn/ES/ES_2024_01.ohlcv-1s.dbn.zst")


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_round_trip_is_exact_with_the_same_dtypes(tmp_path, fmt):
    store = BarStore.at(tmp_path, fmt)
    frame = sample_bars()
    path = store.raw_path("ES", JAN)
    size = store.write(frame, path)
    assert size == os.path.getsize(path.path) > 0
    back = store.read(path)
    assert dict(back.dtypes) == dict(DTYPES)
    pd.testing.assert_frame_equal(back, frame, check_exact=True)


def test_csv_is_readable_iso_utc_without_float_noise(tmp_path):
    store = BarStore.at(tmp_path, "csv")
    path = store.raw_path("ES", JAN)
    store.write(sample_bars(), path)
    lines = Path(path.path).read_text().splitlines()
    assert lines[0] == "ts_event,symbol,instrument_id,open,high,low,close,volume"
    assert lines[1].startswith("2024-01-01T00:00:00Z,ES,5,4750.25,")
    assert lines[3].startswith("2024-01-31T23:59:59Z,ES,6,")
    # Every price is written as its exact decimal: no float noise, no exponent.
    assert lines[2].split(",")[3:7] == ["2050.1"] * 4
    assert lines[3].split(",")[3:7] == ["4750.250000001"] * 4
    # pandas reads it with no special options
    parsed = pd.read_csv(path.path, parse_dates=["ts_event"])
    assert str(parsed["ts_event"].dt.tz) == "UTC"


def test_sub_second_timestamps_survive_csv(tmp_path):
    store = BarStore.at(tmp_path, "csv")
    frame = sample_bars()
    frame["ts_event"] = frame["ts_event"] + pd.Timedelta("250ms")
    path = store.raw_path("ES", JAN)
    store.write(frame, path)
    assert "2024-01-01T00:00:00.250000000Z" in Path(path.path).read_text()
    pd.testing.assert_frame_equal(store.read(path), frame, check_exact=True)


def test_csv_uses_one_timestamp_format_even_when_written_in_batches(tmp_path, monkeypatch):
    # Rows are formatted in batches; one sub-second bar in the last batch still gives every
    # row of the file the 9-digit format, so the column reads back as one type.
    monkeypatch.setattr(storage, "_CSV_BATCH", 1)
    store = BarStore.at(tmp_path, "csv")
    frame = sample_bars()
    frame.loc[2, "ts_event"] += pd.Timedelta("1ns")
    path = store.raw_path("ES", JAN)
    store.write(frame, path)
    lines = Path(path.path).read_text().splitlines()
    assert len(lines) == 4 and lines[0].startswith("ts_event,symbol,")
    assert [line.split(",")[0][19:] for line in lines[1:]] == [
        ".000000000Z",
        ".000000000Z",
        ".000000001Z",
    ]
    pd.testing.assert_frame_equal(store.read(path), frame, check_exact=True)


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path, fmt, monkeypatch):
    store = BarStore.at(tmp_path, fmt)
    path = store.raw_path("ES", JAN)
    store.write(sample_bars(), path)
    before = Path(path.path).read_bytes()

    import dbento_assets.core.storage as storage

    def explode(table, f):
        f.write(b"half a file")
        raise OSError("disk full (injected)")

    monkeypatch.setattr(storage, "_write_parquet" if fmt == "parquet" else "_write_csv", explode)
    with pytest.raises(OSError, match="injected"):
        store.write(sample_bars().iloc[:1], path)
    assert Path(path.path).read_bytes() == before
    assert sorted(p.name for p in Path(path.path).parent.iterdir()) == [Path(path.path).name]


def kill_mid_write(store: BarStore, symbol: str) -> None:
    """A real process killed in the middle of writing ``symbol``'s January raw file."""
    script = (
        "import os, numpy as np\n"
        "import dbento_assets.core.storage as s\n"
        "from dbento_assets.core.bars import make_bars\n"
        "def die(table, f):\n"
        "    f.write(b'x' * 1000); f.flush(); os._exit(9)\n"
        "s._write_parquet = die\n"
        f"st = s.BarStore.at({str(store.root.path)!r}, 'parquet')\n"
        "n = 10\n"
        "st.write(make_bars(np.arange(n), 'ES', np.ones(n), *[np.ones(n)] * 4, np.ones(n)),"
        f" st.raw_path({symbol!r}, s.Month(2024, 1)))\n"
    )
    assert subprocess.run([sys.executable, "-c", script], check=False).returncode == 9


CSV_REWRITE = """
import os, sys
import dbento_assets.core.storage as s
from dbento_assets.core.months import Month
from dbento_assets_tests.test_storage import sample_bars

root, when = sys.argv[1], sys.argv[2]
replace = os.replace


def killed_at(source, target):
    # The process dies as the CSV takes the old one's place, or as its note then does.
    if target.endswith(".csv" if when == "file" else ".csv.json"):
        os._exit(9)
    replace(source, target)


s.os.replace = killed_at
store = s.BarStore.at(root, "csv")
month = Month(2024, 1)
through = "2024-01-20T00:00:00+00:00"
later = s.FileIdentity("ES", month, "synthetic", "1s", complete=False, through=through)
store.write(sample_bars().iloc[:2], store.raw_path("ES", month), later)
"""


@pytest.mark.parametrize("when", ["file", "note"])
def test_a_csv_rewrite_killed_between_file_and_note_leaves_either_whole(tmp_path, when):
    # A CSV and its note are two files: a process killed after the first is replaced and
    # before the second is must leave the new bars with their note (or the old with theirs),
    # never a month refused as "replaced after it was written".
    store = BarStore.at(tmp_path, "csv")
    path = store.raw_path("ES", JAN)
    first = storage.FileIdentity(
        "ES", JAN, "synthetic", "1s", complete=False, through="2024-01-10T00:00:00+00:00"
    )
    store.write(sample_bars(), path, first)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", CSV_REWRITE, str(tmp_path), when], env=env)
    assert done.returncode == 9

    bars, identity = store.read_with_identity(path)
    if when == "file":  # killed before the new CSV was in place: the old month, its note
        assert (
            len(bars) == 3
            and identity is not None
            and identity.through_text.startswith("2024-01-10")
        )
    else:  # the new CSV in place, its note still pending
        assert (
            len(bars) == 2
            and identity is not None
            and identity.through_text.startswith("2024-01-20")
        )
    store.write(sample_bars(), path, first)  # the next write clears what was pending
    names = sorted(p.name for p in Path(path.path).parent.iterdir())
    # (the killed writer's temporary file stays until it is a minute old)
    assert [n for n in names if not n.endswith(".tmp")] == [
        "ES_2024_01.csv",
        "ES_2024_01.csv.json",
    ]


def test_killed_writer_never_leaves_a_half_file(tmp_path):
    """A process killed in the middle of a write leaves the previous file complete."""
    store = BarStore.at(tmp_path, "parquet")
    path = store.raw_path("ES", JAN)
    store.write(sample_bars(), path)
    before = Path(path.path).read_bytes()
    kill_mid_write(store, "ES")
    assert Path(path.path).read_bytes() == before
    assert pq.read_table(path.path).num_rows == 3


def test_root_holds_one_origin(tmp_path):
    store = BarStore.at(tmp_path / "root")
    store.claim("synthetic", "demo")
    store.claim("synthetic", "demo")  # same origin: fine
    with pytest.raises(StorageError, match="SYNTHETIC demo data") as info:
        store.claim("databento", "databento")
    assert "DBENTO_DATA_DIR" in str(info.value)
    real = BarStore.at(tmp_path / "real")
    real.claim("databento", "dbn")
    with pytest.raises(StorageError, match="real Databento market data"):
        real.claim("synthetic", "demo")


def test_bad_format_and_empty_root_are_clear():
    with pytest.raises(StorageError, match="DBENTO_FORMAT"):
        BarStore.at("./data", "xlsx")
    with pytest.raises(StorageError, match="DBENTO_DATA_DIR is empty"):
        BarStore.at("  ")


def test_parquet_reads_back_with_plain_tools_as_the_bar_dtypes(tmp_path):
    # The files are for other tools too: pandas.read_parquet (no dbento_assets involved)
    # must see a string symbol (not the dictionary it is stored as) and required columns.
    store = BarStore.at(tmp_path, "parquet")
    path = store.raw_path("ES", JAN)
    store.write(sample_bars(), path)
    plain = pd.read_parquet(path.path)
    assert dict(plain.dtypes) == dict(DTYPES)
    pd.testing.assert_frame_equal(plain, sample_bars(), check_exact=True)
    schema = pq.read_schema(path.path)
    assert not any(field.nullable for field in schema)
    assert pq.ParquetFile(path.path).metadata.row_group(0).column(1).statistics is not None


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_a_bar_with_a_missing_value_is_refused_and_the_old_file_kept(tmp_path, fmt):
    store = BarStore.at(tmp_path, fmt)
    path = store.raw_path("ES", JAN)
    store.write(sample_bars(), path)
    before = Path(path.path).read_bytes()
    broken = sample_bars().copy()  # its own buffer per column (sample_bars shares prices)
    broken.loc[1, "high"] = np.nan
    with pytest.raises(StorageError, match="high"):
        store.write(broken, path)
    assert Path(path.path).read_bytes() == before


def test_frames_with_other_dtypes_are_converted_to_the_bar_dtypes(tmp_path):
    # A frame built by hand (microsecond timestamps, signed volumes, plain str symbols)
    # takes the converting path and still reads back as the bar dtypes.
    frame = sample_bars()
    frame["ts_event"] = frame["ts_event"].astype("datetime64[us, UTC]")
    frame["volume"] = [1, 2, 3]
    frame["symbol"] = frame["symbol"].astype(object)
    store = BarStore.at(tmp_path, "parquet")
    path = store.raw_path("ES", JAN)
    store.write(frame, path)
    back = store.read(path)
    assert dict(back.dtypes) == dict(DTYPES)
    assert back["volume"].tolist() == [1, 2, 3]
    assert back["ts_event"].tolist() == sample_bars()["ts_event"].tolist()


RUN_AND_SHOW_THE_POOL = """
import sys, pyarrow
from dagster import DagsterInstance, materialize
from dbento_assets.assets import build_assets
from dbento_assets.core.catalog import load_catalog
from dbento_assets.io_managers import BarFileIOManager
from dbento_assets.resources import DatabentoResource
imported = pyarrow.default_memory_pool().backend_name
databento = DatabentoResource(source="demo", data_dir=sys.argv[1], demo_activity=0.02)
materialize(
    build_assets(load_catalog())[:1],
    partition_key="2024-01-01|ES",
    resources={"databento": databento, "io_manager": BarFileIOManager(databento=databento)},
    instance=DagsterInstance.ephemeral(),
)
print(imported, pyarrow.default_memory_pool().backend_name)
"""


@pytest.mark.parametrize(("preset", "expected"), [(None, "system"), ("mimalloc", "mimalloc")])
def test_a_run_shares_glibcs_allocator_with_arrow_unless_told_otherwise(tmp_path, preset, expected):
    # Importing the package changes nothing; a run (its IO manager) makes Arrow allocate
    # through the system allocator, and an ARROW_DEFAULT_MEMORY_POOL already set wins.
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    if preset:
        env["ARROW_DEFAULT_MEMORY_POOL"] = preset
    done = subprocess.run(
        [sys.executable, "-c", RUN_AND_SHOW_THE_POOL, str(tmp_path / "data")],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    imported, during = done.stdout.split()[-2:]
    assert imported != "system" or preset == "system"
    assert during == expected


COUNT_ARENAS = """
import ctypes, os, re, sys, tempfile, threading
from dbento_assets.core.storage import share_system_allocator

libc = ctypes.CDLL(None)
libc.fopen.restype = ctypes.c_void_p


def arenas():  # glibc's own report of its heaps (malloc_info)
    path = os.path.join(tempfile.mkdtemp(), "malloc.xml")
    f = ctypes.c_void_p(libc.fopen(path.encode(), b"w"))
    libc.malloc_info(0, f)
    libc.fclose(f)
    return len(re.findall("<heap nr=", open(path).read()))


if sys.argv[1] == "shared":
    share_system_allocator()
before = arenas()
together = threading.Barrier(4)


def work():  # four threads allocating at once, as a step's threads do
    together.wait()
    held = [bytearray(100_000) for _ in range(20)]
    together.wait()


threads = [threading.Thread(target=work) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(arenas() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_info")
@pytest.mark.parametrize(
    ("shared", "preset", "more_arenas"),
    [("shared", None, False), ("not-shared", None, True), ("shared", "4", True)],
    ids=["a-run", "control-without-it", "malloc-arena-max-set"],
)
def test_a_run_keeps_glibc_to_one_arena_for_its_threads_unless_told_otherwise(
    shared, preset, more_arenas
):
    # Threads started once a run has begun (the encoding thread among them) allocate from
    # the arenas there are, instead of each keeping pages of its own; MALLOC_ARENA_MAX wins.
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    if preset:
        env["MALLOC_ARENA_MAX"] = preset
    done = subprocess.run(
        [sys.executable, "-c", COUNT_ARENAS, shared],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert (int(done.stdout.split()[-1]) > 0) is more_arenas


def month_of_bars(rows: int = 300_000) -> pd.DataFrame:
    """Bars over several Parquet row groups, with a roll, as a decoded month holds them."""
    rng = np.random.default_rng(7)
    ts = (
        JAN.start_ns
        + np.sort(rng.choice((JAN.end_ns - JAN.start_ns) // 10**9, rows, replace=False)) * 10**9
    )
    ids = np.where(np.arange(rows) < rows // 2, 5, 6)
    close = 4750 + np.round(np.cumsum(rng.integers(-4, 5, rows)) * 0.25, 2)
    high, low = close + 0.25, close - 0.25
    return make_bars(ts, "ES", ids, close, high, low, close, rng.integers(1, 50, rows))


def refuse_encoding_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    """From here on, a Parquet write that encodes its frame itself fails the test."""

    def encoded_again(table: object, f: object) -> None:
        raise AssertionError("the frame was encoded again instead of taking its encoding")

    monkeypatch.setattr(storage, "_write_parquet", encoded_again)


def test_a_frame_encoded_ahead_is_stored_byte_for_byte_as_it_would_be_without(
    tmp_path, monkeypatch
):
    frame = month_of_bars()
    identity = storage.FileIdentity("ES", JAN, "synthetic", raw_rules="proof")
    plain, ahead = BarStore.at(tmp_path / "plain"), BarStore.at(tmp_path / "ahead")
    plain.write(frame, plain.raw_path("ES", JAN), identity)
    ahead.encode_ahead(frame)
    refuse_encoding_twice(monkeypatch)
    ahead.write(frame, ahead.raw_path("ES", JAN), identity)
    written = Path(ahead.raw_path("ES", JAN).path).read_bytes()
    assert written == Path(plain.raw_path("ES", JAN).path).read_bytes()
    assert pq.ParquetFile(ahead.raw_path("ES", JAN).path).metadata.num_row_groups == 3
    back, found = ahead.read_with_identity(ahead.raw_path("ES", JAN))
    assert found == identity
    pd.testing.assert_frame_equal(back, frame, check_exact=True)
    assert sorted(p.name for p in Path(ahead.raw_path("ES", JAN).path).parent.iterdir()) == [
        "ES_2024_01.parquet"
    ]


def test_an_encoding_ahead_serves_only_its_own_frame_and_only_in_parquet(tmp_path, monkeypatch):
    first, second = month_of_bars(), month_of_bars(1000)
    store, csv = BarStore.at(tmp_path / "parquet"), BarStore.at(tmp_path / "csv", "csv")
    store.encode_ahead(first)
    store.encode_ahead(second)
    # An equal copy is another frame: it is encoded for itself.
    twin = first.copy()
    store.write(twin, store.raw_path("NQ", JAN))
    pd.testing.assert_frame_equal(store.read(store.raw_path("NQ", JAN)), first, check_exact=True)
    # A CSV store writes CSV, whatever a Parquet store began for the same frame.
    csv.write(first, csv.raw_path("ES", JAN))
    pd.testing.assert_frame_equal(csv.read(csv.raw_path("ES", JAN)), first, check_exact=True)
    # Each frame takes its own encoding, in any order, once.
    refuse_encoding_twice(monkeypatch)
    store.write(second, store.raw_path("ES", Month(2024, 2)))
    store.write(first, store.raw_path("ES", JAN))
    for frame, month in [(first, JAN), (second, Month(2024, 2))]:
        back = store.read(store.raw_path("ES", month))
        pd.testing.assert_frame_equal(back, frame, check_exact=True)
    with pytest.raises(AssertionError, match="encoded again"):
        store.write(first, store.raw_path("ES", Month(2024, 3)))


def test_an_encoding_ahead_of_a_frame_never_stored_goes_with_the_frame(tmp_path):
    import pyarrow as pa

    store = BarStore.at(tmp_path)
    frame = month_of_bars()
    gc.collect()
    before = pa.default_memory_pool().bytes_allocated()
    store.encode_ahead(frame)  # a month the rules then refuse: never written
    ahead._WORKER.submit(lambda: None).result()  # its encoding is done (one worker)
    assert pa.default_memory_pool().bytes_allocated() > before + 1_000_000
    kept = weakref.ref(frame)
    del frame
    assert kept() is None
    assert pa.default_memory_pool().bytes_allocated() <= before
    assert list(tmp_path.iterdir()) == []


def test_an_encoding_that_fails_fails_the_write_and_keeps_the_old_file(tmp_path, monkeypatch):
    import pyarrow as pa

    store = BarStore.at(tmp_path)
    path = store.raw_path("ES", JAN)
    store.write(sample_bars(), path)
    before = Path(path.path).read_bytes()

    def out_of_memory(table: object) -> object:
        raise pa.ArrowMemoryError("malloc of size 9437184 failed (injected)")

    monkeypatch.setattr(storage, "_encode_rows", out_of_memory)
    frame = month_of_bars()
    store.encode_ahead(frame)
    with pytest.raises(pa.ArrowMemoryError, match="injected"):
        store.write(frame, path)
    assert Path(path.path).read_bytes() == before
    assert sorted(p.name for p in Path(path.path).parent.iterdir()) == [Path(path.path).name]


@pytest.mark.parametrize("change", ["a value set in place", "a column replaced", "a missing value"])
def test_a_frame_changed_after_its_encoding_began_is_stored_as_it_is_at_the_write(tmp_path, change):
    store = BarStore.at(tmp_path)
    path = store.raw_path("ES", JAN)
    frame = month_of_bars()
    store.encode_ahead(frame)
    ahead._WORKER.submit(lambda: None).result()  # the old values are encoded by now
    if change == "a value set in place":
        frame.loc[0, "close"] = 1.0
    elif change == "a column replaced":
        frame["volume"] = frame["volume"] + 1
    else:
        frame.loc[7, "high"] = np.nan
        with pytest.raises(StorageError, match="high"):
            store.write(frame, path)
        assert not Path(path.path).exists()
        return
    store.write(frame, path)
    pd.testing.assert_frame_equal(store.read(path), frame, check_exact=True)


def encode_and_write_in_child(root: str) -> None:
    store = BarStore.at(root)
    frame = month_of_bars(1000)
    store.encode_ahead(frame)
    store.write(frame, store.raw_path("NQ", JAN))


def test_a_process_forked_after_an_encoding_encodes_and_writes_its_own(tmp_path):
    # The child of a fork has no worker thread, only a copy of the parent's records of it.
    import multiprocessing

    store = BarStore.at(tmp_path)
    frame = month_of_bars(1000)
    store.encode_ahead(frame)
    store.write(frame, store.raw_path("ES", JAN))  # the worker thread is running
    child = multiprocessing.get_context("fork").Process(
        target=encode_and_write_in_child, args=(str(tmp_path),)
    )
    child.start()
    child.join(30)
    if child.exitcode is None:
        child.kill()
    assert child.exitcode == 0
    back = store.read(store.raw_path("NQ", JAN))
    pd.testing.assert_frame_equal(back, month_of_bars(1000), check_exact=True)


def test_a_frame_written_while_the_interpreter_shuts_down_is_encoded_by_the_write(
    tmp_path, monkeypatch
):
    from concurrent.futures import ThreadPoolExecutor

    stopped = ThreadPoolExecutor(max_workers=1)
    stopped.shutdown()  # as the interpreter's exit leaves it: no new work taken
    monkeypatch.setattr(ahead, "_WORKER", stopped)
    store = BarStore.at(tmp_path)
    frame = month_of_bars(1000)
    store.encode_ahead(frame)
    store.write(frame, store.raw_path("ES", JAN))
    pd.testing.assert_frame_equal(store.read(store.raw_path("ES", JAN)), frame, check_exact=True)
