"""Settings checked before paying, the origin mark, and no leftover temporary files (issue 9,
items 7, 9 and 10), through Dagster with the real databento client against the test gateway.

Every refused setting must leave the gateway without a single request. An unwritable folder
is a read-only tmpfs mounted over it when the tests run as root (root ignores ``chmod``), and
a ``chmod 500`` folder otherwise.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dagster import DagsterInstance, instance_for_test, materialize

from dbento_assets.assets import build_assets
from dbento_assets.cli import run as dbento
from dbento_assets.core.catalog import Catalog, load_catalog
from dbento_assets.core.months import Month
from dbento_assets.core.storage import (
    ORIGIN_MARKER,
    REFUSED_NOTE,
    STALE_TEMP_SECONDS,
    BarStore,
    StorageError,
    check_local_folder,
    remove_stale_temps_of,
)
from dbento_assets.core.timeframes import parse_timeframe
from dbento_assets.definitions import build_definitions
from dbento_assets.io_managers import BarFileIOManager
from dbento_assets.resources import DatabentoResource, databento_resource_from_env
from dbento_assets_tests.gateway import (
    GET_RANGE,
    TEST_KEY,
    FakeGateway,
)
from dbento_assets_tests.test_file_identity import failure_text
from dbento_assets_tests.test_storage import kill_mid_write

JAN = Month(2024, 1)
PARTITION = "2024-01-01|ES"
ACTIVITY = 0.05


def paid_source(gateway: FakeGateway, data: Path, **settings: object) -> DatabentoResource:
    return DatabentoResource(
        source="databento",
        api_key=TEST_KEY,
        gateway=gateway.url,
        data_dir=str(data),
        retry_backoff_seconds=0.0,
        **settings,
    )


def run(
    databento: DatabentoResource,
    fmt: str = "parquet",
    catalog: Catalog | None = None,
    partition: str = PARTITION,
    selection: list[str] | None = None,
):
    return materialize(
        build_assets(catalog or load_catalog()),
        selection=selection or ["raw_1s_bars"],
        partition_key=partition,
        resources={
            "databento": databento,
            "io_manager": BarFileIOManager(databento=databento, format=fmt),
        },
        instance=DagsterInstance.ephemeral(),
        raise_on_error=False,
    )


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[Path]:
    """``folder`` (with what it holds) made unwritable for this process: bound read-only
    onto itself as root (root ignores ``chmod``), else ``chmod 500``. Skips the test when
    neither can be done."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        folder.chmod(0o500)
        try:
            yield folder
        finally:
            folder.chmod(0o700)
        return
    target = str(folder)
    bound = subprocess.run(["mount", "--bind", target, target], capture_output=True, text=True)
    if bound.returncode != 0:
        pytest.skip(f"root ignores chmod and a read-only mount failed: {bound.stderr.strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", target], check=True, capture_output=True)
        yield folder
    finally:
        subprocess.run(["umount", target], check=True)


# ----------------------------------------------------------------- 7. settings before paying


def test_an_unknown_file_format_is_refused_before_any_request(gateway, tmp_path, monkeypatch):
    monkeypatch.setenv("DBENTO_FORMAT", "xlsx")
    defs = build_definitions(databento=paid_source(gateway, tmp_path / "data"))
    result = defs.resolve_implicit_global_asset_job_def().execute_in_process(
        instance=DagsterInstance.ephemeral(),
        partition_key=PARTITION,
        asset_selection=[build_assets(load_catalog())[0].key],
        raise_on_error=False,
    )
    assert not result.success
    assert "DBENTO_FORMAT='xlsx' is not a bar file format: set it to parquet or csv." in (
        failure_text(result)
    )
    assert gateway.count() == 0
    assert not (tmp_path / "data").exists()  # nothing created, no origin mark


