"""The code location on Dagster's Celery executor with Postgres instance storage, for real.

A PostgreSQL server (Debian's binaries, started by the test on 127.0.0.1) holds the Dagster
instance of deploy/dagster-postgres.yaml and doubles as the Celery broker and result backend
(kombu's SQLAlchemy transport, so no RabbitMQ or Redis is needed here); a real
``dagster-celery worker start -y deploy/celery.yaml`` worker runs the steps; the bar files go
to a local S3 server (moto), the storage every machine of a cluster would share. The run is
started with the documented CLI command and ``DBENTO_EXECUTOR=celery``. Skipped when the
PostgreSQL server binaries or the ``deploy`` extra are not installed.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("dagster_celery")
pytest.importorskip("dagster_postgres")
psycopg2 = pytest.importorskip("psycopg2")
pytest.importorskip("moto.moto_server.threaded_moto_server")

from dagster import AssetKey, DagsterInstance, DagsterRunStatus  # noqa: E402

from dbento_assets.core.aggregate import aggregate_bars  # noqa: E402
from dbento_assets.core.months import Month  # noqa: E402
from dbento_assets.core.storage import BarStore  # noqa: E402
from dbento_assets.core.timeframes import parse_timeframe  # noqa: E402
from dbento_assets_tests.local_s3 import LocalS3, aws_env, objects, running_s3  # noqa: E402

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
BUCKET = "dbento-cluster"
PARTITION = "2024-01-01|ES"


def postgres_bindir() -> Path | None:
    for pattern in ("/usr/lib/postgresql/*/bin", "/usr/local/pgsql/bin"):
        for folder in sorted(glob.glob(pattern), reverse=True):
            if (Path(folder) / "initdb").exists() and (Path(folder) / "postgres").exists():
                return Path(folder)
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(process: subprocess.Popen, sig: int) -> None:
    """Stop a process this test started, and its children (it leads its own group)."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def postgres() -> Iterator[dict[str, str]]:
    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, postgres) are not installed")
    # Not under pytest's tmp folder: that one is private to the user running the tests, and
    # PostgreSQL may run as another user.
    root = Path(tempfile.mkdtemp(prefix="dbento-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run PostgreSQL")
        os.chown(root, account.pw_uid, account.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data = root / "data"
    initdb = [str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"]
    subprocess.run([*as_user, *initdb], check=True, capture_output=True, timeout=120)
    port = free_port()
    serve = [str(bindir / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port)]
    server = subprocess.Popen(
        [*as_user, *serve, "-k", str(root), "-F"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres")
                break
            except psycopg2.OperationalError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.2)
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute("CREATE DATABASE dagster")
        conn.close()
        yield {
            "DAGSTER_PG_HOST": "127.0.0.1",
            "DAGSTER_PG_PORT": str(port),
            "DAGSTER_PG_DB": "dagster",
            "DAGSTER_PG_USERNAME": "postgres",
            "DAGSTER_PG_PASSWORD": "unused-with-trust-auth",
        }
    finally:
        stop_group(server, signal.SIGINT)  # SIGINT: PostgreSQL's fast shutdown
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def s3() -> Iterator[LocalS3]:
    with running_s3(BUCKET) as server:
        yield server


@pytest.fixture(scope="module")
def cluster(postgres, s3, tmp_path_factory) -> Iterator[dict[str, str]]:
    """DAGSTER_HOME on Postgres, one Celery worker, the environment every process shares."""
    home = tmp_path_factory.mktemp("dagster_home")
    shutil.copy(REPO / "deploy" / "dagster-postgres.yaml", home / "dagster.yaml")
    pg = postgres
    url = f"postgres:x@{pg['DAGSTER_PG_HOST']}:{pg['DAGSTER_PG_PORT']}/{pg['DAGSTER_PG_DB']}"
    prefix = f"cluster-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DBENTO_", "DAGSTER_"))}
    env.update(pg)
    env.update(aws_env(s3.endpoint))
    env.update(
        DAGSTER_HOME=str(home),
        DBENTO_SOURCE="demo",
        DBENTO_DATA_DIR=f"s3://{BUCKET}/{prefix}",
        DBENTO_EXECUTOR="celery",
        DBENTO_CELERY_BROKER=f"sqla+postgresql+psycopg2://{url}",
        DBENTO_CELERY_BACKEND=f"db+postgresql+psycopg2://{url}",
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    log = home / "worker.log"
    with log.open("wb") as out:
        worker = subprocess.Popen(
            [
                str(BIN / "dagster-celery"),
                *("worker", "start", "-A", "dagster_celery.app"),
                *("-y", str(REPO / "deploy" / "celery.yaml"), "--name", "dbento-test-worker"),
            ],
            cwd=home,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while b" ready." not in log.read_bytes():
            if worker.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the Celery worker did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield {**env, "PREFIX": prefix, "WORKER_LOG": str(log)}
    finally:
        stop_group(worker, signal.SIGTERM)


def test_a_partition_runs_on_the_celery_worker_with_postgres_storage(cluster, monkeypatch):
    command = [
        str(BIN / "dagster"),
        "asset",
        "materialize",
        "-m",
        "dbento_assets",
        "--select",
        "raw_1s_bars,bars_15s,bars_1min",
        "--partition",
        PARTITION,
    ]
    env = {k: v for k, v in cluster.items() if k not in ("PREFIX", "WORKER_LOG")}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    # The run and its events are in Postgres, where the webserver of another machine sees them.
    for name in ("DAGSTER_HOME", *(k for k in env if k.startswith("DAGSTER_PG_"))):
        monkeypatch.setenv(name, env[name])
    with DagsterInstance.get() as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        [run] = instance.get_runs()
        assert run.status == DagsterRunStatus.SUCCESS
        assert run.tags["dagster/partition"] == PARTITION
        messages = [e.message or "" for e in instance.all_logs(run.run_id)]
        on_worker = [m for m in messages if "in celery worker" in m]
        assert any("raw_1s_bars" in m for m in on_worker), messages
        assert len(on_worker) == 2  # the download step and the aggregation step
        raw_event = instance.get_latest_materialization_event(AssetKey("raw_1s_bars"))
        assert raw_event.dagster_event.partition == PARTITION
        # The download took its slot from the databento pool, limited as the yaml says.
        info = instance.event_log_storage.get_concurrency_info("databento")
        assert info.slot_count == 2 and info.active_slot_count == 0
    assert "dbento-test-worker" in Path(cluster["WORKER_LOG"]).read_text()

    # The files are on the shared S3 storage, and the aggregation is right.
    prefix = cluster["PREFIX"]
    assert set(objects(BUCKET, prefix)) == {
        ".dbento_origin",
        "raw_1s/ES/ES_2024_01.parquet",
        "aggregated/15s/ES_2024_01_15s.parquet",
        "aggregated/1min/ES_2024_01_1min.parquet",
    }
    store = BarStore.at(f"s3://{BUCKET}/{prefix}")
    jan = Month(2024, 1)
    raw = store.read(store.raw_path("ES", jan))
    assert len(raw) > 10_000
    for label in ("15s", "1min"):
        tf = parse_timeframe(label)
        assert store.read(store.aggregated_path("ES", jan, tf)).equals(aggregate_bars(raw, tf))
