"""The asset checks through real Dagster materializations, read back from the instance.

Corrupted data flows through the real pipeline: a month source that damages the demo's DBN
records (a repeated bar, a high below the low, a zero price, two contracts in one second), a
raw file replaced by hand, a faulty aggregation kernel, a bar file edited on disk, and a
Databento ohlcv-1m file with one changed value. Each time exactly the expected check fails,
with its count and wording, it is stored in the instance against the right partition, and no
file on disk changes. Valid data passes every check. The vendor cross-check runs on
Databento's real EQUS.MINI QQQ sample through the DBN-files source.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from dagster import (
    AssetCheckKey,
    AssetKey,
    AssetSelection,
    DagsterInstance,
    ExecuteInProcessResult,
    materialize,
)

# Private, as in the product's checks.py: the partition filter of the check history.
from dagster._core.event_api import PartitionKeyFilter

# A check record's status has no public name in Dagster 1.13; the tests compare with it.
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus

import dbento_assets.assets as assets_module
import dbento_assets.core.aggregate as aggregate_module
from dbento_assets.assets import build_assets
from dbento_assets.checks import (
    CHECKED_ON_DISK,
    REFUSED,
    SAVED,
    all_check_keys,
    check_names,
    raw_gate,
)
from dbento_assets.core import rules as v
from dbento_assets.core.aggregate import aggregate_bars
from dbento_assets.core.catalog import Catalog, load_catalog
from dbento_assets.core.coverage import (
    VendorMonth,
    dbn_coverage,
    intersect_windows,
    merge_windows,
    whole_minutes,
)
from dbento_assets.core.databento_api import DatabentoSource
from dbento_assets.core.dbn import decode_month, encode_month, encode_ohlcv, read_records
from dbento_assets.core.demo import DemoSource
from dbento_assets.core.months import Month
from dbento_assets.core.run_rules import raw_rules_proof, raw_rules_proven, run_raw_rules
from dbento_assets.core.source import FetchedMonth, FetchRequest, Logger, MonthSource
from dbento_assets.core.storage import REFUSED_NOTE, BarStore
from dbento_assets.core.timeframes import parse_timeframe
from dbento_assets.definitions import build_definitions
from dbento_assets.history import completed_evaluations, evaluation_of
from dbento_assets.io_managers import BarFileIOManager
from dbento_assets.resources import DatabentoResource

CATALOG = load_catalog()
ACTIVITY = 0.05  # a light synthetic month keeps these tests quick
ES_JAN = "2024-01-01|ES"
ES_FEB = "2024-02-01|ES"
JAN = Month(2024, 1)
SAMPLES = Path(__file__).parent / "fixtures" / "databento" / "EQUS.MINI"
QQQ_PARTITION = "2023-03-01|QQQ"
QQQ_MONTH = Month(2023, 3)
PASSED = AssetCheckExecutionRecordStatus.SUCCEEDED
FAILED = AssetCheckExecutionRecordStatus.FAILED
MINUTE = parse_timeframe("1min")

Corruption = Callable[[np.ndarray], np.ndarray]


# --------------------------------------------------------------------------- harness


def resources(root: Path, source: str = "demo", dbn_dir: Path | None = None) -> dict:
    databento = DatabentoResource(
        source=source,
        data_dir=str(root),
        dbn_dir=str(dbn_dir) if dbn_dir else None,
        demo_activity=ACTIVITY,
    )
    return {"databento": databento, "io_manager": BarFileIOManager(databento=databento)}


def run(
    root: Path,
    instance: DagsterInstance,
    partition: str = ES_JAN,
    *,
    catalog: Catalog = CATALOG,
    selection: AssetSelection | None = None,
    source: str = "demo",
    dbn_dir: Path | None = None,
) -> ExecuteInProcessResult:
    return materialize(
        build_assets(catalog),
        partition_key=partition,
        resources=resources(root, source, dbn_dir),
        instance=instance,
        selection=selection,
        raise_on_error=False,
    )


def bars_only(catalog: Catalog = CATALOG) -> AssetSelection:
    return AssetSelection.assets(*(f"bars_{tf.label}" for tf in catalog.timeframes))


def files_under(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


def latest_evaluation(instance: DagsterInstance, key: AssetCheckKey, partition: str):
    """The newest completed (passed or failed) evaluation of a check for one partition."""
    found = (r for r in completed_evaluations(instance, key) if r.partition == partition)
    return next(found, None)


def latest(
    instance: DagsterInstance, partition: str, catalog: Catalog = CATALOG
) -> dict[tuple[str, str], object]:
    """{(asset, check): newest completed evaluation record} for one partition, from the
    instance's check storage (not from the run result)."""
    found = {}
    for key in all_check_keys(catalog):
        record = latest_evaluation(instance, key, partition)
        if record is not None:
            found[(key.asset_key.to_user_string(), key.name)] = record
    return found


def in_run(records: dict, run_id: str) -> dict[tuple[str, str], object]:
    return {k: r for k, r in records.items() if r.run_id == run_id}


def failed_names(records: dict) -> set[tuple[str, str]]:
    return {k for k, r in records.items() if r.status == FAILED}


