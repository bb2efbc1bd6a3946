"""The asset graph through a real Dagster instance: all four assets, files, metadata, catalog."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pandas as pd
import pytest
from dagster import AssetKey, DagsterInstance, materialize

from dbento_assets import assets
from dbento_assets.assets import build_assets
from dbento_assets.core import ahead, comparison, storage
from dbento_assets.core.aggregate import aggregate_bars
from dbento_assets.core.catalog import DEFAULT_CATALOG, load_catalog
from dbento_assets.core.dbn import decode_month
from dbento_assets.core.demo import DemoSource
from dbento_assets.core.months import Month
from dbento_assets.core.source import FetchRequest
from dbento_assets.core.storage import BarStore, StorageError
from dbento_assets.core.timeframes import Timeframe, parse_timeframe
from dbento_assets.definitions import build_definitions
from dbento_assets.io_managers import BarFileIOManager, io_manager_from_env
from dbento_assets.resources import DatabentoResource

REPO = Path(__file__).resolve().parent.parent
PARTITION = "2024-01-01|ES"
JAN = Month(2024, 1)
ACTIVITY = 0.05  # a light synthetic month keeps these tests quick


def run_partition(root: Path, partition: str = PARTITION, catalog=None, fmt: str = "parquet"):
    catalog = catalog or load_catalog()
    databento = DatabentoResource(source="demo", data_dir=str(root), demo_activity=ACTIVITY)
    resources = {
        "databento": databento,
        "io_manager": BarFileIOManager(databento=databento, format=fmt),
    }
    return materialize(
        build_assets(catalog),
        partition_key=partition,
        resources=resources,
        instance=DagsterInstance.ephemeral(),
        raise_on_error=False,
    )


def files_under(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


def test_definitions_load_with_the_catalog(monkeypatch):
    monkeypatch.setenv("DBENTO_SOURCE", "demo")
    defs = build_definitions()
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert keys == {"raw_1s_bars", "bars_15s", "bars_30s", "bars_1min"}
    raw = defs.resolve_assets_def("raw_1s_bars")
    assert PARTITION in raw.partitions_def.get_partition_keys()
    assert {"databento", "io_manager"} <= set(defs.resources)


@pytest.mark.slow
@pytest.mark.parametrize(
    "args",
    [[], ["-w", "workspace.yaml"], ["-m", "dbento_assets"]],
    ids=["pyproject", "workspace", "module"],
)
def test_every_entry_point_loads_the_same_definitions(args, tmp_path):
    env = {**os.environ, "DBENTO_SOURCE": "demo", "DAGSTER_HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "dagster", "definitions", "validate", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "dbento_assets" in done.stdout + done.stderr


def test_all_four_assets_materialize_one_partition(tmp_path):
    result = run_partition(tmp_path)
    assert result.success
    store = BarStore.at(tmp_path)
    fetched = DemoSource(activity=ACTIVITY).fetch(
        FetchRequest(load_catalog().instrument("ES"), JAN), lambda _msg: None
    )
    expected_raw = decode_month(fetched.payloads, "ES", JAN).bars
    raw = store.read(store.raw_path("ES", JAN))
    pd.testing.assert_frame_equal(raw, expected_raw, check_exact=True)
    assert len(raw) > 10_000 and raw["ts_event"].is_monotonic_increasing

    for label in ("15s", "30s", "1min"):
        tf = parse_timeframe(label)
        bars = store.read(store.aggregated_path("ES", JAN, tf))
        pd.testing.assert_frame_equal(bars, aggregate_bars(raw, tf), check_exact=True)

    events = {
        m.asset_key.to_user_string(): m.metadata
        for m in (
            ev.event_specific_data.materialization
            for ev in result.get_asset_materialization_events()
        )
    }
    assert set(events) == {"raw_1s_bars", "bars_15s", "bars_30s", "bars_1min"}
    meta = events["raw_1s_bars"]
    assert meta["dagster/row_count"].value == len(raw)
    assert meta["first_bar"].value == raw["ts_event"].iloc[0].isoformat()
    assert meta["last_bar"].value == raw["ts_event"].iloc[-1].isoformat()
    assert meta["path"].value.endswith("raw_1s/ES/ES_2024_01.parquet")
    assert meta["size_bytes"].value == os.path.getsize(meta["path"].value)
    assert "SYNTHETIC" in meta["source"].value
    assert [c.name for c in meta["dagster/column_schema"].schema.columns][:2] == [
        "ts_event",
        "symbol",
    ]
    assert meta["dataset"].value == "GLBX.MDP3"


def test_demo_materialization_is_byte_identical_twice(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    assert run_partition(first, fmt="csv").success
    assert run_partition(second, fmt="csv").success
    a, b = files_under(first), files_under(second)
    # four CSV files, each with its identity sidecar, which repeats too but for the time the
    # file was written (how a listing knows a CSV edited since, its size kept)
    assert len(a) == 8 and without_write_times(a) == without_write_times(b)
    assert sum(name.endswith(".csv.json") for name in a) == 4
    assert run_partition(first, fmt="csv").success  # and again over the existing files
    assert without_write_times(files_under(first)) == without_write_times(b)


@pytest.mark.parametrize("timeframes", [["15s", "30s", "1min"], ["1min", "30s", "15s"]])
def test_work_is_done_ahead_in_the_worker_thread_and_files_are_the_same(
    tmp_path, monkeypatch, timeframes
):
    # The raw step begins encoding its file before the raw rules, the bars step each bar file
    # before that timeframe's rules: no write has to encode its frame itself. The bars step
    # begins reconciliation's recomputation of the 15s bars from raw before it aggregates,
    # and that of 30s and 1min from the finer bars once aggregated: none is recomputed in
    # the step's own thread, whatever the order of the catalog's timeframes. The files are
    # exactly those written without any of it.
    catalog_file = tmp_path / "catalog.toml"
    old = 'timeframes = ["15s", "30s", "1min"]'
    catalog_file.write_text(DEFAULT_CATALOG.read_text().replace(old, f"timeframes = {timeframes}"))
    catalog = load_catalog(str(catalog_file))
    assert [tf.label for tf in catalog.timeframes] == timeframes
    plain, early = tmp_path / "plain", tmp_path / "early"
    monkeypatch.setattr(BarStore, "encode_ahead", lambda self, frame: None)
    monkeypatch.setattr(assets, "reconcile_ahead", lambda *args: None)
    assert run_partition(plain).success
    monkeypatch.undo()

    def encoded_again(table: object, f: object) -> None:
        raise AssertionError("a bar file was encoded at its write, not ahead")

    monkeypatch.setattr(storage, "_write_parquet", encoded_again)
    # Whether each frame's encoding had begun when its rules were run.
    begun: list[bool] = []
    for name in ("run_raw_rules", "run_aggregated_rules"):
        rules = getattr(assets, name)

        def watched(bars: pd.DataFrame, *args: object, _rules=rules, **kwargs: object):
            begun.append((id(bars), storage._ENCODING) in ahead._BEGUN)
            return _rules(bars, *args, **kwargs)

        monkeypatch.setattr(assets, name, watched)
    recomputed: list[tuple[str, str]] = []
    expected = comparison._expected  # what recomputes the bars, in either thread

    def where(arrays: object, timeframe: Timeframe) -> pd.DataFrame:
        recomputed.append((timeframe.label, threading.current_thread().name.split("_")[0]))
        return expected(arrays, timeframe)

    monkeypatch.setattr(comparison, "_expected", where)
    assert run_partition(early, catalog=catalog).success
    assert begun == [True] * 4  # raw, then 15s, 30s and 1min
    assert recomputed == [(label, "dbento-ahead") for label in ("15s", "30s", "1min")]
    files = files_under(early)
    assert len(files) == 4 and files == files_under(plain)


def without_write_times(files: dict[str, bytes]) -> dict[str, object]:
    """The files, each CSV sidecar read as JSON without its ``dbento.mtime_ns``."""
    out: dict[str, object] = {}
    for name, data in files.items():
        if name.endswith(".csv.json"):
            note = json.loads(data)
            assert int(note.pop("dbento.mtime_ns")) > 0
            out[name] = note
        else:
            out[name] = data
    return out


@pytest.mark.parametrize("extra", ["45s", "5min", "1h"])
def test_one_catalog_line_adds_a_working_timeframe(tmp_path, monkeypatch, extra):
    text = DEFAULT_CATALOG.read_text()
    old = 'timeframes = ["15s", "30s", "1min"]'
    assert old in text
    catalog_file = tmp_path / "catalog.toml"
    catalog_file.write_text(text.replace(old, f'timeframes = ["15s", "30s", "1min", "{extra}"]'))
    monkeypatch.setenv("DBENTO_CATALOG", str(catalog_file))
    monkeypatch.setenv("DBENTO_SOURCE", "demo")
    monkeypatch.setenv("DBENTO_DATA_DIR", str(tmp_path / "data"))
    label = parse_timeframe(extra).label
    defs = build_definitions()
    assert AssetKey(f"bars_{label}") in defs.resolve_assets_def(f"bars_{label}").keys
    root = tmp_path / "data"
    assert run_partition(root, catalog=load_catalog()).success
    store = BarStore.at(root)
    raw = store.read(store.raw_path("ES", JAN))
    tf = parse_timeframe(extra)
    new = store.read(store.aggregated_path("ES", JAN, tf))
    pd.testing.assert_frame_equal(new, aggregate_bars(raw, tf), check_exact=True)
    assert (new["ts_event"].array.asi8 % tf.nanos == 0).all()


def test_demo_run_refuses_a_root_with_real_data(tmp_path):
    BarStore.at(tmp_path).claim("databento", "databento")
    result = run_partition(tmp_path)
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    message = failure.step_failure_data.error.to_string()
    assert "real Databento market data" in message and "DBENTO_DATA_DIR" in message
    assert files_under(tmp_path) == {}


def test_partitions_of_two_symbols_are_kept_apart(tmp_path):
    assert run_partition(tmp_path, "2024-01-01|ES").success
    assert run_partition(tmp_path, "2024-02-01|SPY").success
    store = BarStore.at(tmp_path)
    spy = store.read(store.raw_path("SPY", Month(2024, 2)))
    assert set(spy["symbol"]) == {"SPY"}
    assert spy["ts_event"].min() >= Month(2024, 2).start
    assert spy["ts_event"].max() < Month(2024, 2).end
    assert store.aggregated_path("SPY", Month(2024, 2), parse_timeframe("1min")).exists()


def test_one_timeframe_can_be_rebuilt_alone(tmp_path):
    assert run_partition(tmp_path).success
    store = BarStore.at(tmp_path)
    path_30s = Path(store.aggregated_path("ES", JAN, parse_timeframe("30s")).path)
    path_15s = Path(store.aggregated_path("ES", JAN, parse_timeframe("15s")).path)
    before_15s = path_15s.stat().st_mtime_ns
    path_30s.unlink()
    catalog = load_catalog()
    result = materialize(
        build_assets(catalog),
        selection=["bars_30s"],
        partition_key=PARTITION,
        resources={
            "databento": (databento := DatabentoResource(source="demo", data_dir=str(tmp_path))),
            "io_manager": BarFileIOManager(databento=databento),
        },
        instance=DagsterInstance.ephemeral(),
    )
    assert result.success
    done = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert done == {"bars_30s"}
    assert path_30s.is_file() and path_15s.stat().st_mtime_ns == before_15s


def test_aggregation_takes_the_raw_month_from_memory_in_the_same_process(tmp_path, monkeypatch):
    reads: list[str] = []
    real_read = BarStore.read_with_identity  # every file read goes through it

    def counting_read(self, path):
        reads.append(str(path))
        return real_read(self, path)

    monkeypatch.setattr(BarStore, "read_with_identity", counting_read)
    assert run_partition(tmp_path).success  # in-process: both steps in this process
    assert not [p for p in reads if "raw_1s" in p]
    store = BarStore.at(tmp_path)
    raw = real_read(store, store.raw_path("ES", JAN))[0]
    bars = real_read(store, store.aggregated_path("ES", JAN, parse_timeframe("1min")))[0]
    pd.testing.assert_frame_equal(bars, aggregate_bars(raw, parse_timeframe("1min")))


def test_without_the_handoff_the_aggregation_reads_the_raw_file(tmp_path, monkeypatch):
    """DBENTO_HANDOFF=false (what bench_month.py compares): the bars step reads the raw file
    back once, and builds the same bars."""
    reads: list[str] = []
    real_read = BarStore.read_with_identity

    def counting_read(self, path):
        reads.append(str(path))
        return real_read(self, path)

    monkeypatch.setattr(BarStore, "read_with_identity", counting_read)
    monkeypatch.setenv("DBENTO_HANDOFF", "false")
    databento = DatabentoResource(source="demo", data_dir=str(tmp_path), demo_activity=ACTIVITY)
    io_manager = io_manager_from_env(databento)
    assert io_manager.handoff is False
    result = materialize(
        build_assets(load_catalog()),
        partition_key=PARTITION,
        resources={"databento": databento, "io_manager": io_manager},
        instance=DagsterInstance.ephemeral(),
    )
    assert result.success
    assert len([p for p in reads if "raw_1s" in p]) == 1
    store = BarStore.at(tmp_path)
    raw = real_read(store, store.raw_path("ES", JAN))[0]
    bars = real_read(store, store.aggregated_path("ES", JAN, parse_timeframe("1min")))[0]
    pd.testing.assert_frame_equal(bars, aggregate_bars(raw, parse_timeframe("1min")))


def test_handoff_is_refused_once_the_file_on_disk_changed(tmp_path):
    from dbento_assets.io_managers import _Handoff

    store = BarStore.at(tmp_path)
    path = store.raw_path("ES", JAN)
    frame = DemoSource(activity=ACTIVITY).fetch(
        FetchRequest(load_catalog().instrument("ES"), JAN), lambda _msg: None
    )
    bars = decode_month(frame.payloads, "ES", JAN).bars
    store.write(bars, path)
    handoff = _Handoff()
    handoff.keep(path, bars)
    assert handoff.take(path) is bars
    assert handoff.take(path) is None  # handed over once: the handoff keeps no month after
    handoff.keep(path, bars)
    assert handoff.take(store.raw_path("NQ", JAN)) is None
    handoff.keep(path, bars)
    store.write(bars.iloc[:-1], path)  # rewritten since: the file must be read again
    assert handoff.take(path) is None


def test_the_handoff_switch_takes_the_same_words_as_every_other_switch(tmp_path, monkeypatch):
    databento = DatabentoResource(source="demo", data_dir=str(tmp_path))
    monkeypatch.setenv("DBENTO_HANDOFF", "no")
    assert io_manager_from_env(databento).handoff is False
    monkeypatch.setenv("DBENTO_HANDOFF", "on")  # like DBENTO_VENDOR_CHECK: a likely typo
    with pytest.raises(StorageError, match="DBENTO_HANDOFF='on' is neither true nor false"):
        io_manager_from_env(databento)
