"""Issue 3 through Dagster: real runs of ``raw_1s_bars`` against the fake Databento gateway.

Each test builds the code location with :func:`dbento_assets.definitions.build_definitions`,
runs it on a real on-disk Dagster instance (``DAGSTER_HOME`` in a temporary folder) and lets the
unpatched databento client talk to :mod:`dbento_assets_tests.gateway`. They prove the resource
settings, the no-key failure, download and cost metadata, resume (no request for a cached month)
and force (run tag ``dbento/force=true`` or run config), faults, availability, the
``databento`` pool, the local DBN files source with the vendor cross-check, the optional
download of Databento's ohlcv-1m for that cross-check (``DBENTO_VENDOR_CHECK``: counted, cached,
forced, a disagreeing vendor bar refusing ``bars_1min``, a failed download only skipping the
check), and that the API key appears nowhere afterwards: not in DAGSTER_HOME (event log, run
storage, compute logs), the data files, the logs or any error message.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from dagster import AssetCheckKey, AssetKey, DagsterInstance, EnvVar
from dagster._core.errors import DagsterInvalidConfigError

# A check record's status has no public name in Dagster 1.13; the tests compare with it.
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus

from dbento_assets.assets import DOWNLOAD_POOL, FORCE_TAG
from dbento_assets.core.aggregate import aggregate_bars
from dbento_assets.core.catalog import Catalog, load_catalog
from dbento_assets.core.databento_api import DEFAULT_GATEWAY, DEFAULT_MAX_COST_USD
from dbento_assets.core.dbn import OHLCV_RECORD_DTYPE
from dbento_assets.core.dbn_files import DbnFilesSource
from dbento_assets.core.demo import DemoSource
from dbento_assets.core.months import Month
from dbento_assets.core.rules import RULE_RECONCILED, RULE_VENDOR
from dbento_assets.core.source import SourceError
from dbento_assets.core.timeframes import parse_timeframe
from dbento_assets.definitions import build_definitions
from dbento_assets.history import evaluation_of
from dbento_assets.io_managers import io_manager_from_env
from dbento_assets.partitions import partition_key
from dbento_assets.resources import (
    API_KEY_VARIABLE,
    DatabentoResource,
    databento_resource_from_env,
)
from dbento_assets_tests.gateway import (
    GET_RANGE,
    TEST_KEY,
)
from dbento_assets_tests.test_checks_dagster import dbn_folder, latest_evaluation

RAW = AssetKey("raw_1s_bars")
BARS_1MIN = AssetKey("bars_1min")
VENDOR_CHECK = AssetCheckKey(BARS_1MIN, RULE_VENDOR)
PASSED = AssetCheckExecutionRecordStatus.SUCCEEDED
FAILED = AssetCheckExecutionRecordStatus.FAILED
JAN = Month(2024, 1)
SETTINGS = (
    "DATABENTO_API_KEY",
    "DBENTO_SOURCE",
    "DBENTO_GATEWAY",
    "DBENTO_DATA_DIR",
    "DBENTO_CACHE_DIR",
    "DBENTO_DBN_DIR",
    "DBENTO_VENDOR_CHECK",
    "DBENTO_MAX_COST_USD",
    "DBENTO_TIMEOUT_SECONDS",
    "DBENTO_RETRY_ATTEMPTS",
    "DBENTO_RETRY_BACKOFF_SECONDS",
    "DBENTO_FORMAT",
    "DBENTO_CATALOG",
)


@pytest.fixture
def clean_env(tmp_path, monkeypatch) -> Path:
    """No DBENTO_* / DATABENTO_* settings from outside, and a working folder without .env."""
    for name in SETTINGS:
        monkeypatch.setenv(name, "")  # recorded, so monkeypatch restores the original state
        monkeypatch.delenv(name)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "dagster_home"
    path.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(path))
    return path


@pytest.fixture
def instance(fresh_instance: DagsterInstance) -> DagsterInstance:
    """The test's own instance: runs of other tests recorded nothing in it."""
    return fresh_instance


@pytest.fixture
def env(gateway, clean_env, tmp_path, monkeypatch) -> Path:
    """Settings as a user would put them in .env, pointing at the gateway; returns the data root."""
    data = tmp_path / "data"
    monkeypatch.setenv("DATABENTO_API_KEY", TEST_KEY)
    monkeypatch.setenv("DBENTO_GATEWAY", gateway.url)
    monkeypatch.setenv("DBENTO_DATA_DIR", str(data))
    monkeypatch.setenv("DBENTO_RETRY_ATTEMPTS", "3")
    monkeypatch.setenv("DBENTO_RETRY_BACKOFF_SECONDS", "0")
    return data


