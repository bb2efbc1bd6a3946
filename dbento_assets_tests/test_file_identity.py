"""Bar files know what they are (issue 9, item 8): identity in the Parquet footer or a CSV
sidecar, readable by plain tools, and the bars step refusing a raw file that is not its
partition's (another symbol, month or origin; unreadable; other columns) in one sentence,
with every aggregate file left byte for byte as it was."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dagster import AssetSelection, DagsterInstance, materialize

from dbento_assets.assets import build_assets
from dbento_assets.core.catalog import load_catalog
from dbento_assets.core.months import Month
from dbento_assets.core.run_rules import raw_rules_proof
from dbento_assets.core.storage import CODE_VERSION, BarStore, FileIdentity
from dbento_assets.core.timeframes import parse_timeframe
from dbento_assets.io_managers import BarFileIOManager
from dbento_assets.resources import DatabentoResource

JAN, FEB = Month(2024, 1), Month(2024, 2)
ACTIVITY = 0.05
BARS = ["bars_15s", "bars_30s", "bars_1min"]
LABELS = ["15s", "30s", "1min"]


def run(root: Path, partition: str, fmt: str = "parquet", selection: list[str] | None = None):
    return materialize(
        build_assets(load_catalog()),
        selection=selection,
        partition_key=partition,
        resources={
            "databento": (
                databento := DatabentoResource(
                    source="demo", data_dir=str(root), demo_activity=ACTIVITY
                )
            ),
            "io_manager": BarFileIOManager(databento=databento, format=fmt),
        },
        instance=DagsterInstance.ephemeral(),
        raise_on_error=False,
    )


def failure_text(result) -> str:
    texts = []
    for event in result.all_events:
        if event.is_step_failure:
            error = event.step_failure_data.error
            while error is not None:
                texts.append(error.message)
                error = error.cause
    return "\n".join(texts)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def aggregate_digests(root: Path, fmt: str = "parquet") -> dict[str, str]:
    store = BarStore.at(root, fmt)
    paths = [Path(store.aggregated_path("ES", JAN, parse_timeframe(x)).path) for x in LABELS]
    return {p.name: sha256(p) for p in paths}


def raw_file(root: Path, symbol: str = "ES", month: Month = JAN, fmt: str = "parquet") -> Path:
    return Path(BarStore.at(root, fmt).raw_path(symbol, month).path)


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory) -> dict[str, Path]:
    """Demo roots holding ES and NQ of January and ES of February, in both formats."""
    roots = {}
    for fmt in ("parquet", "csv"):
        root = tmp_path_factory.mktemp(f"demo-{fmt}")
        for partition in ("2024-01-01|ES", "2024-01-01|NQ", "2024-02-01|ES"):
            assert run(root, partition, fmt).success
        roots[fmt] = root
    return roots


@pytest.fixture
def es_root(demo_runs, tmp_path) -> Path:
    """A fresh copy of the parquet demo root (tests overwrite its ES raw file)."""
    root = tmp_path / "data"
    shutil.copytree(demo_runs["parquet"], root)
    return root


def assert_refused(result, root: Path, before: dict[str, str], *words: str, fmt="parquet"):
    assert not result.success
    text = failure_text(result)
    assert f"{raw_file(root, fmt=fmt)}" in text, text
    assert "no file was changed" in text, text
    for word in words:
        assert word in text, text
    assert aggregate_digests(root, fmt) == before  # nothing overwritten
    assert not result.get_asset_materialization_events()


def test_identity_is_in_the_footer_and_readable_by_pyarrow_and_duckdb(demo_runs):
    root = demo_runs["parquet"]
    raw = raw_file(root)
    pairs = {k.decode(): v.decode() for k, v in pq.read_metadata(raw).metadata.items()}
    # The proof that the blocking raw rules passed on exactly these bars (issue 12).
    bars = BarStore.at(root).read(BarStore.at(root).raw_path("ES", Month(2024, 1)))
    assert pairs.pop("dbento.raw_rules") == raw_rules_proof(bars, Month(2024, 1))
    assert pairs == {
        "dbento.symbol": "ES",
        "dbento.month": "2024-01",
        "dbento.window_start": "2024-01-01T00:00:00+00:00",
        "dbento.window_end": "2024-02-01T00:00:00+00:00",
        "dbento.origin": "synthetic",
        "dbento.timeframe": "1s",
        "dbento.dataset": "GLBX.MDP3",
        "dbento.request": "ES.v.0 (continuous)",  # what the symbol was asked for as
        "dbento.version": CODE_VERSION,
        "dbento.complete": "true",  # a closed month (issue 13: the current month says false)
        "dbento.through": "2024-02-01T00:00:00+00:00",
    }
    bars_15s = root / "aggregated" / "15s" / "ES_2024_01_15s.parquet"
    rows = duckdb.sql(
        f"SELECT decode(key), decode(value) FROM parquet_kv_metadata('{bars_15s}')"
    ).fetchall()
    found = dict(rows)
    assert found["dbento.timeframe"] == "15s" and found["dbento.symbol"] == "ES"
    assert found["dbento.origin"] == "synthetic" and found["dbento.month"] == "2024-01"
    assert found["dbento.request"] == "ES.v.0 (continuous)"
    # and the data still reads as plain bars with DuckDB
    count = duckdb.sql(f"SELECT count(*) FROM read_parquet('{raw}')").fetchall()[0][0]
    assert count == pq.read_metadata(raw).num_rows > 0


def test_csv_sidecar_matches_its_file(demo_runs):
    root = demo_runs["csv"]
    raw = raw_file(root, fmt="csv")
    note = pd.read_json(raw.with_name(raw.name + ".json"), typ="series")
    assert note["dbento.symbol"] == "ES" and note["dbento.origin"] == "synthetic"
    assert note["dbento.sha256"] == sha256(raw)
    assert int(note["dbento.size_bytes"]) == raw.stat().st_size
    bars, identity = BarStore.at(root, "csv").read_with_identity(
        BarStore.at(root, "csv").raw_path("ES", JAN)
    )
    # The proof of the raw rules holds for the bars read back from CSV too (issue 12).
    proof = raw_rules_proof(bars, JAN)
    assert identity == FileIdentity(
        "ES", JAN, "synthetic", "1s", "GLBX.MDP3", request="ES.v.0 (continuous)", raw_rules=proof
    )


def test_nq_raw_file_over_es_is_refused_in_one_sentence(es_root):
    before = aggregate_digests(es_root)
    shutil.copyfile(raw_file(es_root, "NQ"), raw_file(es_root))
    result = run(es_root, "2024-01-01|ES", selection=BARS)
    assert_refused(result, es_root, before, "holds NQ 1s bars of 2024-01", "not the ES 1s bars")


def test_another_months_raw_file_is_refused(es_root):
    before = aggregate_digests(es_root)
    shutil.copyfile(raw_file(es_root, "ES", FEB), raw_file(es_root))
    result = run(es_root, "2024-01-01|ES", selection=BARS)
    assert_refused(result, es_root, before, "holds ES 1s bars of 2024-02")


def test_a_raw_file_of_the_other_origin_is_refused(es_root, tmp_path):
    # The same month of ES, but written as real Databento data in another folder.
    before = aggregate_digests(es_root)
    store = BarStore.at(es_root)
    frame = store.read(store.raw_path("ES", JAN))
    real = BarStore.at(tmp_path / "real")
    real_path = real.raw_path("ES", JAN)
    real.write(frame, real_path, FileIdentity("ES", JAN, "databento", "1s", "GLBX.MDP3"))
    shutil.copyfile(real_path.path, raw_file(es_root))
    result = run(es_root, "2024-01-01|ES", selection=BARS)
    assert_refused(result, es_root, before, "real Databento market data", "SYNTHETIC")


def test_csv_mode_refuses_a_foreign_file_with_or_without_its_sidecar(demo_runs, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(demo_runs["csv"], root)
    before = aggregate_digests(root, "csv")
    es, nq = raw_file(root, fmt="csv"), raw_file(root, "NQ", fmt="csv")
    # The file alone: the ES sidecar left behind no longer matches it.
    shutil.copyfile(nq, es)
    result = run(root, "2024-01-01|ES", fmt="csv", selection=BARS)
    assert_refused(
        result, root, before, "no longer matches its identity note", "holds NQ bars", fmt="csv"
    )
    # The file with its sidecar: it says what it holds.
    shutil.copyfile(nq.with_name(nq.name + ".json"), es.with_name(es.name + ".json"))
    result = run(root, "2024-01-01|ES", fmt="csv", selection=BARS)
    assert_refused(result, root, before, "holds NQ 1s bars of 2024-01", fmt="csv")


def test_csv_mode_refuses_a_raw_file_whose_sidecar_is_lost(demo_runs, tmp_path):
    # The sidecar says whether the month is whole; without it, bars built from the file
    # would call a partial month complete.
    root = tmp_path / "data"
    shutil.copytree(demo_runs["csv"], root)
    before = aggregate_digests(root, "csv")
    es = raw_file(root, fmt="csv")
    es.with_name(es.name + ".json").unlink()
    result = run(root, "2024-01-01|ES", fmt="csv", selection=BARS)
    assert_refused(
        result, root, before, "carries no identity", "its .json note is missing", fmt="csv"
    )


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        ("garbage", "is not a readable parquet bar file"),
        ("columns", "holds the columns ts_event, price"),
    ],
)
def test_unreadable_or_other_columns_are_refused(es_root, damage, words):
    before = aggregate_digests(es_root)
    raw = raw_file(es_root)
    if damage == "garbage":
        raw.write_bytes(b"PAR1 this is not parquet at all")
    else:
        table = pa.table({"ts_event": pa.array([0], pa.timestamp("ns", tz="UTC")), "price": [1.0]})
        pq.write_table(table, raw)
    result = run(es_root, "2024-01-01|ES", selection=BARS)
    assert_refused(result, es_root, before, words)


def test_a_raw_file_without_identity_is_refused_until_raw_is_materialized_again(es_root):
    # Written without identity (by hand, another tool, an earlier version): whether it
    # holds the whole month is unknown, so no bars are built from it, even from its own ES
    # bars of January; foreign bars are named as what they hold.
    store = BarStore.at(es_root)
    es = store.read(store.raw_path("ES", JAN))
    nq = store.read(store.raw_path("NQ", JAN))
    before = aggregate_digests(es_root)
    store.write(es, store.raw_path("ES", JAN))
    assert pq.read_metadata(raw_file(es_root)).metadata is None
    result = run(es_root, "2024-01-01|ES", selection=BARS)
    assert_refused(result, es_root, before, "carries no identity", "whole of 2024-01-01|ES")
    assert "Materialize raw_1s_bars for 2024-01-01|ES again" in failure_text(result)
    store.write(nq, store.raw_path("ES", JAN))
    result = run(es_root, "2024-01-01|ES", selection=BARS)
    assert_refused(result, es_root, before, "holds NQ bars from 2024-01-", "and no identity")
    feb = store.read(store.raw_path("ES", FEB))
    store.write(feb, store.raw_path("ES", JAN))  # another month, told by its bars
    result = run(es_root, "2024-01-01|ES", selection=BARS)
    assert_refused(result, es_root, before, "holds ES bars from 2024-02-", "and no identity")
    # What the message says mends it.
    assert run(es_root, "2024-01-01|ES", selection=["raw_1s_bars", *BARS]).success
    assert store.identity_of(store.raw_path("ES", JAN)) is not None


def check_on_disk(root: Path, asset: str, fmt: str = "parquet"):
    """The checks of ``asset`` alone on ES January's file in ``root``."""
    return materialize(
        build_assets(load_catalog()),
        selection=AssetSelection.checks_for_assets(asset),
        # a run of checks alone, as the UI launches it (no partitions definition to infer)
        tags={"dagster/partition": "2024-01-01|ES"},
        resources={
            "databento": (databento := DatabentoResource(source="demo", data_dir=str(root))),
            "io_manager": BarFileIOManager(databento=databento, format=fmt),
        },
        instance=DagsterInstance.ephemeral(),
        raise_on_error=False,
    )


