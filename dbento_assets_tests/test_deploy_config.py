"""deploy/dagster.yaml loaded by a real Dagster instance: run queue, databento pool, retries."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dagster import DagsterInstance, materialize
from dagster._core.run_coordinator import QueuedRunCoordinator
from dagster._core.storage.runs.sqlite import SqliteRunStorage

from dbento_assets.assets import DOWNLOAD_POOL, build_assets
from dbento_assets.core.catalog import load_catalog
from dbento_assets.io_managers import BarFileIOManager
from dbento_assets.resources import DatabentoResource

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "deploy" / "dagster.yaml"


@pytest.fixture
def dagster_home(tmp_path: Path) -> Path:
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(EXAMPLE, home / "dagster.yaml")
    return home


def test_the_example_is_the_instance_config(dagster_home):
    with DagsterInstance.from_config(str(dagster_home)) as instance:
        assert isinstance(instance.run_coordinator, QueuedRunCoordinator)
        concurrency = instance.get_concurrency_config()
        assert concurrency.run_queue_config.max_concurrent_runs == 2
        assert concurrency.pool_config.default_pool_limit == 2
        assert concurrency.pool_config.pool_granularity.value == "op"
        assert instance.global_op_concurrency_default_limit == 2

        assert instance.run_retries_enabled
        assert instance.run_retries_max_retries == 2
        assert instance.run_retries_retry_on_asset_or_op_failure is False

        assert instance.run_monitoring_enabled
        assert instance.run_monitoring_start_timeout_seconds == 180
        assert not instance.telemetry_enabled

        # Nothing configured for storage: SQLite files under DAGSTER_HOME, as the comments say.
        assert isinstance(instance.run_storage, SqliteRunStorage)
        assert Path(instance.root_directory) == dagster_home
        assert instance.get_runs() == []
        assert (dagster_home / "history" / "runs.db").is_file()


def test_dagster_home_from_the_environment_picks_the_file_up(dagster_home, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(dagster_home))
    with DagsterInstance.get() as instance:
        assert instance.run_retries_max_retries == 2
        assert instance.get_concurrency_config().run_queue_config.max_concurrent_runs == 2


def test_a_download_takes_its_slot_from_the_databento_pool(dagster_home, tmp_path):
    catalog = load_catalog()
    data = tmp_path / "data"
    with DagsterInstance.from_config(str(dagster_home)) as instance:
        assert instance.event_log_storage.get_concurrency_keys() == set()
        result = materialize(
            build_assets(catalog)[:1],  # raw_1s_bars, the asset in the pool
            partition_key="2024-01-01|ES",
            resources={
                "databento": (
                    databento := DatabentoResource(
                        source="demo", data_dir=str(data), demo_activity=0.05
                    )
                ),
                "io_manager": BarFileIOManager(databento=databento),
            },
            instance=instance,
        )
        assert result.success
        # The step claimed a slot of the pool it names, which the default limit created.
        assert DOWNLOAD_POOL == "databento"
        assert instance.event_log_storage.get_concurrency_keys() == {DOWNLOAD_POOL}
        info = instance.event_log_storage.get_concurrency_info(DOWNLOAD_POOL)
        assert info.slot_count == 2
        assert info.active_slot_count == 0  # and gave it back


@pytest.mark.slow
def test_the_documented_pool_command_overrides_the_default(dagster_home):
    env = {**os.environ, "DAGSTER_HOME": str(dagster_home)}
    dagster = [sys.executable, "-m", "dagster", "instance", "concurrency"]
    done = subprocess.run(
        [*dagster, "set", "databento", "4"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    shown = subprocess.run(
        [*dagster, "get", "databento"], env=env, capture_output=True, text=True, timeout=120
    )
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "4" in shown.stdout
    with DagsterInstance.from_config(str(dagster_home)) as instance:
        limits = {p.name: p for p in instance.event_log_storage.get_pool_limits()}
        assert limits["databento"].limit == 4
        assert not limits["databento"].from_default  # the default of 2 will not overwrite it