def catalog_from(tmp_path: Path, start_month: str = "2023-01", **overrides: str) -> Catalog:
    """The packaged catalog with another start month (and optionally a replaced symbol)."""
    text = load_catalog().path.read_text(encoding="utf-8")
    text = text.replace('start_month = "2024-01"', f'start_month = "{start_month}"')
    for old, new in overrides.items():
        text = text.replace(old, new)
    path = tmp_path / "catalog.toml"
    path.write_text(text, encoding="utf-8")
    return load_catalog(path)


def run(
    instance: DagsterInstance,
    month: Month = JAN,
    symbol: str = "ES",
    *,
    catalog: Catalog | None = None,
    resource: DatabentoResource | None = None,
    tags: dict[str, str] | None = None,
    run_config: dict | None = None,
    assets: list[AssetKey] | None = None,
):
    defs = build_definitions(catalog=catalog, databento=resource)
    job = defs.resolve_implicit_global_asset_job_def()
    return job.execute_in_process(
        instance=instance,
        partition_key=partition_key(month, symbol),
        asset_selection=assets or [RAW],
        tags=tags,
        run_config=run_config,
        raise_on_error=False,
    )


def materialization(result, key: AssetKey):
    """The one materialization of ``key`` in a run (whatever step produced it)."""
    (mat,) = [
        event.event_specific_data.materialization
        for event in result.get_asset_materialization_events()
        if event.event_specific_data.materialization.asset_key == key
    ]
    return mat


def raw_metadata(result) -> dict[str, object]:
    return {key: value.value for key, value in materialization(result, RAW).metadata.items()}


def failure_text(result) -> str:
    """Every message of the step failures (and resource set-up failures), causes and contexts
    included."""
    texts = []
    for event in result.all_events:
        if event.event_type_value == "STEP_FAILURE":
            stack = [event.step_failure_data.error]
        elif event.event_type_value == "RESOURCE_INIT_FAILURE":
            stack = [event.engine_event_data.error]
        else:
            continue
        while stack:
            error = stack.pop()
            if error is None:
                continue
            texts.append(error.message)
            stack += [error.cause, error.context]
    return "\n".join(texts)


def cache_file(data: Path, symbol: str = "ES", month: Month = JAN) -> Path:
    return data / "dbn" / symbol / f"{symbol}_{month.tag}.ohlcv-1s.dbn.zst"


def raw_file(data: Path, symbol: str = "ES", month: Month = JAN) -> Path:
    return data / "raw_1s" / symbol / f"{symbol}_{month.tag}.parquet"


def vendor_file(data: Path, symbol: str = "ES", month: Month = JAN) -> Path:
    return data / "dbn" / symbol / f"{symbol}_{month.tag}.ohlcv-1m.dbn.zst"


def bars_1min_file(data: Path, symbol: str = "ES", month: Month = JAN) -> Path:
    return data / "aggregated" / "1min" / f"{symbol}_{month.tag}_1min.parquet"


def vendor_check(instance: DagsterInstance, result, month: Month = JAN, symbol: str = "ES"):
    """The vendor cross-check of ``bars_1min`` as the instance stored it for the partition
    (it must come from ``result``'s run), and its metadata values."""
    record = latest_evaluation(instance, VENDOR_CHECK, partition_key(month, symbol))
    assert record is not None and record.run_id == result.run_id
    found = {k: getattr(m, "value", m) for k, m in evaluation_of(record).metadata.items()}
    return record, found


# --------------------------------------------------------------------------- the resource


def test_resource_from_env_reads_every_setting(clean_env, monkeypatch):
    monkeypatch.setenv("DBENTO_SOURCE", "DBN")
    monkeypatch.setenv("DBENTO_GATEWAY", "https://gw.example:8443")
    monkeypatch.setenv("DBENTO_DATA_DIR", "/srv/bars")
    monkeypatch.setenv("DBENTO_DBN_DIR", "/srv/dbn")
    monkeypatch.setenv("DBENTO_MAX_COST_USD", "12.5")
    monkeypatch.setenv("DBENTO_TIMEOUT_SECONDS", "30")
    monkeypatch.setenv("DBENTO_RETRY_ATTEMPTS", "7")
    monkeypatch.setenv("DBENTO_RETRY_BACKOFF_SECONDS", "0.25")
    resource = databento_resource_from_env()
    assert (resource.source, resource.gateway, resource.data_dir, resource.dbn_dir) == (
        "dbn",
        "https://gw.example:8443",
        "/srv/bars",
        "/srv/dbn",
    )
    assert (resource.max_cost_usd, resource.timeout_seconds) == (12.5, 30.0)
    assert (resource.retry_attempts, resource.retry_backoff_seconds) == (7, 0.25)
    assert resource.api_key is None  # no EnvVar for an unset key
    assert resource.vendor_check is False  # off unless asked for
    assert isinstance(resource.month_source(), DbnFilesSource)


