"""The monthly schedule: which month each tick asks for, one run per symbol, shipped stopped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest
from dagster import (
    DagsterInstance,
    DefaultScheduleStatus,
    Definitions,
    MultiPartitionKey,
    build_schedule_context,
)
from dagster._core.scheduler.instigation import InstigatorStatus

from dbento_assets.assets import WHOLE_MONTH_TAG, build_assets
from dbento_assets.core.catalog import DEFAULT_CATALOG, load_catalog
from dbento_assets.core.months import Month
from dbento_assets.core.storage import BarStore
from dbento_assets.core.timeframes import parse_timeframe
from dbento_assets.io_managers import BarFileIOManager
from dbento_assets.names import MONTHLY_JOB
from dbento_assets.resources import DatabentoResource
from dbento_assets.schedules import (
    CRON,
    MONTH_TAG,
    SCHEDULE_NAME,
    SCHEDULE_TAG,
    SYMBOL_TAG,
    build_schedules,
    last_available_month,
)

REPO = Path(__file__).resolve().parent.parent
CATALOG = load_catalog()
SYMBOLS = ["ES", "NQ", "GC", "SPY", "QQQ"]


def definitions(root=None, catalog=CATALOG) -> Definitions:
    databento = DatabentoResource(source="demo", data_dir=str(root or "./data"), demo_activity=0.05)
    return Definitions(
        assets=build_assets(catalog),
        schedules=build_schedules(catalog),
        resources={"databento": databento, "io_manager": BarFileIOManager(databento=databento)},
    )


def tick(at: datetime, defs: Definitions | None = None):
    defs = defs or definitions()
    schedule = defs.resolve_schedule_def(SCHEDULE_NAME)
    context = build_schedule_context(
        scheduled_execution_time=at, repository_def=defs.get_repository_def()
    )
    return schedule.evaluate_tick(context)


def test_catalog_under_test_has_the_expected_symbols():
    assert CATALOG.symbols == SYMBOLS


@pytest.mark.parametrize(
    ("at", "month"),
    [
        (datetime(2024, 3, 2, 6, tzinfo=UTC), "2024-02-01"),
        (datetime(2025, 1, 2, 6, tzinfo=UTC), "2024-12-01"),  # across a year end
        (datetime(2024, 12, 2, 6, tzinfo=UTC), "2024-11-01"),
    ],
)
def test_a_tick_asks_for_the_month_that_just_closed_once_per_symbol(at, month):
    result = tick(at)
    assert result.skip_message is None
    requests = result.run_requests
    assert [r.partition_key for r in requests] == [f"{month}|{s}" for s in SYMBOLS]
    for request, symbol in zip(requests, SYMBOLS, strict=True):
        assert isinstance(request.partition_key, MultiPartitionKey)
        assert request.partition_key.keys_by_dimension == {"month": month, "symbol": symbol}
        assert request.run_key == f"{month}|{symbol}"
        assert request.tags[SCHEDULE_TAG] == SCHEDULE_NAME
        assert request.tags[MONTH_TAG] == month[:7]
        assert request.tags[SYMBOL_TAG] == symbol
        assert "dbento/force" not in request.tags  # a schedule never pays twice for a month
        assert request.tags[WHOLE_MONTH_TAG] == "true"  # never stored partial by the close
        assert request.job_name in (None, MONTHLY_JOB)


def test_the_schedule_fires_on_the_2nd_at_0600_utc_after_the_24h_embargo():
    schedule = definitions().resolve_schedule_def(SCHEDULE_NAME)
    assert schedule.cron_schedule == CRON == "0 6 2 * *"
    assert schedule.execution_timezone == "UTC"
    assert schedule.job_name == MONTHLY_JOB
    # The last second of January is historical 24 hours later, on Feb 1st at 23:59:59 UTC;
    # the tick is after that.
    feb_tick = pd.Timestamp("2024-02-02T06:00Z")
    assert feb_tick - Month(2024, 1).end >= timedelta(hours=24)
    assert last_available_month(feb_tick.to_pydatetime()) == Month(2024, 1)


def test_last_available_month_respects_the_24_hours():
    # On the 1st at 05:00 UTC the last day of the previous month is still live data.
    assert last_available_month(datetime(2024, 3, 1, 5, tzinfo=UTC)) == Month(2024, 1)
    assert last_available_month(datetime(2024, 3, 2, 0, 0, 1, tzinfo=UTC)) == Month(2024, 2)
    with pytest.raises(ValueError, match="time zone"):
        last_available_month(datetime(2024, 3, 2, 6))


def test_a_tick_before_the_catalog_starts_is_skipped():
    assert CATALOG.start_month == Month(2024, 1)
    result = tick(datetime(2024, 1, 2, 6, tzinfo=UTC))
    assert result.run_requests == []
    assert "start_month" in result.skip_message


def test_it_ships_stopped():
    schedule = definitions().resolve_schedule_def(SCHEDULE_NAME)
    assert schedule.default_status == DefaultScheduleStatus.STOPPED


def test_the_job_covers_every_asset_and_a_new_timeframe(tmp_path):
    text = DEFAULT_CATALOG.read_text()
    old = 'timeframes = ["15s", "30s", "1min"]'
    catalog_file = tmp_path / "catalog.toml"
    catalog_file.write_text(text.replace(old, 'timeframes = ["15s", "30s", "1min", "5min"]'))
    catalog = load_catalog(catalog_file)
    defs = definitions(catalog=catalog)
    Definitions.validate_loadable(defs)
    job = defs.resolve_job_def(MONTHLY_JOB)
    selected = {key.to_user_string() for key in job.asset_layer.selected_asset_keys}
    assert selected == {"raw_1s_bars", "bars_15s", "bars_30s", "bars_1min", "bars_5min"}
    graph_checks = defs.resolve_asset_graph().asset_check_keys
    assert job.asset_layer.asset_graph.asset_check_keys >= graph_checks  # checks come along


def test_a_scheduled_run_request_materializes_its_partition(tmp_path):
    defs = definitions(tmp_path)
    request = tick(datetime(2024, 2, 2, 6, tzinfo=UTC), defs).run_requests[0]
    assert request.partition_key == "2024-01-01|ES"
    instance = DagsterInstance.ephemeral()
    result = defs.resolve_job_def(MONTHLY_JOB).execute_in_process(
        partition_key=request.partition_key, tags=request.tags, instance=instance
    )
    assert result.success
    store = BarStore.at(tmp_path)
    jan = Month(2024, 1)
    assert store.read(store.raw_path("ES", jan))["symbol"].eq("ES").all()
    for label in ("15s", "30s", "1min"):
        assert store.aggregated_path("ES", jan, parse_timeframe(label)).exists()
    run = instance.get_run_by_id(result.run_id)
    assert run.tags[SYMBOL_TAG] == "ES" and run.tags["dagster/partition"] == "2024-01-01|ES"


@pytest.mark.slow
def test_the_documented_command_turns_it_on(tmp_path):
    env = {**os.environ, "DBENTO_SOURCE": "demo", "DAGSTER_HOME": str(tmp_path)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # The README's command, against the code location with the schedule wired in.
    command = "dagster schedule start monthly_bars_schedule -m dbento_assets"
    with DagsterInstance.from_config(str(tmp_path)) as instance:
        assert instance.all_instigator_state() == []  # stopped: nothing recorded yet
    done = subprocess.run(
        command.split(), cwd=REPO, env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Started schedule monthly_bars_schedule" in done.stdout
    with DagsterInstance.from_config(str(tmp_path)) as instance:
        [state] = instance.all_instigator_state()
        assert state.name == SCHEDULE_NAME and state.status == InstigatorStatus.RUNNING


def test_loading_the_code_location_warns_of_nothing_about_backfill_policies(tmp_path):
    # Dagster warns at each load of a job mixing the raw asset's policy (a month a run) with
    # the batched bars' (the monthly job, or every asset at once); the mix is on purpose and
    # documented, and a user would read the warning at each start of the UI as a fault.
    code = (
        "from dagster import AssetSelection, Definitions, define_asset_job\n"
        "from dbento_assets.definitions import defs\n"
        "names = [job.name for job in defs.resolve_all_job_defs()]\n"
        "defs.resolve_implicit_global_asset_job_def()\n"
        "print(names)\n"
        # Another job mixing the same policies (by mistake, say) keeps its warning.
        "other = define_asset_job('another_job', selection=AssetSelection.all())\n"
        "mixed = Definitions(assets=list(defs.assets), resources=dict(defs.resources), "
        "jobs=[other])\n"
        "try:\n"
        "    mixed.resolve_job_def('another_job')\n"
        "except Exception as error:  # Dagster raises the warning wrapped in its own error\n"
        "    print('another job:', error.__cause__)\n"
    )
    done = fresh_python(code, "error::UserWarning", tmp_path)
    assert MONTHLY_JOB in done.stdout
    assert "BackfillPolicies" not in done.stderr
    assert "another job: Asset job another_job materializes assets with varying" in done.stdout


def test_describing_the_schedules_to_the_ui_warns_of_nothing(tmp_path):
    # Dagster reads its own deprecated ScheduleDefinition.environment_vars to describe each
    # schedule to the UI: a DeprecationWarning per schedule at each start of the UI, about
    # nothing a user of this project can change.
    code = (
        "import json, warnings\n"
        "from dbento_assets.definitions import defs\n"
        "names = [s.name for s in defs.get_repository_def().schedule_defs]\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    for name in names:\n"
        "        defs.resolve_schedule_def(name).environment_vars\n"
        "print(json.dumps({'schedules': names, 'warnings': [str(w.message) for w in seen]}))\n"
    )
    done = fresh_python(code, "always::DeprecationWarning", tmp_path)
    said = json.loads(done.stdout.strip().splitlines()[-1])
    assert SCHEDULE_NAME in said["schedules"] and said["warnings"] == [], said


def fresh_python(code: str, warning_option: str, home: Path) -> subprocess.CompletedProcess[str]:
    """``code`` run by a new interpreter with ``-W warning_option``, the demo source and the
    default settings (the default backfill batch: the raw and bars policies differ); it must
    succeed."""
    env = {**os.environ, "DBENTO_SOURCE": "demo", "DAGSTER_HOME": str(home)}
    env.pop("DBENTO_BACKFILL_BATCH", None)
    done = subprocess.run(
        [sys.executable, "-W", warning_option, "-c", code],
        cwd=home,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done
