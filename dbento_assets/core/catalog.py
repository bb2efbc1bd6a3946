"""The instrument catalog: which symbols exist, how Databento knows them, which timeframes.

A TOML file users edit (``dbento_assets/catalog.toml``, or ``DBENTO_CATALOG``) maps a symbol
such as ``ES`` to its dataset, request symbol, ``stype_in`` and trading calendar, and holds
the timeframes and the first month. Loading validates everything up front, so a typo is
reported with the file and the entry rather than as a failed download later.
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from dbento_assets.core.months import Month
from dbento_assets.core.settings import read
from dbento_assets.core.timeframes import Timeframe, TimeframeError, parse_timeframes

DEFAULT_CATALOG = Path(__file__).resolve().parent.parent / "catalog.toml"
STYPES = ("continuous", "raw_symbol", "parent", "instrument_id")
KINDS = ("future", "equity")
_SYMBOL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
NO_CALENDAR = "none"  # `calendar = "none"` in the catalog: no trading-calendar check
_US_EQUITIES = "XNYS"  # US equity and equity-option venues follow the NYSE's days and hours
# Default calendar by Databento dataset (names as in databento's Dataset list), only where
# exchange_calendars models the venue. None for IFEU.IMPACT and IFLL.IMPACT (ICE Futures
# Europe: London hours and UK holidays, while exchange_calendars' "ICE" is ICE US),
# NDEX.IMPACT (ICE Endex), XOSE.ITCH (Osaka derivatives), OCEA.MEMOIR (overnight ATS) and
# the index feeds: their months get no calendar check, and the check says so.
DATASET_CALENDARS: dict[str, str] = {
    "GLBX.MDP3": "CMES",  # CME Globex
    "IFUS.IMPACT": "IEPA",  # ICE Futures US
    "XCBF.PITCH": "XCBF",  # Cboe Futures Exchange
    "XEUR.EOBI": "XEUR",  # Eurex
    "XEEE.EOBI": "XEEE",  # European Energy Exchange
    "XTKS.FLEX": "XTKS",  # Tokyo Stock Exchange
    **dict.fromkeys(
        (
            "ARCX.PILLAR",
            "BATS.PITCH",
            "BATY.PITCH",
            "DBEQ.BASIC",
            "EDGA.PITCH",
            "EDGX.PITCH",
            "EPRL.DOM",
            "EQUS.ALL",
            "EQUS.MINI",
            "EQUS.PLUS",
            "EQUS.SIP",
            "EQUS.SUMMARY",
            "FINN.NLS",
            "FINY.TRADES",
            "IEXG.TOPS",
            "MEMX.MEMOIR",
            "OPRA.PILLAR",
            "XASE.PILLAR",
            "XBOS.ITCH",
            "XCHI.PILLAR",
            "XCIS.BBO",
            "XCIS.PILLAR",
            "XCIS.TRADES",
            "XCIS.TRADESBBO",
            "XNAS.BASIC",
            "XNAS.ITCH",
            "XNAS.NLS",
            "XNAS.QBBO",
            "XNYS.BBO",
            "XNYS.PILLAR",
            "XNYS.TRADES",
            "XNYS.TRADESBBO",
            "XPSX.ITCH",
        ),
        _US_EQUITIES,
    ),
}


class CatalogError(ValueError):
    """The catalog file is missing, malformed, or names something impossible."""


@dataclass(frozen=True)
class Instrument:
    """One catalog entry: the user symbol and how to ask Databento for it."""

    symbol: str
    dataset: str
    request_symbol: str
    stype_in: str
    tick: float
    kind: str
    calendar: str | None = None  # as written in the catalog; None: the dataset's default
    # Prices at or below zero are real for it (crude oil in April 2020, spreads): the schema
    # rule then accepts them; otherwise such a price is taken for corrupt data and refused.
    negative_prices: bool = False

    @property
    def request(self) -> str:
        """What is asked of Databento, as files record it: ``ES.v.0 (continuous)``."""
        return f"{sent_symbol(self.request_symbol, self.stype_in)} ({self.stype_in})"


def sent_symbol(symbol: str, stype_in: str) -> str:
    """A request symbol as the databento client sends it, so two spellings of one request
    (``brk.b`` and ``BRK.B``; ``es.v.0`` and ``ES.v.0``) are known as one: stripped and upper
    case, except the roll rule of a ``ROOT.RULE.RANK`` smart symbol, which is lower case."""
    text = symbol.strip()
    if stype_in not in ("parent", "continuous"):
        return text.upper()
    tokens = text.upper().split(".")
    if len(tokens) == 3:
        tokens[1] = tokens[1].lower()
    return ".".join(tokens)


@dataclass(frozen=True)
class Catalog:
    """The whole catalog file, validated."""

    instruments: dict[str, Instrument]
    timeframes: list[Timeframe]
    start_month: Month
    path: Path

    @property
    def symbols(self) -> list[str]:
        return list(self.instruments)

    def instrument(self, symbol: str) -> Instrument:
        try:
            return self.instruments[symbol]
        except KeyError:
            raise CatalogError(
                f"symbol {symbol!r} is not in the catalog {self.path}; known symbols: "
                f"{', '.join(self.instruments)}"
            ) from None


def calendar_for(instrument: Instrument) -> str | None:
    """The exchange calendar of an instrument: its own, else its dataset's, else None."""
    name = instrument.calendar or DATASET_CALENDARS.get(instrument.dataset)
    return None if name is None or name.lower() == NO_CALENDAR else name


def no_calendar_reason(instrument: Instrument) -> str:
    """Why :func:`calendar_for` gives no calendar, in words for the check's description."""
    if instrument.calendar and instrument.calendar.lower() == NO_CALENDAR:
        return f'the catalog entry of {instrument.symbol} says calendar = "none"'
    return (
        f"no exchange calendar fits dataset {instrument.dataset}; set calendar = "
        f'"<exchange_calendars name>" in [instruments.{instrument.symbol}] to check sessions'
    )


