"""``dbento build`` (alias ``python -m dbento_assets.backfill``): one run per partition.

The first test runs the command as a user would (a subprocess with ``DAGSTER_HOME``, the demo
source and a data folder in a temporary directory) and reads the instance afterwards: one run
per partition with its partition tags, every asset materialized per partition, every asset
check result attributed to its partition, and the bar files on disk. The others call
:func:`run` (``dbento build``) in this process with definitions built for the test: the
Databento source against the fake HTTPS gateway (a failed month, resuming it with
``--missing-only`` without requesting the other month again, ``--force`` downloading again),
``--select``, the project's own history without ``DAGSTER_HOME`` and every usage error,
each a single line.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections import Counter

import pandas as pd
import pytest
from dagster import AssetKey, DagsterInstance, RunsFilter, instance_for_test

from dbento_assets.assets import FORCE_TAG
from dbento_assets.backfill import RANGE_TAG
from dbento_assets.cli import run as dbento
from dbento_assets.core.months import Month
from dbento_assets.core.storage import BarStore
from dbento_assets.core.timeframes import parse_timeframe
from dbento_assets.definitions import build_definitions
from dbento_assets.names import RAW_ASSET
from dbento_assets.partitions import Partition, partition_key
from dbento_assets.range_job import JOB_NAME
from dbento_assets.resources import DatabentoResource
from dbento_assets_tests.deployment import (
    check_evaluations,
    materializations,
    partition_of,
    write_dagster_yaml,
)
from dbento_assets_tests.gateway import (
    GET_RANGE,
    TEST_KEY,
    FakeGateway,
)

JAN, FEB = Month(2024, 1), Month(2024, 2)
ES_JAN, ES_FEB = str(partition_key(JAN, "ES")), str(partition_key(FEB, "ES"))


def run(argv: list[str], *args: object, **kwargs: object) -> int:
    """``dbento build ARGV`` in this process (tests pass ``defs`` and ``instance``)."""
    return dbento(["build", *argv], *args, **kwargs)


def all_runs(instance: DagsterInstance) -> list:
    return sorted(instance.get_runs(RunsFilter()), key=lambda r: r.run_id)


def assert_attributed(instance: DagsterInstance, runs: list, assets: list[str]) -> None:
    """One materialization per asset and partition, each check result with its partition."""
    run_of = {partition_of(r): r.run_id for r in runs}
    mats = materializations(instance, [r.run_id for r in runs])
    assert Counter((m.asset, m.partition) for m in mats) == Counter(
        {(a, p): 1 for a in assets for p in run_of}
    )
    evaluations = check_evaluations(instance, [r.run_id for r in runs])
    assert evaluations, "the assets declare checks; their results must be recorded"
    per_check = Counter((e.asset, e.check_name, e.partition) for e in evaluations)
    checks = {(e.asset, e.check_name) for e in evaluations}
    assert per_check == Counter({(a, c, p): 1 for a, c in checks for p in run_of})
    assert {e.asset for e in evaluations} <= set(assets)
    for evaluation in evaluations:
        assert evaluation.run_id == run_of[evaluation.partition]


def test_command_materializes_each_month_in_its_own_run(tmp_path):
    home = tmp_path / "dagster_home"
    write_dagster_yaml(home)
    data = tmp_path / "data"
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "DBENTO_SOURCE": "demo",
        "DBENTO_DATA_DIR": str(data),
    }
    command = [sys.executable, "-m", "dbento_assets.backfill"]
    args = ["--symbol", "ES", "--start", "2024-01", "--end", "2024-02"]
    done = subprocess.run(
        command + args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )

    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[:2] for line in lines[:2]] == [[ES_JAN, "ok"], [ES_FEB, "ok"]]
    assert lines[2].startswith("Done in ")
    assert "2 partition(s), 2 built, 0 skipped (already built), 0 failed; " in lines[2]
    assert "rows in 8 file(s)" in lines[2] and "Databento cost $0.0000." in lines[2]
    store = BarStore.at(data)
    with DagsterInstance.from_config(str(home)) as instance:
        runs = all_runs(instance)
        assert sorted(partition_of(r) for r in runs) == [ES_JAN, ES_FEB]
        assert {r.status.value for r in runs} == {"SUCCESS"}
        assert {r.tags[RANGE_TAG] for r in runs} == {"ES 2024-01..2024-02"}
        assets = ["bars_15s", "bars_1min", "bars_30s", RAW_ASSET]
        assert_attributed(instance, runs, assets)
        for mat in materializations(instance, [r.run_id for r in runs]):
            parsed = Partition.from_key(mat.partition)
            month, symbol = parsed.month, parsed.symbol
            name = mat.asset.removeprefix("bars_")
            path = (
                store.raw_path(symbol, month)
                if mat.asset == RAW_ASSET
                else store.aggregated_path(symbol, month, parse_timeframe(name))
            )
            assert mat.metadata["path"] == str(path.path)
            assert len(store.read(path)) == mat.metadata["dagster/row_count"] > 0


@pytest.fixture
def gateway_defs(gateway: FakeGateway, tmp_path):
    resource = DatabentoResource(
        source="databento",
        api_key=TEST_KEY,
        gateway=gateway.url,
        data_dir=str(tmp_path / "data"),
        retry_attempts=2,
        retry_backoff_seconds=0.0,
    )
    return build_definitions(databento=resource)


def get_ranges(gateway: FakeGateway) -> Counter[str]:
    """Successful ohlcv-1s ``get_range`` requests per month (``YYYY-MM`` of the start)."""
    return Counter(
        pd.Timestamp(r.fields["start"]).strftime("%Y-%m")
        for r in gateway.calls(GET_RANGE)
        if r.fault is None and r.fields.get("schema") == "ohlcv-1s"
    )


def test_failed_month_resumes_with_missing_only_and_force_downloads_again(gateway, gateway_defs):
    argv = ["--symbol", "ES", "--start", "2024-01", "--end", "2024-02"]
    with instance_for_test() as instance:
        # Both attempts of the first download fail: that month fails, the next one succeeds.
        gateway.fail("500", endpoint=GET_RANGE, times=2)
        out = io.StringIO()
        status = run(argv, out, io.StringIO(), defs=gateway_defs, instance=instance)
        lines = out.getvalue().splitlines()
        assert status == 1, out.getvalue()
        assert lines[0].split()[:2] == [ES_JAN, "FAILED"]
        assert (
            lines[1]
            .strip()
            .startswith("SourceError: timeseries.get_range for ES 2024-01 failed 2 times")
        ), lines[1]
        assert lines[2].split()[:2] == [ES_FEB, "ok"]
        assert "1 built, 0 skipped (already built), 1 failed" in lines[3]
        assert lines[4].startswith(f"Failed: {ES_JAN}.") and "--missing-only" in lines[4]
        assert get_ranges(gateway) == Counter({"2024-02": 1})

        out = io.StringIO()
        status = run([*argv, "--missing-only"], out, defs=gateway_defs, instance=instance)
        assert status == 0, out.getvalue()
        assert [line.split()[:2] for line in out.getvalue().splitlines()[:2]] == [
            [ES_JAN, "ok"],
            [ES_FEB, "skipped"],
        ]
        assert get_ranges(gateway) == Counter({"2024-01": 1, "2024-02": 1})

        out = io.StringIO()
        status = run([*argv, "--force"], out, defs=gateway_defs, instance=instance)
        assert status == 0, out.getvalue()
        assert get_ranges(gateway) == Counter({"2024-01": 2, "2024-02": 2})
        forced = [r for r in all_runs(instance) if r.tags.get(FORCE_TAG) == "true"]
        assert sorted(partition_of(r) for r in forced) == [ES_JAN, ES_FEB]
        for mat in materializations(instance, [r.run_id for r in forced]):
            if mat.asset == RAW_ASSET:
                assert mat.metadata["forced"] is True
        assets = [k.to_user_string() for k in gateway_defs.resolve_all_asset_keys()]
        assert_attributed(instance, forced, assets)


def test_dagster_asset_materialize_one_partition_and_force_it(gateway, tmp_path):
    """The stock CLI for one partition, then force by run config: one more download."""
    home = tmp_path / "dagster_home"
    write_dagster_yaml(home)
    env = {
        **os.environ,  # the gateway fixture set DBENTO_GATEWAY and REQUESTS_CA_BUNDLE
        "DAGSTER_HOME": str(home),
        "DBENTO_SOURCE": "databento",
        "DATABENTO_API_KEY": TEST_KEY,
        "DBENTO_DATA_DIR": str(tmp_path / "data"),
    }
    base = [sys.executable, "-m", "dagster", "asset", "materialize", "-m", "dbento_assets"]
    one = ["--partition", ES_JAN]
    force = ["--config-json", '{"ops": {"raw_1s_bars": {"config": {"force": true}}}}']
    for extra in (["--select", "*", *one], ["--select", RAW_ASSET, *one, *force]):
        done = subprocess.run(
            base + extra, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    assert get_ranges(gateway) == Counter({"2024-01": 2})
    with DagsterInstance.from_config(str(home)) as instance:
        runs = instance.get_run_records()  # newest first
        forced, first = (record.dagster_run for record in runs)
        assets = ["bars_15s", "bars_1min", "bars_30s", RAW_ASSET]
        assert_attributed(instance, [first], assets)
        assert_attributed(instance, [forced], [RAW_ASSET])
        (raw,) = materializations(instance, [forced.run_id])
        assert raw.metadata["forced"] is True


@pytest.fixture
def small_demo_defs(tmp_path):
    resource = DatabentoResource(source="demo", data_dir=str(tmp_path / "data"), demo_activity=0.02)
    return build_definitions(databento=resource)


def test_select_materializes_only_the_selected_assets(small_demo_defs):
    with instance_for_test() as instance:
        out = io.StringIO()
        argv = ["--symbols", "ES,NQ", "--start", "2024-01", "--select", RAW_ASSET]
        assert run(argv, out, defs=small_demo_defs, instance=instance) == 0, out.getvalue()
        runs = all_runs(instance)
        assert sorted(partition_of(r) for r in runs) == sorted(
            [ES_JAN, str(partition_key(JAN, "NQ"))]
        )
        assert_attributed(instance, runs, [RAW_ASSET])
        assert instance.get_materialized_partitions(AssetKey("bars_1min")) == set()


def test_without_dagster_home_it_uses_the_project_history(small_demo_defs, tmp_path, monkeypatch):
    """No DAGSTER_HOME: the runs go to ./.dagster_home, which .env then names for Dagster's
    own commands, and a second build with --missing-only finds the first one there."""
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    out, err = io.StringIO(), io.StringIO()
    argv = ["--symbol", "ES", "--start", "2024-01", "--select", RAW_ASSET]
    assert run(argv, out, err, defs=small_demo_defs) == 0, out.getvalue() + err.getvalue()
    assert out.getvalue().splitlines()[0].split()[:2] == [ES_JAN, "ok"]
    home = tmp_path / ".dagster_home"
    assert (home / "dagster.yaml").read_text().startswith("# Dagster instance settings")
    assert f'DAGSTER_HOME="${{DAGSTER_HOME:-{home}}}"' in (tmp_path / ".env").read_text()
    with DagsterInstance.from_config(str(home)) as instance:
        assert [partition_of(r) for r in all_runs(instance)] == [ES_JAN]
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    out = io.StringIO()
    assert run([*argv, "--missing-only"], out, io.StringIO(), defs=small_demo_defs) == 0
    assert out.getvalue().splitlines()[0].split()[:2] == [ES_JAN, "skipped"]


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--symbol", "XX", "--start", "2024-01"], "unknown symbol(s) XX; the catalog has ES"),
        (["--start", "2024-03", "--end", "2024-01"], "--end 2024-01 is before --start 2024-03"),
        (["--start", "2024-13"], "--start '2024-13': month must be 1..12"),
        (["--start", "2024-01", "--end", "Jan"], "--end 'Jan': month 'Jan' is not YYYY-MM"),
        (["--start", "2023-12"], "before the catalog's start_month 2024-01"),
        (["--start", "2099-01"], "has not closed yet"),
        (["--start", "2024-01", "--force", "--missing-only"], "contradict each other"),
        (["--start", "2024-01", "--select", "no_such_asset"], "--select 'no_such_asset'"),
        (["--partition", "2024-01|ES"], "'2024-01|ES' is not a partition of this code location"),
        (["--symbol", "ES"], "give either --start YYYY-MM"),
        (["--start", "2024-01", "--no-such-option"], "No such option '--no-such-option'"),
    ],
)
def test_bad_options_exit_2_with_a_clear_message(small_demo_defs, argv, words):
    out, err = io.StringIO(), io.StringIO()
    with instance_for_test() as instance:
        assert run(argv, out, err, defs=small_demo_defs, instance=instance) == 2
        assert instance.get_runs() == []
    assert words in err.getvalue()
    assert len(err.getvalue().strip().splitlines()) == 1, err.getvalue()  # one sentence
    assert err.getvalue().startswith("error: ")
    assert out.getvalue() == ""


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"source": "databento"}, "needs a Databento API key and none is set"),
        ({"source": "dbn", "dbn_dir": "/no/such/folder"}, "is not a folder"),
        ({"source": "databento", "api_key": TEST_KEY}, "holds SYNTHETIC demo data"),
    ],
)
def test_set_up_errors_are_one_sentence_before_any_run(tmp_path, settings, words):
    """A mistake no retry can fix stops before the first run, in one line, without advising
    --missing-only; --verbose adds the traceback."""
    data = tmp_path / "data"
    BarStore.at(data).claim("synthetic", "demo")  # the folder already holds demo bars
    defs = build_definitions(databento=DatabentoResource(data_dir=str(data), **settings))
    argv = ["--symbol", "ES", "--start", "2024-01"]
    with instance_for_test() as instance:
        out, err = io.StringIO(), io.StringIO()
        assert run(argv, out, err, defs=defs, instance=instance) == 2
        assert instance.get_runs() == []
        assert err.getvalue().startswith("error: ") and words in err.getvalue()
        assert len(err.getvalue().splitlines()) == 1 and "--missing-only" not in err.getvalue()
        assert out.getvalue() == ""
        err = io.StringIO()
        assert run([*argv, "--verbose"], io.StringIO(), err, defs=defs, instance=instance) == 2
        assert "Traceback (most recent call last)" in err.getvalue()


class Terminal(io.StringIO):
    """A stream that says it is a terminal, as a user's console does."""

    def isatty(self) -> bool:
        return True


