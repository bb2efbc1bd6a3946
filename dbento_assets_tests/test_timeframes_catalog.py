"""Timeframe parsing, month windows and catalog validation: the inputs users type."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from dbento_assets.core.catalog import CatalogError, load_catalog
from dbento_assets.core.months import Month, month_range
from dbento_assets.core.timeframes import TimeframeError, parse_timeframe, parse_timeframes


@pytest.mark.parametrize(
    ("text", "seconds", "label"),
    [
        ("15s", 15, "15s"),
        ("30s", 30, "30s"),
        ("1min", 60, "1min"),
        ("60s", 60, "1min"),
        ("45s", 45, "45s"),
        ("2min", 120, "2min"),
        ("90s", 90, "90s"),
        ("1h", 3600, "1h"),
        ("120min", 7200, "2h"),
        (" 5min ", 300, "5min"),
    ],
)
def test_parse_valid(text, seconds, label):
    tf = parse_timeframe(text)
    assert tf.seconds == seconds
    assert tf.label == label
    assert pd.Timedelta(tf.pandas_freq) == pd.Timedelta(seconds=seconds)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1s", "longer than 1s"),
        ("0min", "longer than 1s"),
        ("15S", "old pandas alias"),
        ("1T", "old pandas alias"),
        ("7s", "divide a day"),
        ("1.5min", "whole number"),
        ("15", "whole number"),
        ("3d", "unknown unit"),
        ("", "whole number"),
    ],
)
def test_parse_invalid(text, message):
    with pytest.raises(TimeframeError, match=message):
        parse_timeframe(text)


def test_duplicate_timeframes_refused():
    with pytest.raises(TimeframeError, match="listed twice"):
        parse_timeframes(["1min", "60s"])


def test_month_window_is_half_open_and_exact():
    jan = Month.parse("2024-01-01")
    assert jan.start == pd.Timestamp("2024-01-01T00:00:00Z")
    assert jan.end == pd.Timestamp("2024-02-01T00:00:00Z")
    assert Month(2024, 12).end == pd.Timestamp("2025-01-01T00:00:00Z")
    assert Month(2024, 1).previous() == Month(2023, 12)
    assert (jan.key, jan.tag, str(jan)) == ("2024-01-01", "2024_01", "2024-01")
    assert [str(m) for m in month_range(Month(2023, 11), Month(2024, 2))] == [
        "2023-11",
        "2023-12",
        "2024-01",
        "2024-02",
    ]
    with pytest.raises(ValueError, match="YYYY-MM"):
        Month.parse("Jan 2024")


def test_default_catalog_has_the_documented_instruments():
    cat = load_catalog()
    assert cat.symbols == ["ES", "NQ", "GC", "SPY", "QQQ"]
    es = cat.instrument("ES")
    assert (es.dataset, es.request_symbol, es.stype_in) == ("GLBX.MDP3", "ES.v.0", "continuous")
    spy = cat.instrument("SPY")
    assert (spy.dataset, spy.stype_in) == ("EQUS.MINI", "raw_symbol")
    assert [t.label for t in cat.timeframes] == ["15s", "30s", "1min"]
    with pytest.raises(CatalogError, match="not in the catalog"):
        cat.instrument("ZZ")


def _write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "catalog.toml"
    path.write_text(body)
    return path


GOOD_ES = (
    '[instruments.ES]\ndataset="GLBX.MDP3"\nsymbol="ES.v.0"\n'
    'stype_in="continuous"\ntick=0.25\nkind="future"\n'
)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('start_month="2024-13"\ntimeframes=["1min"]\n' + GOOD_ES, "start_month"),
        ('start_month="2024-01"\ntimeframes=["1T"]\n' + GOOD_ES, "timeframes"),
        ('start_month="2024-01"\ntimeframes=[]\n' + GOOD_ES, "timeframes is empty"),
        ('start_month="2024-01"\ntimeframes=["1min"]\n', "no \\[instruments"),
        (
            'start_month="2024-01"\ntimeframes=["1min"]\n' + GOOD_ES.replace("continuous", "cont"),
            "stype_in",
        ),
        (
            'start_month="2024-01"\ntimeframes=["1min"]\n' + GOOD_ES.replace("tick=0.25\n", ""),
            "missing tick",
        ),
        ('start_month="2024-01"\ntimeframes=["1min"\n', "not valid TOML"),
        (
            'start_month="2024-01"\ntimeframes=["1min"]\n' + GOOD_ES + 'calendar="ICE_EUROPE"\n',
            "calendar 'ICE_EUROPE' is not an exchange_calendars name",
        ),
        (
            'start_month="2024-01"\ntimeframes=["1min"]\n' + GOOD_ES + "calendar=3\n",
            "calendar must be a calendar name",
        ),
        # A typo must not do nothing silently, nor a value of the wrong type load.
        (
            'start_month="2024-01"\ntimeframes=["1min"]\n' + GOOD_ES + 'calender="none"\n',
            "unknown key\\(s\\) 'calender'; the keys are dataset, symbol, stype_in",
        ),
        ('start_month="2024-01"\ntimefrmes=["1min"]\n' + GOOD_ES, "unknown key\\(s\\) 'timefrmes'"),
        ('start_month="2024-01"\ntimeframes=15\n' + GOOD_ES, "timeframes must be a list"),
        ('start_month="2024-01"\ntimeframes="1min"\n' + GOOD_ES, "timeframes must be a list"),
        (
            'start_month="2024-01"\ntimeframes=["1min"]\n'
            + GOOD_ES.replace('symbol="ES.v.0"', 'symbol=["ES.v.0"]'),
            "symbol must be a text",
        ),
        (
            'start_month="2024-01"\ntimeframes=["1min"]\n' + GOOD_ES.replace('"GLBX.MDP3"', "5"),
            "dataset must be a text",
        ),
        (
            'start_month="2024-01"\ntimeframes=["1min"]\n' + GOOD_ES.replace("0.25", "inf"),
            "tick must be a positive number",
        ),
        (
            'start_month="2024-01"\ntimeframes=["1min"]\n' + GOOD_ES.replace("0.25", "true"),
            "tick must be a positive number",
        ),
        (
            'start_month="2024-01"\ntimeframes=["1min"]\n' + GOOD_ES + 'negative_prices="yes"\n',
            "negative_prices must be true or false",
        ),
    ],
)
def test_bad_catalog_is_reported_with_file_and_entry(tmp_path, body, message):
    path = _write(tmp_path, body)
    with pytest.raises(CatalogError, match=message) as info:
        load_catalog(path)
    assert str(path) in str(info.value)


def test_a_catalog_saved_with_a_byte_order_mark_loads(tmp_path):
    path = tmp_path / "catalog.toml"  # as Windows Notepad saves UTF-8
    path.write_bytes(
        b"\xef\xbb\xbf" + ('start_month="2024-01"\ntimeframes=["1min"]\n' + GOOD_ES).encode()
    )
    assert load_catalog(path).symbols == ["ES"]


def test_catalog_override_by_env(tmp_path, monkeypatch):
    path = _write(tmp_path, 'start_month="2023-06"\ntimeframes=["5min"]\n' + GOOD_ES)
    monkeypatch.setenv("DBENTO_CATALOG", str(path))
    cat = load_catalog()
    assert cat.path == path and cat.symbols == ["ES"] and cat.start_month == Month(2023, 6)


VENUES = """start_month = "2024-01"
timeframes = ["1min"]
[instruments.ES]
dataset = "GLBX.MDP3"
symbol = "ES.v.0"
stype_in = "continuous"
tick = 0.25
kind = "future"
[instruments.BRN]
dataset = "IFEU.IMPACT"
symbol = "BRN FMH0024!"
stype_in = "raw_symbol"
tick = 0.01
kind = "future"
[instruments.BRNL]
dataset = "IFEU.IMPACT"
symbol = "BRN FMH0024!"
stype_in = "raw_symbol"
tick = 0.01
kind = "future"
calendar = "XLON"
[instruments.TFM]
dataset = "NDEX.IMPACT"
symbol = "TFM FMH0024!"
stype_in = "raw_symbol"
tick = 0.005
kind = "future"
[instruments.KC]
dataset = "IFUS.IMPACT"
symbol = "KC FMH0024!"
stype_in = "raw_symbol"
tick = 0.05
kind = "future"
[instruments.FDAX]
dataset = "XEUR.EOBI"
symbol = "FDAX"
stype_in = "parent"
tick = 0.5
kind = "future"
[instruments.SPYX]
dataset = "XNAS.ITCH"
symbol = "SPY"
stype_in = "raw_symbol"
tick = 0.01
kind = "equity"
calendar = "none"
"""


def test_calendar_per_venue_from_the_catalog_or_the_dataset(tmp_path):
    from dbento_assets.core.catalog import calendar_for

    catalog = load_catalog(_write(tmp_path, VENUES))
    found = {symbol: calendar_for(catalog.instrument(symbol)) for symbol in catalog.symbols}
    assert found == {
        "ES": "CMES",  # CME Globex, as before
        "BRN": None,  # ICE Futures Europe: exchange_calendars has no calendar for it
        "BRNL": "XLON",  # ... unless the entry names one
        "TFM": None,  # ICE Endex: none fits
        "KC": "IEPA",  # ICE Futures US
        "FDAX": "XEUR",  # Eurex, not CME
        "SPYX": None,  # switched off by the entry
    }
    assert catalog.instrument("BRNL").calendar == "XLON"