class CatalogSettings(BaseModel):
    """Which catalog file is in force, read from ``DBENTO_CATALOG``."""

    catalog: str | None = Field(
        default=None, description="A catalog TOML file to use instead of the packaged one."
    )


def catalog_path() -> Path:
    """The catalog file in force: ``DBENTO_CATALOG`` if set, else the packaged default."""
    override = read(CatalogSettings, error=CatalogError).catalog
    return Path(override).expanduser() if override else DEFAULT_CATALOG


def load_catalog(path: Path | str | None = None) -> Catalog:
    """Read and validate a catalog file (default: :func:`catalog_path`)."""
    file = Path(path) if path is not None else catalog_path()
    try:
        # utf-8-sig: a file saved by Windows Notepad starts with a byte-order mark.
        raw = tomllib.loads(file.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise CatalogError(f"catalog file {file} does not exist (check DBENTO_CATALOG)") from None
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"catalog file {file} is not valid TOML: {exc}") from None
    return parse_catalog(raw, file)


_TOP_KEYS = ("start_month", "timeframes", "instruments")
_INSTRUMENT_KEYS = ("dataset", "symbol", "stype_in", "tick", "kind", "calendar", "negative_prices")


def _unknown(found: dict[str, Any], known: tuple[str, ...], where: str) -> None:
    """Refuse keys a catalog does not read: a mistyped one would silently do nothing."""
    extra = [key for key in found if key not in known]
    if extra:
        raise CatalogError(
            f"{where}: unknown key(s) {', '.join(map(repr, extra))}; the keys are "
            f"{', '.join(known)}"
        )


def parse_catalog(raw: dict[str, Any], file: Path) -> Catalog:
    """Validate the decoded TOML of a catalog file."""
    _unknown(raw, _TOP_KEYS, str(file))
    try:
        start = Month.parse(str(raw.get("start_month", "")))
    except ValueError as exc:
        raise CatalogError(f"{file}: start_month: {exc}") from None
    labels = raw.get("timeframes", [])
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise CatalogError(
            f'{file}: timeframes must be a list of labels such as ["15s", "1min"], got {labels!r}'
        )
    try:
        timeframes = parse_timeframes(labels)
    except TimeframeError as exc:
        raise CatalogError(f"{file}: timeframes: {exc}") from None
    if not timeframes:
        raise CatalogError(f"{file}: timeframes is empty; list at least one, e.g. ['1min']")
    entries = raw.get("instruments")
    if not isinstance(entries, dict) or not entries:
        raise CatalogError(f"{file}: no [instruments.<SYMBOL>] tables")
    instruments = {sym: _instrument(sym, spec, file) for sym, spec in entries.items()}
    return Catalog(instruments=instruments, timeframes=timeframes, start_month=start, path=file)


def _instrument(symbol: str, spec: Any, file: Path) -> Instrument:
    where = f"{file}: [instruments.{symbol}]"
    if not _SYMBOL.match(symbol) or "|" in symbol:
        raise CatalogError(f"{where}: symbol must be letters, digits, '.', '_' or '-'")
    if not isinstance(spec, dict):
        raise CatalogError(f"{where} must be a table")
    _unknown(spec, _INSTRUMENT_KEYS, where)
    missing = [k for k in ("dataset", "symbol", "stype_in", "tick", "kind") if k not in spec]
    if missing:
        raise CatalogError(f"{where} is missing {', '.join(missing)}")
    for key, example in (("dataset", "GLBX.MDP3"), ("symbol", "ES.v.0")):
        if not isinstance(spec[key], str) or not spec[key].strip():
            raise CatalogError(
                f'{where}: {key} must be a text such as "{example}", got {spec[key]!r}'
            )
    if spec["stype_in"] not in STYPES:
        raise CatalogError(f"{where}: stype_in {spec['stype_in']!r} is not one of {STYPES}")
    if spec["kind"] not in KINDS:
        raise CatalogError(f"{where}: kind {spec['kind']!r} is not one of {KINDS}")
    tick = spec["tick"]
    if isinstance(tick, bool) or not isinstance(tick, int | float) or not 0 < tick < math.inf:
        raise CatalogError(f"{where}: tick must be a positive number, got {tick!r}")
    calendar = spec.get("calendar")
    if calendar is not None:
        _check_calendar(calendar, where)
    negative = spec.get("negative_prices", False)
    if not isinstance(negative, bool):
        raise CatalogError(f"{where}: negative_prices must be true or false, got {negative!r}")
    return Instrument(
        symbol=symbol,
        dataset=str(spec["dataset"]),
        request_symbol=str(spec["symbol"]),
        stype_in=str(spec["stype_in"]),
        tick=float(tick),
        kind=str(spec["kind"]),
        calendar=None if calendar is None else str(calendar),
        negative_prices=negative,
    )


def _check_calendar(calendar: Any, where: str) -> None:
    """Refuse a ``calendar`` that exchange_calendars does not know (its names or aliases)."""
    import exchange_calendars  # here: loading the calendars library only when it is needed

    if not isinstance(calendar, str) or not calendar.strip():
        raise CatalogError(f"{where}: calendar must be a calendar name, got {calendar!r}")
    if calendar.lower() == NO_CALENDAR:
        return
    known = exchange_calendars.get_calendar_names(include_aliases=True)
    if calendar not in known:
        raise CatalogError(
            f"{where}: calendar {calendar!r} is not an exchange_calendars name; use one of "
            f'{", ".join(sorted(known))}, or "none" to skip the calendar check'
        )