def test_an_unwritable_data_folder_is_refused_before_any_request(gateway, tmp_path):
    # A folder that already holds real data (its origin mark can be read), but no new file.
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / ORIGIN_MARKER).write_text("databento\n")
    with read_only(tmp_path / "data") as data:
        with pytest.raises(OSError):
            (data / "probe").write_text("x")  # really read-only for this (root) process
        result = run(paid_source(gateway, data, cache_dir=str(tmp_path / "cache")))
        assert not result.success
        text = failure_text(result)
        assert f"The data folder {data} is not writable" in text and "DBENTO_DATA_DIR" in text
        # dbento build prints that sentence too, not the OSError beneath it.
        out = io.StringIO()
        defs = build_definitions(databento=paid_source(gateway, data, cache_dir=str(tmp_path)))
        with instance_for_test() as instance:
            argv = ["build", "--partition", PARTITION]
            assert dbento(argv, out, io.StringIO(), defs=defs, instance=instance) != 0
        assert f"The data folder {data} is not writable" in out.getvalue(), out.getvalue()
        assert "OSError" not in out.getvalue()
        assert gateway.count() == 0
    assert not (tmp_path / "cache").exists()


def test_an_unwritable_dbn_cache_folder_is_refused_before_any_request(gateway, tmp_path):
    with read_only(tmp_path / "cache") as cache:
        result = run(paid_source(gateway, tmp_path / "data", cache_dir=str(cache)))
        assert not result.success
        text = failure_text(result)
        assert "The DBN download cache folder" in text and "is not writable" in text
        assert "DBENTO_CACHE_DIR" in text
        assert gateway.count() == 0
    assert not (tmp_path / "data").exists()


def test_a_catalog_file_changed_since_loading_is_refused_before_any_request(gateway, tmp_path):
    text = load_catalog().path.read_text(encoding="utf-8")
    path = tmp_path / "catalog.toml"
    path.write_text(text, encoding="utf-8")
    catalog = load_catalog(path)
    assert catalog.instrument("ES").request_symbol == "ES.v.0"
    path.write_text(text.replace('"ES.v.0"', '"ES.c.0"'), encoding="utf-8")
    result = run(paid_source(gateway, tmp_path / "data"), catalog=catalog)
    assert not result.success
    assert "changed the entry of ES since the code location was loaded" in failure_text(result)
    path.write_text("this is not toml [", encoding="utf-8")
    result = run(paid_source(gateway, tmp_path / "data"), catalog=catalog)
    assert "no longer loads" in failure_text(result)
    assert gateway.count() == 0


def test_a_folder_of_demo_data_is_refused_to_the_paid_source_before_any_request(gateway, tmp_path):
    data = tmp_path / "data"
    assert run(DatabentoResource(source="demo", data_dir=str(data), demo_activity=ACTIVITY)).success
    result = run(paid_source(gateway, data))
    assert not result.success
    assert "SYNTHETIC demo data" in failure_text(result)
    assert gateway.count() == 0


# ------------------------------------------------------------------------- 9. the origin mark


