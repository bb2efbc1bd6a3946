"""``python -m dbento_assets.estimate``: the price of a backfill before launching it.

The estimate talks to the fake gateway through the real client, with settings from the
environment exactly as the code location reads them. Tests check each line against the
gateway's own price, that months already in the DBN cache are skipped without a request, that
nothing is ever downloaded, and that unavailable or too expensive months are called out.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dbento_assets.cli import run as dbento
from dbento_assets.core.catalog import load_catalog
from dbento_assets.core.databento_api import DatabentoSource, RetryPolicy
from dbento_assets.core.demo import generate_month_records
from dbento_assets.core.months import Month
from dbento_assets.core.source import DownloadRefused, FetchRequest
from dbento_assets.estimate import format_size, run
from dbento_assets_tests.gateway import (
    GET_RANGE,
    RECORD_BYTES,
    TEST_KEY,
    FakeGateway,
)

CATALOG = load_catalog()
SETTINGS = (
    "DATABENTO_API_KEY",
    "DBENTO_SOURCE",
    "DBENTO_DATA_DIR",
    "DBENTO_DBN_DIR",
    "DBENTO_MAX_COST_USD",
    "DBENTO_TIMEOUT_SECONDS",
    "DBENTO_RETRY_ATTEMPTS",
    "DBENTO_CATALOG",
)


@pytest.fixture
def env(gateway, tmp_path, monkeypatch) -> Path:
    """A clean environment pointing at the gateway, run from an empty folder (no .env)."""
    for name in SETTINGS:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DATABENTO_API_KEY", TEST_KEY)
    data = tmp_path / "data"
    monkeypatch.setenv("DBENTO_DATA_DIR", str(data))
    return data


def price(gw: FakeGateway, symbol: str, month: Month) -> tuple[float, int]:
    n = len(generate_month_records(CATALOG.instrument(symbol), month, gw.activity))
    return n * RECORD_BYTES / 2**30 * gw.price_per_gb, n * RECORD_BYTES


def lines_of(text: str) -> dict[tuple[str, str], str]:
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and re.fullmatch(r"\d{4}-\d{2}", parts[1]):
            out[(parts[0], parts[1])] = line
    return out


def test_prints_a_line_per_partition_and_the_total_skipping_cached_months(gateway, env):
    cached = DatabentoSource(TEST_KEY, env, gateway=gateway.url, retry=RetryPolicy())
    cached.fetch(FetchRequest(CATALOG.instrument("ES"), Month(2024, 2)), lambda _: None)
    before = gateway.count()

    out = io.StringIO()
    assert run(["--symbols", "ES,QQQ", "--start", "2024-01", "--end", "2024-03"], out) == 0

    text = out.getvalue()
    rows = lines_of(text)
    assert sorted(rows) == [
        (s, m) for s in ("ES", "QQQ") for m in ("2024-01", "2024-02", "2024-03")
    ]
    assert (
        "skipped" in rows[("ES", "2024-02")]
        and "already in the DBN cache" in rows[("ES", "2024-02")]
    )
    total = 0.0
    size = 0
    for (symbol, month), line in rows.items():
        if (symbol, month) == ("ES", "2024-02"):
            continue
        cost, nbytes = price(gateway, symbol, Month.parse(month))
        assert f"{cost:,.4f}" in line
        assert format_size(nbytes) in line
        total += cost
        size += nbytes
    assert f"total: ${total:,.4f} for 5 partition(s) to download" in text
    assert format_size(size) in text.splitlines()[-1]
    assert "1 cached month(s) skipped" in text
    # Free calls only, none for the cached month, one dataset range per dataset.
    calls = gateway.requests[before:]
    assert not [c for c in calls if c.endpoint == GET_RANGE]
    assert sum(c.endpoint == "metadata.get_cost" for c in calls) == 5
    assert sum(c.endpoint == "metadata.get_dataset_range" for c in calls) == 2
    assert sorted(p.name for p in (env / "dbn").rglob("*.zst")) == ["ES_2024_02.ohlcv-1s.dbn.zst"]


def test_unavailable_months_and_the_ceiling_are_called_out(gateway, env, monkeypatch):
    gateway.set_range("GLBX.MDP3", "2010-06-06", "2024-03-10")
    monkeypatch.setenv("DBENTO_MAX_COST_USD", "0.000001")
    out = io.StringIO()
    assert run(["--symbols", "ES", "--start", "2024-01", "--end", "2024-04"], out) == 0
    text = out.getvalue()
    rows = lines_of(text)
    # Issue 13: the month in progress is priced up to the available end; a later one is not.
    assert "has not closed yet" in rows[("ES", "2024-03")]
    assert "not fully available" in rows[("ES", "2024-04")]
    assert "n/a" in rows[("ES", "2024-04")]
    assert "above the ceiling" in rows[("ES", "2024-01")]
    assert "1 not available" in text
    assert "3 partition(s) above the ceiling of $0.0000 (DBENTO_MAX_COST_USD)" in text
    assert gateway.count("metadata.get_cost") == 3


def test_defaults_to_every_catalog_symbol_for_one_month(gateway, env):
    out = io.StringIO()
    assert run(["--start", "2024-01"], out) == 0
    assert sorted(s for s, _ in lines_of(out.getvalue())) == sorted(CATALOG.symbols)


def test_without_a_key_it_says_what_to_do(gateway, env, monkeypatch, capsys):
    monkeypatch.delenv("DATABENTO_API_KEY")
    assert run(["--symbols", "ES", "--start", "2024-01"], io.StringIO()) == 2
    err = capsys.readouterr().err
    assert "DATABENTO_API_KEY" in err and "DBENTO_SOURCE=demo" in err
    assert gateway.count() == 0


def test_bad_arguments_are_reported(gateway, env, capsys):
    assert run(["--symbols", "XX", "--start", "2024-01"], io.StringIO()) == 2
    assert "'XX' is not in the catalog" in capsys.readouterr().err
    assert run(["--start", "2024-03", "--end", "2024-01"], io.StringIO()) == 2
    assert "before --start" in capsys.readouterr().err


def test_the_key_comes_from_a_dotenv_file(gateway, env, monkeypatch, tmp_path):
    monkeypatch.delenv("DATABENTO_API_KEY")
    (tmp_path / ".env").write_text(f"DATABENTO_API_KEY={TEST_KEY}\n")
    assert run(["--symbols", "ES", "--start", "2024-01"], io.StringIO()) == 0
    assert gateway.calls("metadata.get_cost")[0].auth_user == TEST_KEY


def test_the_settings_file_never_overrides_the_shell(gateway, env, monkeypatch, tmp_path):
    """dbento.env gives what the shell does not set; a variable set in the shell wins."""
    (tmp_path / "dbento.env").write_text(
        "DATABENTO_API_KEY=db-FROMTHEFILE\nDBENTO_MAX_COST_USD=0.000001\n"
    )
    out = io.StringIO()
    assert run(["--symbols", "ES", "--start", "2024-01"], out) == 0
    assert gateway.calls("metadata.get_cost")[0].auth_user == TEST_KEY  # the shell's key
    assert "above the ceiling of $0.0000 (DBENTO_MAX_COST_USD)" in out.getvalue()  # the file's


def test_a_demo_user_without_a_key_is_not_told_to_use_the_demo(gateway, env, monkeypatch, capsys):
    monkeypatch.delenv("DATABENTO_API_KEY")
    monkeypatch.setenv("DBENTO_SOURCE", "demo")
    assert run(["--symbols", "ES", "--start", "2024-01"], io.StringIO()) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the estimate prices downloads from Databento, and ")
    assert "DBENTO_SOURCE=demo downloads nothing and costs nothing" in err
    assert "use DBENTO_SOURCE=demo" not in err and len(err.splitlines()) == 1
    assert gateway.count() == 0


def test_runs_as_a_module(gateway, env, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "dbento_assets.estimate", "--symbols", "NQ", "--start", "2024-01"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=dict(os.environ),
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    cost, _ = price(gateway, "NQ", Month(2024, 1))
    assert f"{cost:,.4f}" in result.stdout
    assert "total:" in result.stdout
    assert TEST_KEY not in result.stdout + result.stderr


def test_vendor_check_adds_the_one_minute_bars_to_the_estimate(gateway, env, monkeypatch):
    monkeypatch.setenv("DBENTO_VENDOR_CHECK", "true")
    before = gateway.count()
    out = io.StringIO()
    assert run(["--symbols", "ES", "--start", "2024-01", "--end", "2024-02"], out) == 0
    text = out.getvalue()
    vendor_lines = [line for line in text.splitlines() if "ohlcv-1m for the vendor check" in line]
    assert len(vendor_lines) == 2
    assert "for 4 partition(s) to download" in text.splitlines()[-1] or "for 4 partition" in text
    calls = gateway.requests[before:]
    cost_schemas = sorted(
        c.fields.get("schema") for c in calls if c.endpoint == "metadata.get_cost"
    )
    assert cost_schemas == ["ohlcv-1m", "ohlcv-1m", "ohlcv-1s", "ohlcv-1s"]
    assert not [c for c in calls if c.endpoint == GET_RANGE]


def test_check_key_asks_databento_even_for_a_month_in_the_download_cache(gateway, env, monkeypatch):
    # check-key prices the catalog's first month: cached or not, only an answer proves a key.
    first = CATALOG.instrument(CATALOG.symbols[0])
    cached = DatabentoSource(TEST_KEY, env, gateway=gateway.url, retry=RetryPolicy())
    cached.fetch(FetchRequest(first, CATALOG.start_month), lambda _: None)
    before = gateway.count("metadata.get_cost")
    out = io.StringIO()
    assert dbento(["check-key"], out, io.StringIO()) == 0
    assert out.getvalue().startswith("The key works: Databento answered (ES 2024-01 would cost $")
    assert gateway.count("metadata.get_cost") == before + 1

    monkeypatch.setenv("DATABENTO_API_KEY", "db-" + "W" * 29)
    out, err = io.StringIO(), io.StringIO()
    assert dbento(["check-key"], out, err) != 0
    assert "The key works" not in out.getvalue()
    assert "rejected the API key" in err.getvalue(), err.getvalue()


def test_months_the_build_refuses_are_not_priced_as_downloads(gateway, env):
    # Before start_month: dbento build refuses them, so the estimate does too.
    err = io.StringIO()
    assert run(["--symbols", "ES", "--start", "2023-12"], io.StringIO(), err) == 2
    assert "--start 2023-12 is before the catalog's start_month 2024-01" in err.getvalue()
    # A month whose download was refused by its checks: only a forced run buys it.
    source = DatabentoSource(TEST_KEY, env, gateway=gateway.url, retry=RetryPolicy())

    def refuse(_fetched: object) -> None:
        raise DownloadRefused("refused for the test", rules=["ohlc_consistent"])

    with pytest.raises(DownloadRefused):
        source.fetch_accepted(FetchRequest(CATALOG.instrument("ES"), Month(2024, 1)), print, refuse)
    out = io.StringIO()  # --symbol, as dbento build spells it, works too
    assert run(["--symbol", "ES", "--start", "2024-01"], out) == 0
    assert (
        "refused before: bought only by a forced run (--force)"
        in lines_of(out.getvalue())[("ES", "2024-01")]
    )