def left_unevaluated(instance: DagsterInstance, key: AssetCheckKey, partition: str, run) -> bool:
    """True when ``run`` planned the check for ``partition`` but yielded no result: Dagster
    keeps the record PLANNED, and the UI shows it as skipped once the run succeeded."""
    (record,) = instance.event_log_storage.get_asset_check_execution_history(
        key, limit=1, partition_filter=PartitionKeyFilter(key=partition)
    )
    return (
        run.success
        and record.run_id == run.run_id
        and record.status == AssetCheckExecutionRecordStatus.PLANNED
    )


def meta(record) -> dict[str, object]:
    return {k: getattr(m, "value", m) for k, m in evaluation_of(record).metadata.items()}


def failure_message(result: ExecuteInProcessResult) -> str:
    failures = [e for e in result.all_events if e.is_step_failure]
    assert failures, "expected a failed step"
    return "\n".join(e.step_failure_data.error.to_string() for e in failures)


def failure_description(result: ExecuteInProcessResult) -> str:
    failures = [e for e in result.all_events if e.is_step_failure]
    assert failures, "expected a failed step"
    return "\n".join(e.step_failure_data.user_failure_data.description for e in failures)


class CorruptingSource(DemoSource):
    """The demo source with its DBN records damaged by ``corrupt`` (a month source)."""

    def __init__(self, corrupt: Corruption, extra_ids: frozenset[int] = frozenset()) -> None:
        super().__init__(activity=ACTIVITY)
        self.corrupt = corrupt
        self.extra_ids = extra_ids

    def fetch(self, request: FetchRequest, log: Logger) -> FetchedMonth:
        fetched = super().fetch(request, log)
        (payload,) = fetched.payloads
        records, _ = read_records(payload)
        damaged = encode_month(self.corrupt(records.copy()), request.instrument, request.month)
        ids = (fetched.instrument_ids or frozenset()) | self.extra_ids
        return FetchedMonth([damaged], ids, fetched.metadata)


class Router:
    """A month source sending the partitions of ``plan`` through their corruption."""

    name = "demo"
    vendor_requested = False

    def __init__(self, plan: dict[str, CorruptingSource], fallback: MonthSource) -> None:
        self.plan, self.fallback = plan, fallback

    @property
    def paid_usd(self) -> float:
        return self.fallback.paid_usd

    def fetch(self, request: FetchRequest, log: Logger) -> FetchedMonth:
        key = f"{request.month.key}|{request.instrument.symbol}"
        return self.plan.get(key, self.fallback).fetch(request, log)

    def vendor_bars(self, request: FetchRequest, log: Logger) -> VendorMonth | str:
        return self.fallback.vendor_bars(request, log)

    def cache_folder(self, symbol: str, month: Month) -> Path | None:
        return self.fallback.cache_folder(symbol, month)


