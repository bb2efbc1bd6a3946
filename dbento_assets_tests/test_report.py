"""The validation report read from a real Dagster instance: matrix, details and exit code.

One instance holds three materialized partitions: ES January (valid), ES February (a repeated
bar in the download: an ERROR check fails) and SPY January (a whole trading day missing: only
the calendar warning fails). The report must place each in its cell, detail both failures and
exit 1, or 0 when the ERROR failure is filtered out or fixed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from dagster import DagsterInstance

from dbento_assets import report
from dbento_assets.checks import all_check_keys
from dbento_assets.core.catalog import DEFAULT_CATALOG, load_catalog
from dbento_assets.resources import DatabentoResource
from dbento_assets_tests.test_checks_dagster import (
    ES_FEB,
    ES_JAN,
    CorruptingSource,
    Router,
    repeat_a_bar,
    run,
)

REPO = Path(__file__).resolve().parent.parent
SPY_JAN = "2024-01-01|SPY"
MISSING_DAY = "2024-01-16"  # a Tuesday: NYSE is open


def drop_a_trading_day(records: np.ndarray) -> np.ndarray:
    start = pd.Timestamp(MISSING_DAY, tz="UTC").value
    ts = records["ts_event"].astype("int64")
    return records[(ts < start) | (ts >= start + 86_400 * 1_000_000_000)]


@contextmanager
def corrupted(plan: dict[str, CorruptingSource]) -> Iterator[None]:
    real = DatabentoResource.month_source
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            DatabentoResource, "month_source", lambda self, c=None: Router(plan, real(self, c))
        )
        yield


@pytest.fixture(scope="module")
def instance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DagsterInstance]:
    """An instance that saw a passing, a failing and a warning partition."""
    root = tmp_path_factory.mktemp("report") / "data"
    plan = {ES_FEB: CorruptingSource(repeat_a_bar), SPY_JAN: CorruptingSource(drop_a_trading_day)}
    with DagsterInstance.ephemeral() as instance:
        with corrupted(plan):
            assert run(root, instance, ES_JAN).success
            assert not run(root, instance, ES_FEB).success
            assert run(root, instance, SPY_JAN).success  # a warning keeps the data
        yield instance


def write(instance: DagsterInstance, tmp_path: Path, *args: str) -> tuple[int, str]:
    out = tmp_path / "logs" / "validation_report.md"
    code = report.main([*args, "--out", str(out)], instance=instance)
    return code, out.read_text()


def test_matrix_details_and_exit_code_for_a_mix_of_partitions(
    instance: DagsterInstance, tmp_path: Path
) -> None:
    code, text = write(instance, tmp_path)
    assert code == report.EXIT_ERRORS
    lines = text.splitlines()
    header = lines.index("| month | ES | NQ | GC | SPY | QQQ |")
    assert lines[header + 1 : header + 4] == [
        "|---|---|---|---|---|---|",
        "| 2024-01 | pass | - | - | WARN (1) | - |",
        "| 2024-02 | FAIL (1) | - | - | - | - |",
    ]
    assert "3 partitions: 1 pass, 1 warn, 1 fail." in text
    failures = text[text.index("## Failures") : text.index("## Warnings")]
    assert failures.count("### ") == 1
    assert "### ES 2024-02: raw_1s_bars / timestamps_increasing (ERROR)" in failures
    assert "1 bar out of time order or repeating an earlier bar (1 repeated" in failures
    assert "- violations: 1" in failures and "First violating rows:" in failures
    assert "| row | ts_event |" in failures
    warnings = text[text.index("## Warnings") :]
    assert "### SPY 2024-01: raw_1s_bars / calendar_complete (WARN)" in warnings
    assert f"- missing_sessions: {MISSING_DAY}" in warnings


def test_a_timeframe_added_since_is_said_not_checked(
    instance: DagsterInstance, tmp_path: Path
) -> None:
    text = DEFAULT_CATALOG.read_text()
    added = tmp_path / "catalog.toml"
    added.write_text(text.replace('"1min"]', '"1min", "5min"]'))
    keys = all_check_keys(load_catalog(added))
    found = report.collect(instance, keys, ["ES", "SPY"])
    rendered = report.render(found, "test")
    assert "| 2024-01 | pass, bars_5min not checked | WARN (1), bars_5min not checked |" in (
        rendered
    )
    assert "| 2024-02 | FAIL (1) | - |" in rendered


def test_symbol_filter_decides_the_exit_code(instance: DagsterInstance, tmp_path: Path) -> None:
    code, text = write(instance, tmp_path, "--symbol", "SPY")
    assert code == report.EXIT_OK
    assert "| month | SPY |" in text and "| 2024-01 | WARN (1) |" in text
    assert "No ERROR check failed." in text and "2024-02" not in text
    code, text = write(instance, tmp_path, "--symbol", "ES")
    assert code == report.EXIT_ERRORS
    assert "| 2024-01 | pass |" in text and "| 2024-02 | FAIL (1) |" in text
    # spelled as dbento estimate and dbento build take symbols
    code, text = write(instance, tmp_path, "--symbols", "ES,SPY")
    assert code == report.EXIT_ERRORS and "| month | ES | SPY |" in text


def test_fixing_the_failed_partition_clears_the_exit_code(tmp_path: Path) -> None:
    root = tmp_path / "data"
    with DagsterInstance.ephemeral() as instance:
        with corrupted({ES_FEB: CorruptingSource(repeat_a_bar)}):
            assert not run(root, instance, ES_FEB).success
        code, text = write(instance, tmp_path, "--symbol", "ES")
        assert code == report.EXIT_ERRORS and "| 2024-02 | FAIL (1) |" in text
        assert run(root, instance, ES_FEB).success  # the download is good now
        code, text = write(instance, tmp_path, "--symbol", "ES")
    assert code == report.EXIT_OK
    assert "| 2024-02 | pass |" in text and "No ERROR check failed." in text


def test_bad_arguments_exit_2_and_without_dagster_home_it_reads_the_project_history(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "r.md"
    with DagsterInstance.ephemeral() as instance:
        assert report.main(["--symbol", "XX", "--out", str(out)], instance) == 2
    assert "XX not in the catalog" in capsys.readouterr().err
    assert not out.exists()
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    assert report.main(["--out", str(out)]) == report.EXIT_OK
    assert f"the Dagster instance in {tmp_path / '.dagster_home'}" in out.read_text()
    assert "r.md: 0 partitions checked" in capsys.readouterr().out
    # --out a folder: the report goes into it under its usual name, nothing else is left.
    folder = tmp_path / "reports"
    folder.mkdir()
    assert report.main(["--out", str(folder)]) == report.EXIT_OK
    assert [p.name for p in folder.iterdir()] == ["validation_report.md"]
    assert f"{folder / 'validation_report.md'}: 0 partitions" in capsys.readouterr().out


@pytest.mark.slow
def test_the_command_reads_dagster_home(tmp_path: Path) -> None:
    home = tmp_path / "dagster_home"
    home.mkdir()
    with (
        corrupted({ES_FEB: CorruptingSource(repeat_a_bar)}),
        DagsterInstance.local_temp(tempdir=str(home)) as instance,
    ):
        assert not run(tmp_path / "data", instance, ES_FEB).success
    env = {k: v for k, v in os.environ.items() if not k.startswith("DBENTO_")}
    env["DAGSTER_HOME"] = str(home)
    out = tmp_path / "logs" / "validation_report.md"
    done = subprocess.run(
        [sys.executable, "-m", "dbento_assets.report", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "1 partitions checked, 1 with failed ERROR checks, 0 with warnings only" in done.stdout
    assert "| 2024-02 | FAIL (1) | - | - | - | - |" in out.read_text()