def test_checking_a_foreign_bars_file_on_disk_is_refused(es_root):
    # Only the checks of bars_15s selected: they run on the file on disk, which must be
    # ES's 15s bars of January, not NQ's copied over it.
    store = BarStore.at(es_root)
    tf = parse_timeframe("15s")
    es_15s = Path(store.aggregated_path("ES", JAN, tf).path)
    shutil.copyfile(store.aggregated_path("NQ", JAN, tf).path, es_15s)
    digest = sha256(es_15s)
    result = check_on_disk(es_root, "bars_15s")
    assert not result.success
    text = failure_text(result)
    assert f"The bars_15s file {es_15s} holds NQ 15s bars of 2024-01" in text, text
    assert sha256(es_15s) == digest


def test_checking_a_csv_bars_file_edited_after_it_was_written_fails_in_one_sentence(
    demo_runs, tmp_path
):
    root = tmp_path / "data"
    shutil.copytree(demo_runs["csv"], root)
    store = BarStore.at(str(root), "csv")
    es_1min = Path(store.aggregated_path("ES", JAN, parse_timeframe("1min")).path)
    lines = es_1min.read_text().splitlines()
    lines[1] = lines[1][: lines[1].rindex(",")] + ",999999"  # one volume changed
    es_1min.write_text("\n".join(lines) + "\n")
    result = check_on_disk(root, "bars_1min", "csv")
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    error = failure.step_failure_data.error
    assert error.cls_name == "Failure" and error.cause is None, error.to_string()
    assert f"The bars_1min file of 2024-01-01|ES was not checked: {es_1min}" in error.message
    assert "Materialize bars_1min for 2024-01-01|ES to rebuild it." in error.message


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_covered_windows_travel_in_the_identity_and_a_whole_month_writes_none(
    demo_runs, fmt, tmp_path
):
    store = BarStore.at(demo_runs[fmt], fmt)
    frame, whole = store.read_with_identity(store.raw_path("ES", JAN))
    assert whole.covered == () and whole.coverage == [(JAN.start_ns, JAN.end_ns)]
    assert "dbento.covered" not in whole.to_metadata()
    assert FileIdentity("ES", JAN, "synthetic", covered=[(JAN.start_ns, JAN.end_ns)]) == (
        FileIdentity("ES", JAN, "synthetic")
    )
    mid = pd.Timestamp("2024-01-10", tz="UTC").value
    elsewhere = BarStore.at(tmp_path, fmt)
    path = elsewhere.raw_path("ES", JAN)
    elsewhere.write(frame, path, FileIdentity("ES", JAN, "synthetic", covered=[(mid, JAN.end_ns)]))
    _, found = elsewhere.read_with_identity(path)
    assert found.coverage == [(mid, JAN.end_ns)]
    assert found.to_metadata()["dbento.covered"] == (
        '[{"start": "2024-01-10T00:00:00+00:00", "end": "2024-02-01T00:00:00+00:00"}]'
    )