def test_resource_defaults(clean_env):
    resource = databento_resource_from_env()
    assert resource.source == "databento"
    assert resource.gateway == DEFAULT_GATEWAY == "https://hist.databento.com"
    assert resource.data_dir == "./data"
    assert resource.max_cost_usd == DEFAULT_MAX_COST_USD == 5.0
    assert resource.retry_policy().max_attempts == 5


def test_key_is_an_env_var_loaded_from_dotenv_without_overriding(clean_env, monkeypatch):
    (clean_env / ".env").write_text(
        "DATABENTO_API_KEY=db-FROMDOTENV\nDBENTO_MAX_COST_USD=9\nDBENTO_SOURCE=demo\n"
    )
    monkeypatch.setenv("DBENTO_SOURCE", "databento")  # already set: the environment wins
    resource = databento_resource_from_env()
    assert isinstance(resource.api_key, EnvVar)
    assert resource.api_key.env_var_name == "DATABENTO_API_KEY"
    assert resource.api_key.get_value() == "db-FROMDOTENV"
    assert resource.max_cost_usd == 9.0
    assert resource.source == "databento"
    assert repr(resource.month_source()).startswith("DatabentoSource(")
    assert "db-FROMDOTENV" not in repr(resource.month_source())


def test_every_field_but_the_key_is_read_from_its_own_variable(clean_env, monkeypatch):
    monkeypatch.setenv("DBENTO_RETRY_JITTER", "0.1")
    monkeypatch.setenv("DBENTO_DEMO_ACTIVITY", "0.5")
    monkeypatch.setenv("DBENTO_DEMO_NOW", "2024-03-17")
    monkeypatch.setenv("DBENTO_API_KEY", "db-NOT-THE-KEY")  # the key is DATABENTO_API_KEY only
    monkeypatch.setenv("DBENTO_FORMAT", " CSV ")
    resource = databento_resource_from_env()
    assert (resource.retry_jitter, resource.demo_activity) == (0.1, 0.5)
    assert resource.demo_instant() == pd.Timestamp("2024-03-17", tz="UTC")
    assert resource.api_key is None
    io_manager = io_manager_from_env(resource)
    assert io_manager.store.fmt == "csv" and io_manager.data_dir == resource.data_dir


@pytest.mark.parametrize(
    ("variable", "value", "words"),
    [
        ("DBENTO_SOURCE", "bloomberg", "is not a source"),
        ("DBENTO_MAX_COST_USD", "ten", "is not a number"),
        ("DBENTO_MAX_COST_USD", "-1", "non-negative"),
        ("DBENTO_RETRY_ATTEMPTS", "2.5", "is not a whole number"),
        ("DBENTO_RETRY_ATTEMPTS", "0", "DBENTO_RETRY_ATTEMPTS='0' must be at least 1"),
        ("DBENTO_VENDOR_CHECK", "maybe", "'maybe' is neither true nor false: write true, 1"),
        ("DBENTO_VENDOR_CHECK", "on", "neither true nor false"),
    ],
)
def test_bad_settings_are_reported(clean_env, monkeypatch, variable, value, words):
    monkeypatch.setenv(variable, value)
    with pytest.raises(SourceError, match=words):
        databento_resource_from_env()


@pytest.mark.parametrize(
    ("value", "expected"),
    [("true", True), ("1", True), (" YES ", True), ("False", False), ("0", False), ("no", False)],
)
def test_vendor_check_setting(clean_env, monkeypatch, value, expected):
    monkeypatch.setenv("DBENTO_VENDOR_CHECK", value)
    assert databento_resource_from_env().vendor_check is expected


def test_month_source_builds_the_selected_source(tmp_path):
    assert isinstance(DatabentoResource(source="demo").month_source(), DemoSource)
    with pytest.raises(SourceError, match="set DBENTO_DBN_DIR"):
        DatabentoResource(source="dbn").month_source()
    with pytest.raises(SourceError, match="set DBENTO_CACHE_DIR to a local folder"):
        DatabentoResource(api_key="db-x", data_dir="s3://bucket/bars").month_source()
    remote = DatabentoResource(
        api_key="db-x", data_dir="s3://bucket/bars", cache_dir=str(tmp_path / "cache")
    ).month_source()
    assert remote.data_root == tmp_path / "cache"
    with pytest.raises(SourceError, match="invalid retry settings"):
        DatabentoResource(api_key="db-x", retry_jitter=2).month_source()


def test_definitions_load_without_a_key_for_any_source(clean_env, monkeypatch):
    for source in ("databento", "demo", "dbn"):
        monkeypatch.setenv("DBENTO_SOURCE", source)
        defs = build_definitions()
        assert defs.resolve_assets_def("raw_1s_bars").node_def.pool == DOWNLOAD_POOL


# --------------------------------------------------------------------------- no key