@pytest.fixture
def corrupt_source(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """Make every ``raw_1s_bars`` fetch of the partitions given go through a corruption."""

    plan: dict[str, CorruptingSource] = {}
    real = DatabentoResource.month_source

    monkeypatch.setattr(
        DatabentoResource,
        "month_source",
        lambda self, catalog_file=None: Router(plan, real(self, catalog_file)),
    )

    def arrange(partition: str, corrupt: Corruption | None, extra_ids=frozenset()) -> None:
        if corrupt is None:
            plan.pop(partition, None)
        else:
            plan[partition] = CorruptingSource(corrupt, frozenset(extra_ids))

    return arrange


@pytest.fixture(scope="module")
def good_es_jan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root holding the valid ES January partition (all four files)."""
    root = tmp_path_factory.mktemp("good") / "data"
    assert run(root, DagsterInstance.ephemeral()).success
    return root


@pytest.fixture
def es_root(good_es_jan: Path, tmp_path: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(good_es_jan, root)
    return root


def middle(records: np.ndarray) -> int:
    return len(records) // 2


def repeat_a_bar(records: np.ndarray) -> np.ndarray:
    k = middle(records)
    return np.insert(records, k + 1, records[k])


def high_below_low(records: np.ndarray) -> np.ndarray:
    k = middle(records)
    records[k]["high"] = records[k]["low"] - 250_000_000  # one ES tick below the low
    return records


def zero_low(records: np.ndarray) -> np.ndarray:
    records[middle(records)]["low"] = 0
    return records


def second_contract_in_a_second(records: np.ndarray) -> np.ndarray:
    k = middle(records)
    twin = records[k : k + 1].copy()
    twin["instrument_id"] = int(records[k]["instrument_id"]) + 1
    return np.insert(records, k + 1, twin)


def half_second_bar(records: np.ndarray) -> np.ndarray:
    # A bar at hh:mm:ss.5 (like 05:29:37.5): still before the next bar, so only the grid breaks.
    k = middle(records)
    assert records[k + 1]["ts_event"] - records[k]["ts_event"] >= 1_000_000_000
    records[k]["ts_event"] += 500_000_000
    return records


def last_nanosecond_bar(records: np.ndarray) -> np.ndarray:
    # The month's last bar moved to 23:59:59.999999999: inside the month, off the grid.
    records[-1]["ts_event"] = JAN.end_ns - 1
    return records


# --------------------------------------------------------------------------- specs


def test_every_rule_is_a_partitioned_check_and_only_errors_block() -> None:
    raw, bars = build_assets(CATALOG)
    specs = {(s.asset_key.to_user_string(), s.name): s for d in (raw, bars) for s in d.check_specs}
    expected = {(k.asset_key.to_user_string(), k.name) for k in all_check_keys(CATALOG)}
    assert set(specs) == expected
    assert {name for asset, name in specs if asset == "raw_1s_bars"} == set(v.RAW_RULES)
    assert {name for asset, name in specs if asset == "bars_15s"} == set(v.AGGREGATED_RULES)
    assert {name for asset, name in specs if asset == "bars_1min"} == {
        *v.AGGREGATED_RULES,
        v.RULE_VENDOR,
    }
    for (_, name), spec in specs.items():
        assert spec.blocking == (v.RULE_SEVERITY[name] == v.ERROR), name
        assert spec.partitions_def == raw.partitions_def
    assert not specs[("raw_1s_bars", v.RULE_CALENDAR)].blocking


def test_vendor_cross_check_runs_for_1min_bars_only() -> None:
    assert v.RULE_VENDOR not in check_names(parse_timeframe("30s"))
    assert check_names(parse_timeframe("1min")) == (*v.AGGREGATED_RULES, v.RULE_VENDOR)


@pytest.mark.parametrize(
    ("source", "vendor_check", "declared"),
    [
        ("databento", True, True),  # it buys Databento's 1-minute bars to compare with
        ("dbn", False, True),  # the folder may hold ohlcv-1m files
        ("databento", False, False),
        ("demo", False, False),
        ("demo", True, False),  # it has no 1-minute bars to buy
    ],
)
def test_a_deployment_declares_the_vendor_check_only_when_it_can_compare(
    tmp_path: Path, source: str, vendor_check: bool, declared: bool
) -> None:
    resource = DatabentoResource(
        source=source, data_dir=str(tmp_path), dbn_dir=str(tmp_path), vendor_check=vendor_check
    )
    keys = build_definitions(CATALOG, databento=resource).resolve_asset_graph().asset_check_keys
    vendor = AssetCheckKey(AssetKey("bars_1min"), v.RULE_VENDOR)
    assert (vendor in keys) is declared
    assert set(keys) | {vendor} == set(all_check_keys(CATALOG))  # every other check, always
    assert set(keys) == set(all_check_keys(CATALOG, vendor=resource.declares_vendor_check()))


# --------------------------------------------------------------------------- valid data


def test_valid_data_passes_every_check_recorded_against_its_partition(tmp_path: Path) -> None:
    instance = DagsterInstance.ephemeral()
    root = tmp_path / "data"
    first = run(root, instance, ES_JAN)
    assert first.success
    jan = latest(instance, ES_JAN)
    vendor_key = AssetCheckKey(AssetKey("bars_1min"), v.RULE_VENDOR)
    assert set(jan) == {
        (k.asset_key.to_user_string(), k.name) for k in all_check_keys(CATALOG) if k != vendor_key
    }
    assert {r.status for r in jan.values()} == {PASSED}
    # Synthetic data has nothing to compare with: the vendor check is left unevaluated (shown
    # as skipped), never a green pass.
    assert left_unevaluated(instance, vendor_key, ES_JAN, first)
    assert {r.partition for r in jan.values()} == {ES_JAN}
    assert all(meta(r)["outcome"] == SAVED for r in jan.values())
    assert latest(instance, ES_FEB) == {}

    second = run(root, instance, ES_FEB)
    assert second.success
    feb = latest(instance, ES_FEB)
    assert len(feb) == len(jan) and {r.run_id for r in feb.values()} == {second.run_id}
    # January's results are still January's, from the first run.
    assert {r.run_id for r in latest(instance, ES_JAN).values()} == {first.run_id}
    roll = meta(jan[("raw_1s_bars", v.RULE_NO_ROLL_IN_BAR)])
    assert roll["roll_count"] == 0 and roll["violations"] == 0


def test_roll_dates_are_in_the_metadata_of_a_month_with_a_roll(tmp_path: Path) -> None:
    instance = DagsterInstance.ephemeral()
    assert run(tmp_path / "data", instance, "2024-03-01|ES").success
    record = latest(instance, "2024-03-01|ES")[("raw_1s_bars", v.RULE_NO_ROLL_IN_BAR)]
    found = meta(record)
    assert record.status == PASSED
    assert found["roll_count"] == 1 and found["roll_dates"] == "2024-03-07"
    assert "the contract changes on 2024-03-07" in evaluation_of(record).description


# --------------------------------------------------------------------------- raw corrupted


RAW_CASES = {
    "repeated bar": (
        repeat_a_bar,
        (),
        v.RULE_TIME_ORDER,
        1,
        "1 bar out of time order or repeating an earlier bar (1 repeated, 0 going back",
    ),
    "high below low": (
        high_below_low,
        (),
        v.RULE_OHLC,
        1,
        "1 bar with impossible prices: high below open or close (1), high below low (1).",
    ),
    "zero price": (zero_low, (), v.RULE_SCHEMA, 1, "low not above 0 (1)"),
    "two contracts in one second": (
        second_contract_in_a_second,
        "extra id",
        v.RULE_NO_ROLL_IN_BAR,
        1,
        "1 second with bars of two different contracts at once",
    ),
    "bar at half a second": (
        half_second_bar,
        (),
        v.RULE_ALIGNED,
        1,
        "1 bar not starting on a 1s boundary.",
    ),
    "bar at the month's last nanosecond": (
        last_nanosecond_bar,
        (),
        v.RULE_ALIGNED,
        1,
        "1 bar not starting on a 1s boundary.",
    ),
}


@pytest.mark.parametrize("case", list(RAW_CASES))
def test_corrupted_raw_fails_exactly_its_check_and_changes_no_file(
    case: str, es_root: Path, corrupt_source: Callable[..., None]
) -> None:
    corrupt, extra, rule, count, words = RAW_CASES[case]
    extra_ids = set()
    if extra:
        records, _ = read_records(
            DemoSource(activity=ACTIVITY)
            .fetch(FetchRequest(CATALOG.instrument("ES"), JAN), lambda _m: None)
            .payloads[0]
        )
        extra_ids = {int(records[middle(records)]["instrument_id"]) + 1}
    corrupt_source(ES_JAN, corrupt, extra_ids)
    before = files_under(es_root)
    instance = DagsterInstance.ephemeral()

    result = run(es_root, instance)

    assert not result.success
    assert files_under(es_root) == before  # raw and every bars file byte-identical
    description = failure_description(result)
    assert f"raw_1s_bars for {ES_JAN} was NOT saved: 1 blocking check failed." in description
    assert words in description and "left unchanged" in description
    records = in_run(latest(instance, ES_JAN), result.run_id)
    # Every raw check was recorded against the partition; no bars step ran.
    assert {asset for asset, _ in records} == {"raw_1s_bars"}
    assert {name for _, name in records} == set(v.RAW_RULES)
    assert failed_names(records) == {("raw_1s_bars", rule)}
    failed = records[("raw_1s_bars", rule)]
    assert failed.partition == ES_JAN
    found = meta(failed)
    assert found["violations"] == count and found["outcome"] == REFUSED
    assert words in evaluation_of(failed).description
    table = found["first_violations"]
    assert table.startswith("| ") and "\n|---|" in table
    assert evaluation_of(failed).blocking is True


# --------------------------------------------------------------------------- raw gate


def test_bars_alone_refuse_until_raw_is_fixed(
    es_root: Path, corrupt_source: Callable[..., None]
) -> None:
    instance = DagsterInstance.ephemeral()
    before = files_under(es_root)
    corrupt_source(ES_JAN, repeat_a_bar)
    assert not run(es_root, instance).success

    refused = run(es_root, instance, selection=bars_only())
    assert not refused.success
    text = failure_description(refused)
    assert f"The latest download of raw_1s_bars for {ES_JAN} was refused" in text
    assert "timestamps_increasing" in text and "1 bar out of time order" in text
    assert files_under(es_root) == before
    assert in_run(latest(instance, ES_JAN), refused.run_id) == {}

    corrupt_source(ES_JAN, None)  # the vendor's data is good again
    fixed = run(es_root, instance, selection=AssetSelection.assets("raw_1s_bars"))
    assert fixed.success
    rebuilt = run(es_root, instance, selection=bars_only())
    assert rebuilt.success
    assert files_under(es_root) == before
    assert failed_names(latest(instance, ES_JAN)) == set()


def test_a_refused_download_holds_the_bars_back_through_a_note_beside_the_raw_file(
    es_root: Path, corrupt_source: Callable[..., None]
) -> None:
    # Every run on its own instance: what the bars step knows travels with the data root.
    note = Path(BarStore.at(es_root).note_path("ES", JAN, REFUSED_NOTE).path)
    corrupt_source(ES_JAN, repeat_a_bar)
    assert not run(es_root, DagsterInstance.ephemeral()).success
    assert note.is_file() and note.name.startswith(".")

    refused = run(es_root, DagsterInstance.ephemeral(), selection=bars_only())
    assert not refused.success
    assert f"The latest download of raw_1s_bars for {ES_JAN} was refused" in (
        failure_description(refused)
    )

    corrupt_source(ES_JAN, None)
    raw_only = AssetSelection.assets("raw_1s_bars")
    assert run(es_root, DagsterInstance.ephemeral(), selection=raw_only).success
    assert not note.exists()  # a good raw file clears it
    assert run(es_root, DagsterInstance.ephemeral(), selection=bars_only()).success


def test_bars_refuse_a_raw_file_replaced_by_hand_with_a_bar_outside_the_month(
    es_root: Path,
) -> None:
    store = BarStore.at(es_root)
    raw, identity = store.read_with_identity(store.raw_path("ES", JAN))
    assert identity is not None
    stray = raw.tail(1).assign(ts_event=pd.Timestamp("2024-02-01 00:00:05", tz="UTC"))
    # Its identity kept, without the proof (as a tool writing through BarStore would): the
    # blocking rules run on it.
    bars = pd.concat([raw, stray], ignore_index=True)
    store.write(bars, store.raw_path("ES", JAN), replace(identity, raw_rules=""))
    before = files_under(es_root)
    instance = DagsterInstance.ephemeral()

    result = run(es_root, instance, selection=bars_only())

    assert not result.success
    text = failure_description(result)
    assert f"The raw 1-second bars of {ES_JAN} fail blocking checks" in text
    assert "1 bar outside 2024-01" in text and "0 before it, 1 after it" in text
    assert files_under(es_root) == before


def counting_raw_gate(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the bars step's runs of the blocking raw rules (one entry per run)."""
    calls: list[int] = []
    real = assets_module.raw_gate

    def counted(raw: pd.DataFrame, month: Month, instrument) -> list:
        calls.append(len(raw))
        return real(raw, month, instrument)

    monkeypatch.setattr(assets_module, "raw_gate", counted)
    return calls


def test_the_bars_step_trusts_a_raw_file_proven_by_the_raw_step(
    es_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The raw rules run once per raw month: the raw file carries the proof that they
    passed on exactly its bars, and the bars step, from the file or handed over in memory,
    does not run them again. A file without the proof (older code, by hand) is checked."""
    calls = counting_raw_gate(monkeypatch)
    store = BarStore.at(es_root)
    path = store.raw_path("ES", JAN)
    raw, identity = store.read_with_identity(path)
    assert identity is not None and identity.raw_rules == raw_rules_proof(raw, JAN)

    assert run(es_root, DagsterInstance.ephemeral(), selection=bars_only()).success
    assert run(tmp_path / "fresh", DagsterInstance.ephemeral()).success  # raw + bars, one run
    assert calls == []

    store.write(raw, path, replace(identity, raw_rules=""))  # as older code wrote it
    assert run(es_root, DagsterInstance.ephemeral(), selection=bars_only()).success
    assert calls == [len(raw)]


def test_a_proof_holds_for_its_month_and_its_bars_only(es_root: Path) -> None:
    store = BarStore.at(es_root)
    raw, identity = store.read_with_identity(store.raw_path("ES", JAN))
    assert raw_rules_proven(raw, identity, JAN)
    assert not raw_rules_proven(raw, identity, Month(2024, 2))  # relabelled as another month
    assert not raw_rules_proven(raw.iloc[:-1], identity, JAN)  # a bar dropped
    edited = raw.copy()
    edited.loc[3, "volume"] += np.uint64(1)
    assert not raw_rules_proven(edited, identity, JAN)
    assert not raw_rules_proven(raw, None, JAN)  # no identity: older code, by hand


def test_a_raw_file_edited_under_its_identity_is_refused_as_changed(
    es_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One price changed in the Parquet file, its footer (the identity and its proof) kept:
    the proof's fingerprint no longer matches the bars, so nothing the identity says holds
    (the month whole, its coverage) and the file is refused without building anything."""
    calls = counting_raw_gate(monkeypatch)
    store = BarStore.at(es_root)
    path = Path(store.raw_path("ES", JAN).path)
    table = pq.read_table(path)
    high = table.column("high").to_numpy().copy()
    row = len(high) // 2
    high[row] = table.column("low")[row].as_py() - 0.25  # a high below its low
    edited = table.set_column(table.schema.get_field_index("high"), "high", pa.array(high))
    pq.write_table(edited.replace_schema_metadata(table.schema.metadata), path)
    found = store.identity_of(store.raw_path("ES", JAN))
    assert found is not None and found.raw_rules  # the proof is still there, now stale
    before = files_under(es_root)

    result = run(es_root, DagsterInstance.ephemeral(), selection=bars_only())

    assert not result.success
    assert calls == []
    text = failure_description(result)
    assert f"{path} was changed after it was written" in text
    assert "no bars were built and no file was changed" in text
    assert files_under(es_root) == before


def test_a_raw_file_cut_short_under_its_identity_builds_no_bars_called_complete(
    es_root: Path,
) -> None:
    """The first 20,000 bars kept, the footer too: the bars rules would pass on them (a
    partial month is not a broken one), but bars built from them would say the month is
    whole. Refused, and the bar files stay as they were."""
    store = BarStore.at(es_root)
    path = Path(store.raw_path("ES", JAN).path)
    table = pq.read_table(path)
    pq.write_table(table.slice(0, 20_000).replace_schema_metadata(table.schema.metadata), path)
    before = files_under(es_root)

    result = run(es_root, DagsterInstance.ephemeral(), selection=bars_only())

    assert not result.success
    assert f"{path} was changed after it was written" in failure_description(result)
    assert files_under(es_root) == before


# --------------------------------------------------------------------------- aggregated


def test_a_wrong_aggregate_is_refused_and_only_its_file_is_kept(
    es_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = aggregate_bars

    def off_by_one_lot(bars: pd.DataFrame, timeframe) -> pd.DataFrame:
        out = real(bars, timeframe)
        if timeframe == MINUTE:
            out.loc[5, "volume"] += 1
        return out

    # aggregate_many builds every timeframe through aggregate_bars
    monkeypatch.setattr(aggregate_module, "aggregate_bars", off_by_one_lot)
    store = BarStore.at(es_root)
    one_min = store.aggregated_path("ES", JAN, MINUTE)
    one_min_before = one_min.read_bytes()
    one_min.unlink()  # so an accidental write would show
    instance = DagsterInstance.ephemeral()

    result = run(es_root, instance)

    assert not result.success
    assert not one_min.exists()
    assert store.aggregated_path("ES", JAN, parse_timeframe("15s")).exists()
    description = failure_description(result)
    assert f"bars_1min for {ES_JAN} was NOT saved: 1 blocking check failed." in description
    assert "left unchanged" in description
    assert "1 bar not matching the 1-second bars they come from" in description
    records = in_run(latest(instance, ES_JAN), result.run_id)
    assert len(records) == len(all_check_keys(CATALOG)) - 1  # the vendor check: demo, skipped
    assert failed_names(records) == {("bars_1min", v.RULE_RECONCILED)}
    found = meta(records[("bars_1min", v.RULE_RECONCILED)])
    assert found["violations"] == 1 and found["differing_bars"] == 1
    assert found["outcome"] == REFUSED
    assert "volume" in found["first_violations"] and "volume_expected" in found["first_violations"]
    assert meta(records[("bars_15s", v.RULE_RECONCILED)])["outcome"] == SAVED
    assert one_min_before  # the good file existed before this run


def test_checks_alone_check_the_file_on_disk_and_leave_it(es_root: Path) -> None:
    store = BarStore.at(es_root)
    path = store.aggregated_path("ES", JAN, MINUTE)
    bars = store.read(path).copy()  # files are read memory-mapped, read-only
    bars.loc[3, "high"] = bars.loc[3, "low"] - 0.25
    store.write(bars, path)
    before = files_under(es_root)
    instance = DagsterInstance.ephemeral()

    # A run of checks alone, as the UI launches it for one partition (materialize() cannot
    # infer a partitions definition from a selection holding no asset).
    result = materialize(
        build_assets(CATALOG),
        selection=AssetSelection.checks_for_assets("bars_1min"),
        tags={"dagster/partition": ES_JAN},
        resources=resources(es_root),
        instance=instance,
        raise_on_error=False,
    )

    assert not result.success
    assert files_under(es_root) == before
    records = in_run(latest(instance, ES_JAN), result.run_id)
    assert {asset for asset, _ in records} == {"bars_1min"}
    assert failed_names(records) == {
        ("bars_1min", v.RULE_OHLC),
        ("bars_1min", v.RULE_RECONCILED),
    }
    assert meta(records[("bars_1min", v.RULE_OHLC)])["outcome"] == CHECKED_ON_DISK
    assert result.get_asset_materialization_events() == []


# --------------------------------------------------------------------------- vendor


@pytest.fixture
def qqq_catalog(tmp_path: Path) -> Catalog:
    path = tmp_path / "catalog.toml"
    path.write_text(
        'start_month = "2023-03"\n'
        'timeframes = ["15s", "1min"]\n'
        "[instruments.QQQ]\n"
        'dataset = "EQUS.MINI"\n'
        'symbol = "QQQ"\n'
        'stype_in = "raw_symbol"\n'
        "tick = 0.01\n"
        'kind = "equity"\n'
    )
    return load_catalog(path)


def widened(path: Path, schema: str, start_ns: int, end_ns: int, before_ns: int) -> bytes:
    """A real sample file's records before ``before_ns`` under a header spanning
    ``[start_ns, end_ns)``, its symbology kept, as a .dbn.zst file's bytes."""
    records, meta = read_records(path, schema)
    return encode_ohlcv(
        records[records["ts_event"] < before_ns],
        dataset=str(meta.dataset),
        symbols=[str(s) for s in meta.symbols],
        stype_in=str(meta.stype_in),
        start_ns=start_ns,
        end_ns=end_ns,
        mappings={raw: [dict(iv) for iv in intervals] for raw, intervals in meta.mappings.items()},
        schema=schema,
    )


def dbn_folder(tmp_path: Path, with_1m: bool = True) -> Path:
    """Databento's real QQQ sample as a whole month: a stored month must be whole, and the
    sample is the first 4 records of 2023-03-28 (a request cut by its ``limit``). Its 1s
    records are unchanged under a header spanning March; its 1m file keeps the bars and
    the reach (to 11:11:22) the 1s sample really covers."""
    folder = tmp_path / "dbn"
    folder.mkdir()
    day = pd.Timestamp("2023-03-28", tz="UTC").value
    reach = pd.Timestamp("2023-03-28 11:11:22", tz="UTC").value
    name = "test_data.ohlcv-{}.dbn.zst"
    one_s = widened(
        SAMPLES / name.format("1s"),
        "ohlcv-1s",
        QQQ_MONTH.start_ns,
        QQQ_MONTH.end_ns,
        QQQ_MONTH.end_ns,
    )
    (folder / name.format("1s")).write_bytes(one_s)
    if with_1m:
        one_m = widened(SAMPLES / name.format("1m"), "ohlcv-1m", day, reach, reach)
        (folder / name.format("1m")).write_bytes(one_m)
    return folder


def test_bars_1min_equal_databentos_own_1m_bars_on_the_real_qqq_sample(
    tmp_path: Path, qqq_catalog: Catalog
) -> None:
    instance = DagsterInstance.ephemeral()
    root = tmp_path / "data"
    result = run(
        root,
        instance,
        QQQ_PARTITION,
        catalog=qqq_catalog,
        source="dbn",
        dbn_dir=dbn_folder(tmp_path),
    )
    assert result.success, failure_message(result) if not result.success else ""
    records = latest(instance, QQQ_PARTITION, qqq_catalog)
    vendor = records[("bars_1min", v.RULE_VENDOR)]
    found = meta(vendor)
    assert vendor.status == PASSED and "skipped" not in found
    assert found["compared"] == 2 and found["differing"] == 0
    assert found["covered_minutes"] == 11 * 60 + 11  # 00:00 to 11:10, the 1s file's reach
    assert found["compared_windows"] == [
        {"start": "2023-03-28T00:00:00+00:00", "end": "2023-03-28T11:11:22+00:00"}
    ]
    assert "test_data.ohlcv-1m.dbn.zst" in found["vendor_source"]
    # The sample trades before the regular session: a warning, and the data is kept.
    calendar = records[("raw_1s_bars", v.RULE_CALENDAR)]
    assert calendar.status == FAILED and evaluation_of(calendar).severity.value == "WARN"
    assert failed_names(records) == {("raw_1s_bars", v.RULE_CALENDAR)}
    store = BarStore.at(root)
    assert len(store.read(store.aggregated_path("QQQ", QQQ_MONTH, MINUTE))) == 3


def test_the_vendor_comparison_keeps_to_what_the_raw_files_identity_covers(
    tmp_path: Path, qqq_catalog: Catalog
) -> None:
    root, folder = tmp_path / "data", dbn_folder(tmp_path)
    assert run(
        root,
        DagsterInstance.ephemeral(),
        QQQ_PARTITION,
        catalog=qqq_catalog,
        source="dbn",
        dbn_dir=folder,
    ).success
    # The raw file rewritten as if its DBN had covered 2023-03-28 up to 11:10:30 only.
    store = BarStore.at(root)
    path = store.raw_path("QQQ", QQQ_MONTH)
    raw, identity = store.read_with_identity(path)
    end = pd.Timestamp("2023-03-28 11:10:30", tz="UTC").value
    covered = ((pd.Timestamp("2023-03-28", tz="UTC").value, end),)
    store.write(raw, path, replace(identity, covered=covered))

    instance = DagsterInstance.ephemeral()  # no raw materialization in its history
    result = run(
        root,
        instance,
        QQQ_PARTITION,
        catalog=qqq_catalog,
        selection=AssetSelection.assets("bars_1min"),
        source="dbn",
        dbn_dir=folder,
    )

    assert result.success, failure_message(result) if not result.success else ""
    found = meta(latest(instance, QQQ_PARTITION, qqq_catalog)[("bars_1min", v.RULE_VENDOR)])
    assert found["compared_windows"] == [
        {"start": "2023-03-28T00:00:00+00:00", "end": "2023-03-28T11:10:30+00:00"}
    ]
    assert found["covered_minutes"] == 11 * 60 + 10  # 00:00 to 11:09


def changed_1m_file(folder: Path) -> None:
    """Rewrite the sample's ohlcv-1m file with the 11:10 bar's volume changed (1062 -> 1063)."""
    path = folder / "test_data.ohlcv-1m.dbn.zst"
    data = bytearray(zstandard.ZstdDecompressor().decompressobj().decompress(path.read_bytes()))
    assert data[:3] == b"DBN"
    first = 8 + int.from_bytes(data[4:8], "little")  # records follow the metadata header
    volume = first + 56 + 48  # second record, volume field
    assert int.from_bytes(data[volume : volume + 8], "little") == 1062
    data[volume : volume + 8] = (1063).to_bytes(8, "little")
    path.unlink()
    (folder / "test_data.ohlcv-1m.dbn").write_bytes(bytes(data))


def test_a_bar_differing_from_databento_is_refused(tmp_path: Path, qqq_catalog: Catalog) -> None:
    folder = dbn_folder(tmp_path)
    changed_1m_file(folder)
    instance = DagsterInstance.ephemeral()
    root = tmp_path / "data"

    result = run(root, instance, QQQ_PARTITION, catalog=qqq_catalog, source="dbn", dbn_dir=folder)

    assert not result.success
    store = BarStore.at(root)
    assert not store.aggregated_path("QQQ", QQQ_MONTH, MINUTE).exists()
    assert store.aggregated_path("QQQ", QQQ_MONTH, parse_timeframe("15s")).exists()
    records = in_run(latest(instance, QQQ_PARTITION, qqq_catalog), result.run_id)
    assert failed_names(records) == {
        ("raw_1s_bars", v.RULE_CALENDAR),
        ("bars_1min", v.RULE_VENDOR),
    }
    vendor = records[("bars_1min", v.RULE_VENDOR)]
    found = meta(vendor)
    assert found["violations"] == 1 and found["differing"] == 1
    assert "1 one-minute bar in 2023-03 disagreeing with Databento" in (
        evaluation_of(vendor).description
    )
    assert "| 2023-03-28 11:10:00 |" in found["first_violations"]
    assert "1063" in found["first_violations"] and "1062" in found["first_violations"]


def test_without_vendor_bars_the_cross_check_is_skipped(
    tmp_path: Path, qqq_catalog: Catalog
) -> None:
    instance = DagsterInstance.ephemeral()
    result = run(
        tmp_path / "data",
        instance,
        QQQ_PARTITION,
        catalog=qqq_catalog,
        source="dbn",
        dbn_dir=dbn_folder(tmp_path, with_1m=False),
    )
    assert result.success
    # Nothing to compare and nobody asked for a download: unevaluated, never a green pass.
    assert ("bars_1min", v.RULE_VENDOR) not in latest(instance, QQQ_PARTITION, qqq_catalog)
    key = AssetCheckKey(AssetKey("bars_1min"), v.RULE_VENDOR)
    assert left_unevaluated(instance, key, QQQ_PARTITION, result)


# --------------------------------------------------------------------------- coverage helpers


def test_coverage_of_a_request_cut_short_by_its_limit_ends_at_its_last_record() -> None:
    day = pd.Timestamp("2023-03-28", tz="UTC").value
    one_s = dbn_coverage([SAMPLES / "test_data.ohlcv-1s.dbn.zst"], QQQ_MONTH, "ohlcv-1s")
    one_m = dbn_coverage([SAMPLES / "test_data.ohlcv-1m.dbn.zst"], QQQ_MONTH, "ohlcv-1m")
    assert one_s == [(day, pd.Timestamp("2023-03-28 11:11:22", tz="UTC").value)]
    assert one_m == [(day, pd.Timestamp("2023-03-28 11:19", tz="UTC").value)]
    minutes = whole_minutes(intersect_windows(one_s, one_m))
    assert minutes[0] == pd.Timestamp("2023-03-28 00:00", tz="UTC")
    assert minutes[-1] == pd.Timestamp("2023-03-28 11:10", tz="UTC")


def test_coverage_of_a_whole_month_request_is_the_month() -> None:
    fetched = DemoSource(activity=0.01).fetch(
        FetchRequest(CATALOG.instrument("ES"), JAN), lambda _m: None
    )
    assert dbn_coverage(fetched.payloads, JAN, "ohlcv-1s") == [(JAN.start_ns, JAN.end_ns)]


def test_only_whole_minutes_inside_both_windows_are_compared() -> None:
    t = pd.Timestamp("2024-01-02", tz="UTC").value
    s = 1_000_000_000
    a = merge_windows([(t + 30 * s, t + 100 * s), (t + 100 * s, t + 190 * s)])
    assert a == [(t + 30 * s, t + 190 * s)]
    both = intersect_windows(a, [(t, t + 185 * s), (t + 400 * s, t + 900 * s)])
    assert both == [(t + 30 * s, t + 185 * s)]
    assert list(whole_minutes(both).asi8) == [t + 60 * s, t + 120 * s] and whole_minutes([]).empty


def test_the_raw_gate_runs_the_blocking_raw_rules_only() -> None:
    fetched = DemoSource(activity=0.01).fetch(
        FetchRequest(CATALOG.instrument("ES"), JAN), lambda _m: None
    )
    records, _ = read_records(fetched.payloads[0])
    bars = decode_month([encode_bytes(repeat_a_bar(records))], "ES", JAN).bars
    names = [
        r.rule
        for r in run_raw_rules(bars, JAN, CATALOG.instrument("ES"), rules=v.RAW_BLOCKING_RULES)
    ]
    assert names == [r for r in v.RAW_RULES if r != v.RULE_CALENDAR]
    assert [r.rule for r in raw_gate(bars, JAN, CATALOG.instrument("ES"))] == [v.RULE_TIME_ORDER]
    assert v.RULE_ALIGNED in names  # raw bars on the whole-second grid block the data
    with pytest.raises(ValueError, match="not raw rules: reconciles_with_raw"):
        run_raw_rules(bars, JAN, CATALOG.instrument("ES"), rules=[v.RULE_RECONCILED])


def encode_bytes(records: np.ndarray) -> bytes:
    return encode_month(records, CATALOG.instrument("ES"), JAN)


def test_the_api_source_is_asked_for_1m_bars_only_when_the_user_turns_it_on(
    monkeypatch: pytest.MonkeyPatch, qqq_catalog: Catalog, tmp_path: Path
) -> None:
    qqq = qqq_catalog.instrument("QQQ")
    asked: list[FetchRequest] = []

    class Api(DatabentoSource):  # the real source, with fetch_accepted standing in for a download
        def fetch_accepted(
            self, request: FetchRequest, log: Logger, accept: Callable, schema: str = "ohlcv-1s"
        ) -> tuple[FetchedMonth, object]:
            assert schema == "ohlcv-1m"
            asked.append(request)
            fetched = FetchedMonth([SAMPLES / "test_data.ohlcv-1m.dbn.zst"], frozenset({13340}))
            return fetched, accept(fetched)

    monkeypatch.setattr(
        DatabentoResource,
        "api_source",
        lambda self, c=None: Api("db-test", tmp_path, vendor_check=self.vendor_check),
    )
    resource = DatabentoResource(source="databento", api_key="db-test")
    off, requested, _ = resource.vendor_month(qqq, QQQ_MONTH, lambda _m: None)
    assert isinstance(off, str) and "DBENTO_VENDOR_CHECK=true" in off and asked == []
    assert not requested

    resource = DatabentoResource(source="databento", api_key="db-test", vendor_check=True)
    found, requested, _ = resource.vendor_month(qqq, QQQ_MONTH, lambda _m: None)
    assert requested
    assert asked == [FetchRequest(qqq, QQQ_MONTH)]
    assert isinstance(found, VendorMonth) and len(found.bars) == 4
    assert found.covered == [
        (
            pd.Timestamp("2023-03-28", tz="UTC").value,
            pd.Timestamp("2023-03-28 11:19", tz="UTC").value,
        )
    ]
