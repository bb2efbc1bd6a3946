"""DBENTO_DATA_DIR=s3://bucket/prefix against a local S3 server (moto) on 127.0.0.1, via s3fs.

The endpoint and credentials reach s3fs only through the standard AWS environment variables
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION), exactly as a
user would set them in the environment or the .env file: no code or config changes.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

boto3 = pytest.importorskip("boto3")
s3fs = pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.moto_server.threaded_moto_server")

from dagster import DagsterInstance, materialize  # noqa: E402

from dbento_assets.assets import build_assets  # noqa: E402
from dbento_assets.core.catalog import load_catalog  # noqa: E402
from dbento_assets.core.months import Month  # noqa: E402
from dbento_assets.core.storage import ORIGIN_MARKER, BarStore, StorageError  # noqa: E402
from dbento_assets.core.timeframes import parse_timeframe  # noqa: E402
from dbento_assets.io_managers import BarFileIOManager  # noqa: E402
from dbento_assets.resources import DatabentoResource  # noqa: E402
from dbento_assets_tests.gateway import TEST_KEY  # noqa: E402
from dbento_assets_tests.local_s3 import LocalS3, aws_env, running_s3  # noqa: E402
from dbento_assets_tests.local_s3 import objects as bucket_objects  # noqa: E402
from dbento_assets_tests.test_storage import sample_bars  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BUCKET = "dbento-bars"
JAN = Month(2024, 1)
ACTIVITY = 0.05


@pytest.fixture(scope="module")
def s3() -> Iterator[LocalS3]:
    with running_s3(BUCKET) as server:
        yield server


@pytest.fixture
def prefix(s3: LocalS3) -> str:
    s3.refuse_uploads = False
    return f"run-{uuid.uuid4().hex[:8]}"


def objects(prefix: str) -> dict[str, bytes]:
    return bucket_objects(BUCKET, prefix)


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_round_trip_through_s3_is_exact(prefix, fmt):
    store = BarStore.at(f"s3://{BUCKET}/{prefix}", fmt)
    frame = sample_bars()
    path = store.raw_path("ES", JAN)
    assert str(path) == f"s3://{BUCKET}/{prefix}/raw_1s/ES/ES_2024_01.{fmt}"
    size = store.write(frame, path)
    stored = objects(prefix)
    assert list(stored) == [f"raw_1s/ES/ES_2024_01.{fmt}"]  # no temporary objects left over
    assert size == len(stored[f"raw_1s/ES/ES_2024_01.{fmt}"]) > 0
    back = store.read(path)
    pd.testing.assert_frame_equal(back, frame, check_exact=True)
    # The object is the same file a local store writes, byte for byte.
    local = BarStore.at(f"memory://{prefix}", fmt)
    local_path = local.raw_path("ES", JAN)
    local.write(frame, local_path)
    assert stored[f"raw_1s/ES/ES_2024_01.{fmt}"] == local_path.read_bytes()


def test_claim_writes_the_origin_marker_and_refuses_the_other_origin(prefix):
    store = BarStore.at(f"s3://{BUCKET}/{prefix}")
    store.claim("synthetic", "demo")
    assert objects(prefix) == {ORIGIN_MARKER: b"synthetic\n"}
    store.claim("synthetic", "demo")  # the same origin again is fine
    with pytest.raises(StorageError, match="SYNTHETIC demo data") as refused:
        BarStore.at(f"s3://{BUCKET}/{prefix}").claim("vendor", "databento")
    assert "DBENTO_DATA_DIR" in str(refused.value)
    assert objects(prefix) == {ORIGIN_MARKER: b"synthetic\n"}


def test_a_failed_write_leaves_the_previous_object_intact(s3, prefix):
    store = BarStore.at(f"s3://{BUCKET}/{prefix}")
    path = store.raw_path("ES", JAN)
    store.write(sample_bars(), path)
    before = objects(prefix)
    uploads = s3.uploads

    # 1. The file cannot be serialized: nothing is uploaded at all.
    with pytest.raises(StorageError, match="missing columns"):
        store.write(sample_bars().drop(columns=["volume"]), path)

    # 2. Serialization dies halfway through the file.
    def crash_midway(f: io.BufferedIOBase) -> None:
        f.write(before["raw_1s/ES/ES_2024_01.parquet"][:100])
        raise RuntimeError("killed while writing")

    from dbento_assets.core.storage import write_atomic

    with pytest.raises(RuntimeError, match="killed while writing"):
        write_atomic(path, crash_midway)
    assert s3.uploads == uploads

    # 3. The server refuses the upload.
    s3.refuse_uploads = True
    other = sample_bars()
    other["close"] = other["close"] + 1.0
    with pytest.raises(StorageError, match="could not write") as refused:
        store.write(other, path)
    assert "AWS_ENDPOINT_URL" in str(refused.value)
    assert s3.uploads > uploads  # the upload was really attempted
    s3.refuse_uploads = False

    assert objects(prefix) == before
    pd.testing.assert_frame_equal(store.read(path), sample_bars(), check_exact=True)


def test_a_missing_bucket_is_a_clear_error_and_is_never_created(prefix):
    missing = f"no-such-bucket-{prefix}"
    store = BarStore.at(f"s3://{missing}/bars")
    with pytest.raises(StorageError, match="bucket exists"):
        store.claim("synthetic", "demo")
    names = [b["Name"] for b in boto3.client("s3").list_buckets()["Buckets"]]
    assert BUCKET in names and missing not in names


def test_the_io_manager_materializes_raw_and_bars_into_s3(tmp_path, prefix):
    assets = build_assets(load_catalog())

    def run(data_dir: str):
        return materialize(
            assets,
            selection=["raw_1s_bars", "bars_15s"],
            partition_key="2024-01-01|ES",
            resources={
                "databento": (
                    databento := DatabentoResource(
                        source="demo", data_dir=data_dir, demo_activity=ACTIVITY
                    )
                ),
                "io_manager": BarFileIOManager(databento=databento),
            },
            instance=DagsterInstance.ephemeral(),
        )

    remote_root = f"s3://{BUCKET}/{prefix}"
    result = run(remote_root)
    assert result.success
    assert run(str(tmp_path)).success  # the same partition on a local disk, to compare

    stored = objects(prefix)
    raw_key, bars_key = "raw_1s/ES/ES_2024_01.parquet", "aggregated/15s/ES_2024_01_15s.parquet"
    assert set(stored) == {ORIGIN_MARKER, raw_key, bars_key}
    assert stored[ORIGIN_MARKER] == b"synthetic\n"
    assert stored[raw_key] == (tmp_path / raw_key).read_bytes()
    assert stored[bars_key] == (tmp_path / bars_key).read_bytes()

    remote, local = BarStore.at(remote_root), BarStore.at(tmp_path)
    tf = parse_timeframe("15s")
    pd.testing.assert_frame_equal(
        remote.read(remote.aggregated_path("ES", JAN, tf)),
        local.read(local.aggregated_path("ES", JAN, tf)),
        check_exact=True,
    )
    meta = {
        m.asset_key.to_user_string(): m.metadata
        for m in (
            e.event_specific_data.materialization for e in result.get_asset_materialization_events()
        )
    }
    assert meta["raw_1s_bars"]["path"].value == f"{remote_root}/{raw_key}"
    assert meta["bars_15s"]["size_bytes"].value == len(stored[bars_key])


@pytest.mark.slow
def test_the_cli_writes_to_s3_with_nothing_but_environment_variables(s3, prefix, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DBENTO_", "DAGSTER_HOME"))}
    env.update(aws_env(s3.endpoint))
    env.update(DBENTO_SOURCE="demo", DBENTO_DATA_DIR=f"s3://{BUCKET}/{prefix}")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    done = subprocess.run(
        [
            "dagster",
            "asset",
            "materialize",
            "-m",
            "dbento_assets",
            "--select",
            "raw_1s_bars,bars_1min",
            "--partition",
            "2024-02-01|SPY",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    stored = objects(prefix)
    assert set(stored) == {
        ORIGIN_MARKER,
        "raw_1s/SPY/SPY_2024_02.parquet",
        "aggregated/1min/SPY_2024_02_1min.parquet",
    }
    store = BarStore.at(f"s3://{BUCKET}/{prefix}")
    bars = store.read(store.aggregated_path("SPY", Month(2024, 2), parse_timeframe("1min")))
    assert len(bars) > 1000 and set(bars["symbol"]) == {"SPY"}


def paid_run(gateway, remote_root: str, cache: Path, selection: list[str]):
    """ES January 2024 from the test gateway, bars in the bucket, DBN cache on disk."""
    databento = DatabentoResource(
        source="databento",
        api_key=TEST_KEY,
        gateway=gateway.url,
        data_dir=remote_root,
        cache_dir=str(cache),
        retry_backoff_seconds=0.0,
    )
    return materialize(
        build_assets(load_catalog()),
        selection=selection,
        partition_key="2024-01-01|ES",
        resources={"databento": databento, "io_manager": BarFileIOManager(databento=databento)},
        instance=DagsterInstance.ephemeral(),
        raise_on_error=False,
    )


def test_databento_downloads_with_bars_on_s3_and_the_cache_on_disk(gateway, tmp_path, prefix):
    """The paid source: DBN cache in a local DBENTO_CACHE_DIR, bar files in the bucket; a
    second run finds the month in the cache and makes no request."""
    remote_root = f"s3://{BUCKET}/{prefix}"
    cache = tmp_path / "cache"

    def run():
        return paid_run(gateway, remote_root, cache, ["raw_1s_bars", "bars_1min"])

    assert run().success
    assert (cache / "dbn" / "ES" / "ES_2024_01.ohlcv-1s.dbn.zst").is_file()
    stored = objects(prefix)
    assert stored[ORIGIN_MARKER] == b"databento\n"
    assert {"raw_1s/ES/ES_2024_01.parquet", "aggregated/1min/ES_2024_01_1min.parquet"} <= set(
        stored
    )
    requests_before = gateway.count()
    assert run().success
    assert gateway.count() == requests_before  # resumed from the local cache: nothing paid


def test_a_bucket_that_refuses_writes_is_refused_before_any_request(gateway, s3, tmp_path, prefix):
    """Issue 9 item 7: the data folder is proven writable (one probe object, stored and
    deleted) before the paid source is asked for anything."""
    remote_root = f"s3://{BUCKET}/{prefix}"
    s3.refuse_uploads = True
    result = paid_run(gateway, remote_root, tmp_path / "cache", ["raw_1s_bars"])
    s3.refuse_uploads = False
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    message = failure.step_failure_data.error.to_string()
    assert "could not write" in message and "AWS_ENDPOINT_URL" in message
    assert gateway.count() == 0
    assert objects(prefix) == {}
    assert not (tmp_path / "cache").exists()