def test_no_key_fails_the_materialization_at_once_saying_what_to_do(gateway, clean_env, instance):
    result = run(instance, resource=databento_resource_from_env())
    assert not result.success
    text = failure_text(result)
    assert "DATABENTO_API_KEY" in text and ".env" in text and "DBENTO_SOURCE=demo" in text
    assert gateway.count() == 0


def test_an_unset_env_var_key_is_a_config_error_not_a_leak(gateway, clean_env, instance):
    # Passing EnvVar for an unset variable fails at resource init: why the helper passes it
    # only when the variable is set.
    resource = DatabentoResource(api_key=EnvVar("DATABENTO_API_KEY"), gateway=gateway.url)
    with pytest.raises(DagsterInvalidConfigError):
        build_definitions(
            databento=resource
        ).resolve_implicit_global_asset_job_def().execute_in_process(
            instance=instance, partition_key=partition_key(JAN, "ES"), asset_selection=[RAW]
        )


# --------------------------------------------------------------------------- download


def test_materialization_downloads_the_month_and_records_cost(gateway, env, instance):
    result = run(instance, resource=databento_resource_from_env())
    assert result.success
    (call,) = gateway.calls(GET_RANGE)
    assert call.auth_user == TEST_KEY
    assert (call.fields["symbols"], call.fields["stype_in"], call.fields["schema"]) == (
        "ES.v.0",
        "continuous",
        "ohlcv-1s",
    )
    assert pd.Timestamp(call.fields["start"]) == JAN.start
    assert pd.Timestamp(call.fields["end"]) == JAN.end
    meta = raw_metadata(result)
    count = meta["source_record_count"]
    assert count > 0 and meta["records_decoded"] == count == meta["dagster/row_count"]
    assert meta["source_billable_size_bytes"] == count * 56
    assert meta["source_cost_usd"] == pytest.approx(count * 56 / 2**30 * gateway.price_per_gb)
    assert meta["source_dbn_cache"] == "miss"
    assert cache_file(env).is_file() and raw_file(env).is_file()
    bars = pd.read_parquet(raw_file(env))
    assert len(bars) == count and bars["ts_event"].min() >= JAN.start


def test_a_cached_month_is_decoded_again_without_any_request(gateway, env, instance):
    first = run(instance, resource=databento_resource_from_env())
    before = gateway.count()
    second = run(instance, resource=databento_resource_from_env())
    assert first.success and second.success
    assert gateway.count() == before
    meta = raw_metadata(second)
    assert meta["source_dbn_cache"] == "hit" and meta["source_cost_usd"] == 0.0
    assert meta["records_decoded"] == raw_metadata(first)["records_decoded"]


def test_force_by_run_tag_or_run_config_downloads_again(gateway, env, instance):
    assert run(instance, resource=databento_resource_from_env()).success
    tagged = run(instance, resource=databento_resource_from_env(), tags={FORCE_TAG: "true"})
    assert tagged.success and gateway.count(GET_RANGE) == 2
    assert raw_metadata(tagged)["source_dbn_cache"] == "forced"
    configured = run(
        instance,
        resource=databento_resource_from_env(),
        run_config={"ops": {"raw_1s_bars": {"config": {"force": True}}}},
    )
    assert configured.success and gateway.count(GET_RANGE) == 3
    plain = run(instance, resource=databento_resource_from_env())
    assert plain.success and gateway.count(GET_RANGE) == 3


def test_a_forced_download_that_breaks_keeps_the_old_files(gateway, env, instance):
    assert run(instance, resource=databento_resource_from_env()).success
    dbn_bytes = cache_file(env).read_bytes()
    raw_bytes = raw_file(env).read_bytes()
    gateway.fail("cut", endpoint=GET_RANGE, times=3)
    result = run(instance, resource=databento_resource_from_env(), tags={FORCE_TAG: "true"})
    assert not result.success
    assert "failed 3 times" in failure_text(result)
    assert cache_file(env).read_bytes() == dbn_bytes
    assert raw_file(env).read_bytes() == raw_bytes
    assert not [p for p in env.rglob("*.part")]


# --------------------------------------------------------------------------- faults


@pytest.mark.parametrize("kind", ["429", "503", "truncate", "reset"])
def test_transient_faults_are_retried_inside_the_run(gateway, env, instance, kind):
    gateway.fail(kind, endpoint=GET_RANGE)
    result = run(instance, resource=databento_resource_from_env())
    assert result.success
    assert gateway.count(GET_RANGE) == 2
    assert raw_metadata(result)["source_download_attempts"] == 2