def test_a_range_shows_a_progress_bar_on_a_terminal_only(small_demo_defs):
    argv = ["--symbols", "ES,NQ", "--start", "2024-01", "--select", RAW_ASSET]
    with instance_for_test() as instance:
        out, err = io.StringIO(), Terminal()
        assert run(argv, out, err, defs=small_demo_defs, instance=instance) == 0
        assert "2/2" in err.getvalue() and "partition" in err.getvalue()  # tqdm's bar
        assert "2/2" not in out.getvalue()  # the lines and the summary stay clean
        out, err = io.StringIO(), io.StringIO()
        assert (
            run([*argv, "--missing-only"], out, err, defs=small_demo_defs, instance=instance) == 0
        )
        assert err.getvalue() == ""  # not a terminal (a log file, a pipe): no bar


# --------------------------------------------------------------------------- build_range job


def test_the_build_range_job_shares_a_range_among_its_workers(monkeypatch, tmp_path):
    # DBENTO_RANGE_WORKERS steps, each its own process in a real run (test_range_job.py);
    # here, in one process: every partition built once, by the share its position gives it.
    monkeypatch.setenv("DBENTO_RANGE_WORKERS", "3")
    resource = DatabentoResource(source="demo", data_dir=str(tmp_path / "data"))
    job = build_definitions(databento=resource).get_job_def(JOB_NAME)
    shares = [f"build_share_{i}" for i in range(3)]
    assert sorted(job.graph.node_dict) == shares
    config = {"start": "2024-01", "end": "2024-02", "symbols": ["ES", "NQ"], "select": RAW_ASSET}
    with instance_for_test() as instance:
        result = job.execute_in_process(run_config=config, instance=instance)
        runs = instance.get_runs(RunsFilter(tags={RANGE_TAG: result.run_id}))
        built = Counter(run.tags["dagster/partition"] for run in runs)
        logged = [
            (e.step_key, e.message)
            for e in instance.all_logs(result.run_id)
            if e.step_key and e.message and "|" in e.message and " ok " in e.message
        ]
    keys = [str(partition_key(Month(2024, m), s)) for s in ("ES", "NQ") for m in (1, 2)]
    assert built == Counter(keys) and all(r.status.value == "SUCCESS" for r in runs)
    for index, key in enumerate(keys):  # the i-th partition went to share i mod 3
        assert any(step == shares[index % 3] and key in text for step, text in logged)


@pytest.mark.parametrize("value", ["0", "65", "two"])
def test_a_bad_range_workers_setting_names_the_variable(monkeypatch, value):
    monkeypatch.setenv("DBENTO_RANGE_WORKERS", value)
    with pytest.raises(ValueError, match=f"DBENTO_RANGE_WORKERS='{value}'"):
        build_definitions(databento=DatabentoResource(source="demo"))