def test_a_run_without_a_key_marks_nothing_and_demo_then_works(gateway, tmp_path, monkeypatch):
    data = tmp_path / "data"
    for name in ("DATABENTO_API_KEY", "DBENTO_SOURCE", "DBENTO_FORMAT", "DBENTO_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no .env here
    monkeypatch.setenv("DBENTO_DATA_DIR", str(data))
    result = run(databento_resource_from_env())
    assert not result.success
    assert "DBENTO_SOURCE=demo" in failure_text(result)
    assert not (data / ORIGIN_MARKER).exists()
    assert gateway.count() == 0
    # The error's own advice now works in the same folder.
    monkeypatch.setenv("DBENTO_SOURCE", "demo")
    demo = databento_resource_from_env().model_copy(update={"demo_activity": ACTIVITY})
    assert run(demo).success
    assert (data / ORIGIN_MARKER).read_text() == "synthetic\n"


def test_the_origin_mark_comes_with_the_first_file(gateway, tmp_path):
    data = tmp_path / "data"
    assert run(paid_source(gateway, data)).success
    assert gateway.count(GET_RANGE) == 1
    assert (data / ORIGIN_MARKER).read_text() == "databento\n"
    assert (data / "raw_1s" / "ES" / "ES_2024_01.parquet").is_file()


# ------------------------------------------------------------------ 10. no leftover temps


def killed_write(store: BarStore, symbol: str) -> Path:
    """A real process killed in the middle of writing ``symbol``'s raw file; its temporary
    file, made an hour old (the kill happened earlier), is returned."""
    kill_mid_write(store, symbol)
    raw = Path(store.raw_path(symbol, JAN).path)
    (temp,) = raw.parent.glob(f".{raw.name}.*.tmp")
    old = time.time() - 3600
    os.utime(temp, (old, old))
    return temp


def test_a_killed_writes_temp_is_removed_by_the_next_run_of_its_partition_only(tmp_path):
    data = tmp_path / "data"
    store = BarStore.at(data)
    es_temp, nq_temp = killed_write(store, "ES"), killed_write(store, "NQ")
    bars = Path(store.aggregated_path("ES", JAN, parse_timeframe("15s")).path)
    bars.parent.mkdir(parents=True)
    bars_temp = bars.parent / f".{bars.name}.{'0' * 32}.tmp"  # one from an older run
    bars_temp.write_bytes(b"half")
    os.utime(bars_temp, (time.time() - 3600,) * 2)
    demo = DatabentoResource(source="demo", data_dir=str(data), demo_activity=ACTIVITY)
    assert run(demo).success  # raw only: its preflight cleans every file of the partition
    assert not es_temp.exists() and not bars_temp.exists()
    assert nq_temp.exists()  # another partition's: untouched
    assert (data / "raw_1s" / "ES" / "ES_2024_01.parquet").is_file()


def test_a_killed_writes_temp_of_a_note_beside_the_raw_file_is_removed(tmp_path):
    data = tmp_path / "data"
    note = Path(BarStore.at(data).note_path("ES", JAN, REFUSED_NOTE).path)
    note.parent.mkdir(parents=True)
    temp = note.parent / f".{note.name}.{'0' * 32}.tmp"
    temp.write_bytes(b'{"run_id": ')
    os.utime(temp, (time.time() - 3600,) * 2)
    demo = DatabentoResource(source="demo", data_dir=str(data), demo_activity=ACTIVITY)
    assert run(demo).success
    assert not temp.exists() and not note.exists()


def test_a_temp_held_by_a_live_writer_is_kept_however_old(tmp_path):
    target = tmp_path / "ES_2024_01.parquet"
    temp = tmp_path / f".{target.name}.{'a' * 32}.tmp"
    temp.write_bytes(b"in progress")
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time\n"
            f"f = open({str(temp)!r}, 'ab'); fcntl.flock(f.fileno(), fcntl.LOCK_EX)\n"
            "print('locked', flush=True); time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout.readline().strip() == "locked"
        os.utime(temp, (time.time() - 10 * STALE_TEMP_SECONDS,) * 2)
        assert remove_stale_temps_of(str(target)) == []
        assert temp.exists()
    finally:
        writer.kill()
        writer.wait()
    # its writer is gone: now it is stale
    assert remove_stale_temps_of(str(target)) == [str(temp)]
    assert not temp.exists()


def test_a_fresh_unlocked_temp_is_kept(tmp_path):
    target = tmp_path / "ES_2024_01.parquet"
    temp = tmp_path / f".{target.name}.{'b' * 32}.tmp"
    temp.write_bytes(b"just created, lock not taken yet")
    assert remove_stale_temps_of(str(target)) == []
    assert temp.exists()


def test_a_folder_another_process_makes_during_the_check_is_not_called_a_file(
    tmp_path, monkeypatch
):
    # Two build processes on a new data folder: one makes raw_1s/ while the other checks it
    # (seen first as missing, then existing). It was refused as "not a folder".
    folder = tmp_path / "data" / "raw_1s"
    real_isdir = os.path.isdir
    raced: list[str] = []

    def isdir(path: str) -> bool:
        found = real_isdir(path)
        if os.fspath(path) == str(folder) and not raced:
            raced.append(path)
            folder.mkdir(parents=True)  # the other process, just after this one looked
        return found

    monkeypatch.setattr(os.path, "isdir", isdir)
    check_local_folder(folder, "The data folder", "fix it")
    assert raced and real_isdir(folder)

    monkeypatch.undo()
    (tmp_path / "data" / "bars_15s").write_text("a file")
    with pytest.raises(StorageError, match="bars_15s is not a folder"):
        check_local_folder(tmp_path / "data" / "bars_15s", "The data folder", "fix it")