@pytest.mark.parametrize(
    ("setup", "words", "paid"),
    [
        (lambda gw: gw.fail("401", endpoint=GET_RANGE), ["rejected the API key"], 1),
        (lambda gw: gw.fail("403", endpoint="metadata.get_cost"), ["HTTP 403"], 0),
        (lambda gw: setattr(gw, "price_per_gb", 1e7), ["above the ceiling"], 0),
        # A month that has not begun yet (issue 13: one that has begun is bought so far).
        (lambda gw: gw.set_range("GLBX.MDP3", "2010-06-06", "2023-12-20"), ["available"], 0),
        (
            lambda gw: setattr(gw, "provider", lambda q: (np.empty(0, OHLCV_RECORD_DTYPE), {})),
            ["no ohlcv-1s records"],
            0,
        ),
    ],
    ids=["401", "403", "cost-ceiling", "not-available", "empty-month"],
)
def test_refused_months_fail_clearly_and_write_nothing(gateway, env, instance, setup, words, paid):
    setup(gateway)
    result = run(instance, resource=databento_resource_from_env())
    assert not result.success
    text = failure_text(result)
    for word in words:
        assert word in text
    assert TEST_KEY not in text
    assert gateway.count(GET_RANGE) == paid
    assert not cache_file(env).exists() and not raw_file(env).exists()


def test_unresolvable_catalog_symbol_fails_naming_the_catalog(
    gateway, env, instance, tmp_path, monkeypatch
):
    wrong = {'symbol = "ES.v.0"\nstype_in = "continuous"': 'symbol = "ES"\nstype_in = "raw_symbol"'}
    catalog = catalog_from(tmp_path, "2024-01", **wrong)
    monkeypatch.setenv("DBENTO_CATALOG", str(catalog.path))  # how a user points at a catalog
    assert catalog.instrument("ES").request_symbol == "ES"
    result = run(instance, catalog=catalog, resource=databento_resource_from_env())
    assert not result.success
    text = failure_text(result)
    assert "HTTP 422" in text and "'ES'" in text and "'raw_symbol'" in text
    assert "'GLBX.MDP3'" in text and str(catalog.path) in text
    assert gateway.count("metadata.get_cost") == 1 and gateway.count(GET_RANGE) == 0


def test_dataset_starting_mid_month_is_downloaded_and_flagged(gateway, env, instance, tmp_path):
    march = Month(2023, 3)
    result = run(
        instance,
        march,
        "QQQ",
        catalog=catalog_from(tmp_path),
        resource=databento_resource_from_env(),
    )
    assert result.success
    meta = raw_metadata(result)
    assert meta["source_partial_month"] is True
    assert "2023-03-28" in meta["source_partial_month_reason"]
    bars = pd.read_parquet(raw_file(env, "QQQ", march))
    assert len(bars) > 0 and bars["ts_event"].min() >= pd.Timestamp("2023-03-28", tz="UTC")


# --------------------------------------------------------------------------- vendor 1m


def test_vendor_check_buys_databentos_1m_once_and_bars_1min_match_them(
    gateway, env, instance, monkeypatch
):
    monkeypatch.setenv("DBENTO_VENDOR_CHECK", "true")
    first = run(instance, resource=databento_resource_from_env(), assets=[RAW, BARS_1MIN])
    assert first.success, failure_text(first)
    # One extra paid request, for the same dataset, symbol, stype and window; priced first.
    assert gateway.schemas(GET_RANGE) == ["ohlcv-1s", "ohlcv-1m"]
    assert gateway.schemas("metadata.get_cost") == ["ohlcv-1s", "ohlcv-1m"]
    one_s, one_m = gateway.calls(GET_RANGE)
    for name in ("dataset", "symbols", "stype_in", "start", "end"):
        assert one_m.fields[name] == one_s.fields[name], name
    assert vendor_file(env).is_file()
    meta = raw_metadata(first)
    assert meta["vendor_1m_dbn_cache"] == "miss" and meta["vendor_1m_cost_usd"] > 0
    record, found = vendor_check(instance, first)
    assert record.status == PASSED and record.partition == partition_key(JAN, "ES")
    assert "skipped" not in found and found["differing"] == 0 and found["violations"] == 0
    ours = pd.read_parquet(bars_1min_file(env))
    assert found["compared"] == found["vendor_bars"] == len(ours) > 100

    requests = gateway.count()
    second = run(instance, resource=databento_resource_from_env(), assets=[RAW, BARS_1MIN])
    assert second.success and gateway.count() == requests  # both months come from the cache
    assert raw_metadata(second)["vendor_1m_dbn_cache"] == "hit"
    record, found = vendor_check(instance, second)
    assert record.status == PASSED and found["compared"] == len(ours)

    forced = run(
        instance,
        resource=databento_resource_from_env(),
        assets=[RAW, BARS_1MIN],
        tags={FORCE_TAG: "true"},
    )
    assert forced.success
    assert gateway.schemas(GET_RANGE) == ["ohlcv-1s", "ohlcv-1m"] * 2  # force renews both
    assert raw_metadata(forced)["vendor_1m_dbn_cache"] == "forced"
    assert vendor_check(instance, forced)[0].status == PASSED


def test_a_vendor_bar_that_disagrees_fails_the_check_and_bars_1min_is_not_written(
    gateway, env, instance, monkeypatch
):
    monkeypatch.setenv("DBENTO_VENDOR_CHECK", "true")
    gateway.corrupt_vendor_bar(3)
    result = run(instance, resource=databento_resource_from_env(), assets=[RAW, BARS_1MIN])
    assert not result.success
    assert raw_file(env).is_file() and not bars_1min_file(env).exists()
    assert "bars_1min for 2024-01-01|ES was NOT saved" in failure_text(result)
    record, found = vendor_check(instance, result)
    assert record.status == FAILED and record.partition == partition_key(JAN, "ES")
    assert found["violations"] == found["differing"] == 1
    assert found["missing_here"] == found["missing_at_vendor"] == 0
    ours = aggregate_bars(pd.read_parquet(raw_file(env)), parse_timeframe("1min"))
    fourth = ours.iloc[3]
    assert fourth["ts_event"].strftime("%Y-%m-%d %H:%M") in found["first_violations"]
    assert str(int(fourth["volume"]) + 1) in found["first_violations"]


def test_without_vendor_check_no_1m_request_is_made_and_the_check_is_not_declared(
    gateway, env, instance
):
    resource = databento_resource_from_env()
    result = run(instance, resource=resource, assets=[RAW, BARS_1MIN])
    assert result.success
    assert gateway.schemas(GET_RANGE) == ["ohlcv-1s"]
    assert "ohlcv-1m" not in gateway.schemas("metadata.get_cost")
    assert not vendor_file(env).exists() and bars_1min_file(env).is_file()
    # Not asked for, nothing to compare: the deployment has no such check (so no run can show
    # it green, nor failed to execute), and no result of it is recorded.
    declared = build_definitions(databento=resource).resolve_asset_graph().asset_check_keys
    assert VENDOR_CHECK not in declared
    assert AssetCheckKey(BARS_1MIN, RULE_RECONCILED) in declared
    assert not instance.event_log_storage.get_asset_check_execution_history(VENDOR_CHECK, limit=1)


def test_a_failed_1m_download_skips_the_check_and_keeps_the_data(
    gateway, env, instance, monkeypatch
):
    assert run(instance, resource=databento_resource_from_env()).success  # 1s month cached
    monkeypatch.setenv("DBENTO_VENDOR_CHECK", "true")
    gateway.fail("503", endpoint=GET_RANGE, times=3)  # every attempt of the 1m download
    result = run(instance, resource=databento_resource_from_env(), assets=[RAW, BARS_1MIN])
    assert result.success, failure_text(result)
    # Three attempts in raw_1s_bars, none again in the aggregation step of the same run.
    assert gateway.schemas(GET_RANGE) == ["ohlcv-1s"] + ["ohlcv-1m"] * 3
    assert "failed 3 times" in raw_metadata(result)["vendor_1m_error"]
    assert not vendor_file(env).exists() and bars_1min_file(env).is_file()
    record, found = vendor_check(instance, result)
    assert record.status == FAILED and found["skipped"] is True and found["severity"] == "WARN"
    assert "failed 3 times" in found["skipped_because"]
    assert TEST_KEY not in found["skipped_because"]

    # Later, bars_1min alone: its check downloads the missing 1m month itself.
    again = run(instance, resource=databento_resource_from_env(), assets=[BARS_1MIN])
    assert again.success, failure_text(again)
    assert gateway.schemas(GET_RANGE)[-1] == "ohlcv-1m" and vendor_file(env).is_file()
    record, found = vendor_check(instance, again)
    assert record.status == PASSED and "skipped" not in found and found["differing"] == 0


# --------------------------------------------------------------------------- pool


@pytest.mark.parametrize("limit", [1, 2])
def test_downloads_share_the_databento_pool(gateway, env, home, limit):
    with DagsterInstance.local_temp(str(home)) as setup:
        setup.event_log_storage.set_concurrency_slots(DOWNLOAD_POOL, limit)
    # Two partitions at once; each download waits for the other to be in flight: with one
    # slot the first waits 3 s in vain, with two the gate opens when both are there.
    gateway.gate(GET_RANGE, parties=2, timeout=3.0 if limit == 1 else 60.0)
    results: dict[str, object] = {}

    def materialize(symbol: str) -> None:
        with DagsterInstance.local_temp(str(home)) as inst:
            results[symbol] = run(inst, JAN, symbol, resource=databento_resource_from_env())

    threads = [threading.Thread(target=materialize, args=(s,)) for s in ("ES", "NQ")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert all(result.success for result in results.values()) and len(results) == 2
    assert gateway.count(GET_RANGE) == 2
    assert gateway.max_in_flight[GET_RANGE] == limit


# --------------------------------------------------------------------------- local DBN files


def test_dbn_source_run_matches_the_vendor_1min_bars(clean_env, instance, tmp_path, monkeypatch):
    data = tmp_path / "data"
    monkeypatch.setenv("DBENTO_SOURCE", "dbn")
    # The real QQQ sample as a whole month (a stored month must be whole; see dbn_folder).
    monkeypatch.setenv("DBENTO_DBN_DIR", str(dbn_folder(tmp_path)))
    monkeypatch.setenv("DBENTO_DATA_DIR", str(data))
    march = Month(2023, 3)
    result = run(
        instance,
        march,
        "QQQ",
        catalog=catalog_from(tmp_path),
        resource=databento_resource_from_env(),
        assets=[RAW, AssetKey("bars_1min")],
    )
    assert result.success, failure_text(result)
    meta = raw_metadata(result)
    assert meta["records_decoded"] == 4 and meta["instrument_ids"] == "13340"
    mat = materialization(result, AssetKey("bars_1min"))
    ours = pd.read_parquet(mat.metadata["path"].value).set_index("ts_event")
    vendor = {
        "2023-03-28 11:08": (307.83, 307.83, 307.80, 307.80, 1800),
        "2023-03-28 11:10": (307.97, 307.97, 307.96, 307.96, 1062),
    }  # Databento's own ohlcv-1m bars (fixtures/databento/EQUS.MINI/test_data.ohlcv-1m)
    for minute, (o, h, low, c, v) in vendor.items():
        row = ours.loc[pd.Timestamp(minute, tz="UTC")]
        assert (row["open"], row["high"], row["low"], row["close"], row["volume"]) == (
            o,
            h,
            low,
            c,
            v,
        )


# --------------------------------------------------------------------------- secrets


def sqlite_leaks(path: Path, secret: bytes) -> list[str]:
    """Cells of a SQLite file holding ``secret``, also inside zlib-compressed values (Dagster
    stores job and execution-plan snapshots compressed, where a plain byte grep is blind)."""
    found = []
    with contextlib.closing(sqlite3.connect(path)) as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            for row in db.execute(f'SELECT * FROM "{table}"'):
                for cell in row:
                    data = cell.encode() if isinstance(cell, str) else cell
                    if not isinstance(data, bytes):
                        continue
                    if secret in data:
                        found.append(table)
                        continue
                    with contextlib.suppress(zlib.error):
                        if secret in zlib.decompress(data):
                            found.append(f"{table} (compressed)")
    return found


def test_the_key_appears_nowhere_after_a_full_run_through_the_gateway(
    gateway, env, home, tmp_path, caplog, capfd, monkeypatch
):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("DBENTO_VENDOR_CHECK", "true")  # the 1m downloads too
    messages: list[str] = []
    instance = DagsterInstance.get()  # the instance of DAGSTER_HOME, as `dagster dev` uses

    def go(**kwargs) -> None:
        result = run(instance, resource=databento_resource_from_env(), **kwargs)
        messages.append(failure_text(result))

    go()  # download
    go()  # cache hit
    go(tags={FORCE_TAG: "true"})
    for kind, endpoint, times in [
        ("429", GET_RANGE, 1),
        ("401", GET_RANGE, 1),
        ("403", "metadata.get_cost", 1),
        ("422", GET_RANGE, 1),
        ("500", GET_RANGE, 3),
        ("cut", GET_RANGE, 3),
    ]:
        gateway.fail(kind, endpoint=endpoint, times=times)
        go(tags={FORCE_TAG: "true"})
    gateway.price_per_gb = 1e7
    go(tags={FORCE_TAG: "true"})

    secret = TEST_KEY.encode()
    assert sum(r.auth_user == TEST_KEY for r in gateway.requests) > 10  # the key was used
    assert "ohlcv-1m" in gateway.schemas(GET_RANGE)
    assert any("rejected the API key" in m for m in messages)  # failures were recorded
    leaks = [m for m in messages if TEST_KEY in m]
    leaks += [r.getMessage() for r in caplog.records if TEST_KEY in r.getMessage()]
    captured = capfd.readouterr()
    leaks += [s for s in (captured.out, captured.err) if TEST_KEY in s]
    for folder in (home, env, tmp_path / "work"):
        for path in folder.rglob("*"):
            if path.is_file() and secret in path.read_bytes():
                leaks.append(str(path))
            if path.is_file() and path.suffix == ".db":
                leaks += [f"{path}: {where}" for where in sqlite_leaks(path, secret)]
    runs = instance.get_runs()
    assert len(runs) == 10 and instance.all_logs(runs[0].run_id)  # the event log is there
    assert any((home / "history").rglob("*.db"))
    instance.dispose()
    assert leaks == []


def test_a_key_typed_in_the_launchpad_is_refused_before_any_request(gateway, env, instance):
    # The right key, typed as text: Dagster stores a run's configuration, so it would sit in
    # its storage for anyone with the UI to read.
    # (The launchpad's resource config replaces every setting, so the test gives the others.)
    config = {"api_key": TEST_KEY, "gateway": gateway.url, "data_dir": str(env)}
    typed = {"resources": {"databento": {"config": config}}}
    result = run(instance, run_config=typed)

    assert not result.success
    text = failure_text(result)
    assert "typed as text" in text and "DATABENTO_API_KEY" in text
    assert TEST_KEY not in text  # the message never repeats the key
    assert gateway.count() == 0
    assert not env.exists()

    assert run(instance).success  # the key from DATABENTO_API_KEY: bought once
    paid = gateway.count()
    assert gateway.count("timeseries.get_range") == 1
    # The bars step refuses it too (it may ask Databento for the vendor's 1-minute bars).
    result = run(instance, run_config=typed, assets=[BARS_1MIN])
    assert not result.success and "typed as text" in failure_text(result)
    assert gateway.count() == paid
    assert not list(env.rglob("*1min*"))


def test_a_launchpad_source_the_io_manager_does_not_share_is_refused_before_any_request(
    gateway, env, instance, tmp_path
):
    # The launchpad configures the databento resource alone (demo data into another folder);
    # the IO manager still holds the environment's (real Databento data into ``env``).
    # Synthetic bars must never be stored as real market data, nor the demo's anywhere but
    # where asked.
    demo_dir = tmp_path / "demo_data"
    config = {"source": "demo", "data_dir": str(demo_dir), "demo_activity": 0.05}
    result = run(instance, run_config={"resources": {"databento": {"config": config}}})

    assert not result.success
    text = failure_text(result)
    assert "io_manager" in text and "demo" in text and str(env) in text
    assert gateway.count() == 0
    assert not env.exists() and not demo_dir.exists()  # no bar file, no origin marker


def test_a_launchpad_setting_resets_the_others_so_it_is_refused_unless_all_match(
    gateway, env, instance
):
    # A databento config in the launchpad replaces every setting: the cost cap asked for,
    # and the gateway, retries and data root of dbento.env silently back to their defaults.
    result = run(
        instance, run_config={"resources": {"databento": {"config": {"max_cost_usd": 50.0}}}}
    )
    assert not result.success
    text = failure_text(result)
    assert "max_cost_usd 50.0 instead of 5.0" in text
    assert f"gateway {DEFAULT_GATEWAY} instead of {gateway.url}" in text
    assert "retry_attempts 5 instead of 3" in text and "dbento.env" in text
    assert gateway.count() == 0 and not env.exists()

    # The same settings as loaded (the key by name) change nothing: the month is bought once.
    same = {
        "api_key": {"env": "DATABENTO_API_KEY"},
        "gateway": gateway.url,
        "data_dir": str(env),
        "retry_attempts": 3,
        "retry_backoff_seconds": 0.0,
    }
    assert run(instance, run_config={"resources": {"databento": {"config": same}}}).success
    assert gateway.count("timeseries.get_range") == 1


def resource_config(resource: DatabentoResource) -> dict[str, object]:
    """Every setting of ``resource`` as the launchpad's default config gives them (the key by
    the name of its variable)."""
    fields = type(resource).model_fields
    given = {name: getattr(resource, name) for name in fields if name != "api_key"}
    return {**given, "api_key": {"env": API_KEY_VARIABLE}}


def test_a_launchpad_io_manager_config_that_changes_a_setting_is_refused(
    gateway, env, instance, monkeypatch
):
    # DBENTO_FORMAT=csv in the environment; the launchpad gives the io_manager handoff only,
    # which would reset its format to Parquet: a folder of CSV months would get Parquet ones.
    monkeypatch.setenv("DBENTO_FORMAT", "csv")
    resource = databento_resource_from_env()
    launchpad = {"resources": {"io_manager": {"config": {"handoff": False}}}}
    result = run(instance, resource=resource, run_config=launchpad)

    assert not result.success
    text = failure_text(result)
    assert "format parquet instead of csv; handoff False instead of True" in text
    assert "DBENTO_FORMAT" in text
    assert gateway.count() == 0 and not env.exists()
    # The launchpad's own default config: every setting as loaded, which changes nothing.
    loaded = {
        "io_manager": {"config": {"format": "csv", "handoff": True}},
        "databento": {
            "config": {**resource_config(resource), "api_key": {"env": API_KEY_VARIABLE}}
        },
    }
    assert run(instance, resource=resource, run_config={"resources": loaded}).success
    assert sorted(p.suffix for p in env.glob("raw_1s/ES/*")) == [".csv", ".json"]
