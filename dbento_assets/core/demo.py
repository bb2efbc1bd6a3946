"""The demo source: deterministic, realistic SYNTHETIC ohlcv-1s months written as real DBN.

Bars only in the venue's trading hours and sessions (``exchange_calendars``), none for a second
without a trade, prices in whole ticks, futures that roll. Every draw comes from a PCG64
stream seeded by SHA-256 of (symbol, month) and turned into numbers with integer arithmetic
and correctly rounded IEEE operations only, so a partition gives the same bytes on any
machine. ``DBENTO_DEMO_NOW`` moves the demo's "now" to run a month's life. Not market data.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import warnings
from dataclasses import dataclass
from functools import lru_cache
from zoneinfo import ZoneInfo

import exchange_calendars as xcals
import numpy as np
import pandas as pd

from dbento_assets.core.catalog import Instrument, calendar_for
from dbento_assets.core.dbn import PRICE_SCALE, encode_month, ohlcv_records
from dbento_assets.core.months import Month
from dbento_assets.core.source import FetchedMonth, FetchRequest, Logger, SourceError

CHICAGO = ZoneInfo("America/Chicago")
NEW_YORK = ZoneInfo("America/New_York")
GENERATOR_VERSION = "dbento-demo/v1"  # part of every seed: bump it to change all demo data
DEMO_NOTE = "SYNTHETIC demo data generated locally, not market data"

_NS = 1_000_000_000
_DAY = 86_400
_HOUR = 3_600
_U53 = float(2**53)  # uniform draws are 53-bit integers compared against p * 2**53
_UTC_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MONTH_CODES = "FGHJKMNQUVXZ"
_ANCHOR = Month(2024, 1)  # the month whose opening price is the symbol's nominal level

# symbol -> (price level at the anchor month, mean volume per bar in regular hours, outside).
_SYMBOLS: dict[str, tuple[float, int, int]] = {
    "ES": (4800.0, 40, 6),
    "NQ": (17000.0, 15, 3),
    "GC": (2050.0, 8, 2),
    "SPY": (480.0, 2500, 150),
    "QQQ": (410.0, 1500, 100),
}
_KIND_VOLUME: dict[str, tuple[int, int]] = {"future": (20, 4), "equity": (800, 60)}
_FALLBACK_LEVEL_TICKS = 20_000  # unknown symbol: price = 20,000 ticks (ES-like for 0.25)
# Futures listed on the even months (gold); every other future is quarterly (H/M/U/Z).
_BIMONTHLY = frozenset({"GC"})
_CARRY = {"GC": 0.05}  # annual carry that sets the calendar-spread jump at a roll
_DEFAULT_CARRY = 0.04

# Per-second probability of a trade by local wall-clock time: (from, to, p, regular hours).
_Profile = tuple[tuple[str, str, float, bool], ...]
_FUTURE_PROFILE: _Profile = (
    ("00:00", "02:00", 0.32, False),  # Asia
    ("02:00", "07:00", 0.52, False),  # Europe
    ("07:00", "08:30", 0.72, False),  # US pre-open
    ("08:30", "15:00", 0.96, True),  # regular trading hours (Chicago)
    ("15:00", "16:00", 0.55, False),
    ("16:00", "17:00", 0.00, False),  # daily maintenance halt
    ("17:00", "19:00", 0.40, False),  # Globex reopen
    ("19:00", "24:00", 0.32, False),
)
_EQUITY_PROFILE: _Profile = (
    ("00:00", "04:00", 0.00, False),
    ("04:00", "07:00", 0.15, False),  # pre-market
    ("07:00", "08:00", 0.30, False),
    ("08:00", "09:30", 0.45, False),
    ("09:30", "16:00", 0.97, True),  # regular session (New York)
    ("16:00", "17:00", 0.40, False),  # after-hours
    ("17:00", "20:00", 0.15, False),
    ("20:00", "24:00", 0.00, False),
)
# Trading pieces per local weekday (Monday = 0), as [from, to) seconds after local midnight.
_FUTURE_SESSIONS: dict[int, tuple[tuple[int, int], ...]] = {
    0: ((0, 16 * _HOUR), (17 * _HOUR, 24 * _HOUR)),
    1: ((0, 16 * _HOUR), (17 * _HOUR, 24 * _HOUR)),
    2: ((0, 16 * _HOUR), (17 * _HOUR, 24 * _HOUR)),
    3: ((0, 16 * _HOUR), (17 * _HOUR, 24 * _HOUR)),
    4: ((0, 16 * _HOUR),),  # Friday: close at 16:00 for the weekend
    5: (),  # Saturday: closed
    6: ((17 * _HOUR, 24 * _HOUR),),  # Sunday: open at 17:00
}
_EQUITY_SESSIONS: dict[int, tuple[tuple[int, int], ...]] = {
    d: ((4 * _HOUR, 20 * _HOUR),) if d < 5 else () for d in range(7)
}


@dataclass(frozen=True)
class DemoContract:
    """One instrument_id of a demo symbol and the part of the month in which it is active."""

    instrument_id: int
    raw_symbol: str  # e.g. ESH4; for equities the symbol itself
    start_ns: int  # inclusive, a UTC midnight or the month start
    end_ns: int  # exclusive

    @property
    def start_date(self) -> dt.date:
        return _date_of(self.start_ns)

    @property
    def end_date(self) -> dt.date:
        return _date_of(self.end_ns)


def demo_contract_schedule(instrument: Instrument, month: Month) -> list[DemoContract]:
    """The contracts active in ``month``, in order, with their UTC windows clipped to the month.

    Equities have one contract for the whole month. Futures roll at 00:00 UTC of the roll date
    (so the date-based symbology intervals are exact): ES/NQ-style quarterly contracts
    (H/M/U/Z) 8 calendar days before the third Friday of the contract month; metals (GC) over
    the even months (G/J/M/Q/V/Z), 3 weekdays before the last weekday of the month before.
    """
    _check_kind(instrument)
    if instrument.kind == "equity":
        iid = _stable_id(f"equity|{instrument.symbol}")
        return [DemoContract(iid, instrument.symbol, month.start_ns, month.end_ns)]
    expiries = _expiries(instrument.symbol, month.year - 1, month.year + 2)
    rolls = [_roll_ns(instrument.symbol, y, m) for y, m in expiries]
    out: list[DemoContract] = []
    previous_id = 0
    for k in range(1, len(expiries)):
        start, end = max(rolls[k - 1], month.start_ns), min(rolls[k], month.end_ns)
        if start >= end:
            continue
        y, m = expiries[k]
        iid = _contract_id(instrument.symbol, y, m, avoid=previous_id)
        raw = f"{instrument.symbol}{_MONTH_CODES[m - 1]}{y % 10}"
        out.append(DemoContract(iid, raw, start, end))
        previous_id = iid
    return out


def generate_month_records(
    instrument: Instrument, month: Month, activity: float = 1.0
) -> np.ndarray:
    """The synthetic ohlcv-1s records of ``instrument`` for ``month``, sorted by ts_event.

    ``activity`` multiplies the per-second probability of a trade (capped at 1); 1.0 gives
    roughly 1M bars for an ES month. The result is a structured array with the dtype of
    :data:`dbento_assets.core.dbn.OHLCV_RECORD_DTYPE`, identical for identical arguments.
    """
    _check_kind(instrument)
    if not (isinstance(activity, int | float) and math.isfinite(activity) and activity > 0):
        raise ValueError(f"activity must be a positive finite number, got {activity!r}")
    tick_fp = _tick_fixed_point(instrument.tick)
    profile_p, profile_rth = _profile_arrays(instrument.kind)

    # 1. Which seconds trade: every second of every trading piece, kept with probability p.
    # Without a calendar for the venue (calendar = "none", a dataset without one), the
    # demo still trades on its kind's usual days: CME's for futures, NYSE's for equities.
    calendar = calendar_for(instrument) or ("CMES" if instrument.kind == "future" else "XNYS")
    starts, lengths, tod0, day_index, n_days = _trading_pieces(instrument.kind, month, calendar)
    rng_days = _rng(instrument, month, "days")
    day_mult = 0.85 + 0.3 * _uniform(rng_days, n_days)  # busier and quieter days
    total = int(lengths.sum())
    piece = np.repeat(np.arange(len(lengths)), lengths)
    within = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    tod = (tod0[piece] + within) % _DAY
    p = np.minimum(profile_p[tod] * day_mult[day_index[piece]] * float(activity), 1.0)
    draws = _rng(instrument, month, "seconds").bit_generator.random_raw(total) >> np.uint64(11)
    keep = draws < (p * _U53).astype(np.uint64)
    ts = (starts[piece] + within)[keep]
    tod = tod[keep]
    rth = profile_rth[tod]
    n = len(ts)
    if n == 0:
        empty = np.empty(0, dtype=np.int64)
        return ohlcv_records(*(empty,) * 7, publisher_id=_publisher_id(instrument.dataset))

    # 2. Which contract each bar belongs to, and the calendar spread added at each roll.
    level = _month_open_ticks(instrument, month)
    schedule = demo_contract_schedule(instrument, month)
    bounds = np.array([c.start_ns // _NS for c in schedule[1:]], dtype=np.int64)
    contract = np.searchsorted(bounds, ts, side="right")
    ids = np.array([c.instrument_id for c in schedule], dtype=np.uint32)[contract]
    months_apart = 2 if instrument.symbol in _BIMONTHLY else 3
    carry = _CARRY.get(instrument.symbol, _DEFAULT_CARRY)
    jump = round(level * carry * months_apart / 12) if instrument.kind == "future" else 0
    spread = np.arange(len(schedule), dtype=np.int64)[contract] * jump

    # 3. Prices: a random walk in whole ticks, bridged to the next month's opening level.
    rng = _rng(instrument, month, "prices")
    sigma = max(level / 20_000, 0.3)  # ~1% a day spread over a day's bars
    step = np.empty(n, dtype=np.int64)
    wick_hi = np.empty(n, dtype=np.int64)
    wick_lo = np.empty(n, dtype=np.int64)
    for regular, scale in ((True, 1.0), (False, 0.7)):
        sel = rth == regular
        k = int(sel.sum())
        q_step = _double_geometric_q(sigma * scale)
        q_wick = _geometric_q(0.4 * sigma * scale)
        step[sel] = _geometric(rng, q_step, k) - _geometric(rng, q_step, k)
        wick_hi[sel] = _geometric(rng, q_wick, k)
        wick_lo[sel] = _geometric(rng, q_wick, k)
    gap = rng.bit_generator.random_raw(n) >> np.uint64(11)
    jitter = (gap >= np.uint64(0.9 * _U53)).astype(np.int64) - (gap < np.uint64(0.1 * _U53))
    walk = np.cumsum(jitter + step)
    target = _month_open_ticks(instrument, month.next()) - level - int(spread[-1])
    drift = (np.arange(1, n + 1, dtype=np.int64) * (target - int(walk[-1]))) // n
    close = level + walk + drift + spread
    open_ = close - step
    high = np.maximum(open_, close) + wick_hi
    low = np.minimum(open_, close) - wick_lo
    # A floor at one tick keeps prices positive; being monotone it keeps low <= o, c <= high.
    open_, high, low, close = (np.maximum(x, 1) for x in (open_, high, low, close))

    # 4. Volume: heavier in regular hours and on bars that moved the price.
    rng_vol = _rng(instrument, month, "volume")
    mean_rth, mean_out = _SYMBOLS.get(instrument.symbol, (0.0, *_KIND_VOLUME[instrument.kind]))[1:]
    volume = np.empty(n, dtype=np.int64)
    for regular, mean in ((True, mean_rth), (False, mean_out)):
        sel = rth == regular
        volume[sel] = 1 + _geometric(rng_vol, _geometric_q(mean - 1), int(sel.sum()))
    volume += np.abs(step) * max(mean_out // 2, 1)

    return ohlcv_records(
        ts * _NS,
        ids,
        open_ * tick_fp,
        high * tick_fp,
        low * tick_fp,
        close * tick_fp,
        volume.astype(np.uint64),
        publisher_id=_publisher_id(instrument.dataset),
    )


def symbology_mappings(
    instrument: Instrument, schedule: list[DemoContract]
) -> dict[str, list[dict[str, object]]]:
    """Databento-style mappings: request symbol -> [{start_date, end_date, symbol=id}]."""
    return {
        instrument.request_symbol: [
            {"start_date": c.start_date, "end_date": c.end_date, "symbol": str(c.instrument_id)}
            for c in schedule
        ]
    }


class DemoSource:
    """The ``demo`` :class:`~dbento_assets.core.source.MonthSource`: synthetic DBN, no account.

    ``activity`` scales how many seconds trade (1.0: ~1M bars for an ES month; the benchmark
    asks for more). The payload is uncompressed by default: zstd would shrink an ES month from
    57 MB to 11 MB but costs ~0.6 s per month to write and saves nothing on the read side.
    """

    name = "demo"
    vendor_requested = False
    paid_usd = 0.0  # it buys nothing

    def cache_folder(self, symbol: str, month: Month) -> None:
        return None  # nothing is bought, so nothing is cached

    def __init__(
        self, activity: float = 1.0, compress: bool = False, now: pd.Timestamp | None = None
    ) -> None:
        if not (isinstance(activity, int | float) and math.isfinite(activity) and activity > 0):
            raise SourceError(
                f"DBENTO_DEMO_ACTIVITY={activity!r}: the demo's activity must be a positive "
                "number (1 gives about a million bars for an ES month)"
            )
        self.activity = float(activity)
        self.compress = compress
        self.now = now

    def available_end(self) -> pd.Timestamp:
        """Where the demo's data ends (exclusive): "now" floored to the day, like a vendor
        whose last day is published once it is over."""
        now = self.now if self.now is not None else pd.Timestamp.now(tz="UTC")
        return now.tz_convert("UTC").floor("D") if now.tzinfo else now.tz_localize("UTC").floor("D")

    def vendor_bars(self, request: FetchRequest, log: Logger) -> str:
        return "the demo source is synthetic, there are no Databento bars to compare with"

    def fetch(self, request: FetchRequest, log: Logger) -> FetchedMonth:
        instrument, month = request.instrument, request.month
        available = self.available_end()
        if month.start >= available:
            raise SourceError(
                f"demo source: {instrument.symbol} {month} has no data yet (the demo's data "
                f"ends {available.isoformat()}, DBENTO_DEMO_NOW moves it)"
            )
        through_ns = int(available.value) if month.end > available else None
        try:
            records = generate_month_records(instrument, month, self.activity)
            schedule = demo_contract_schedule(instrument, month)
        except ValueError as exc:
            raise SourceError(
                f"demo source cannot generate {instrument.symbol} {month}: {exc}"
            ) from exc
        if through_ns is not None:  # the month so far, as a vendor would serve it
            records = records[records["ts_event"].astype("int64") < through_ns]
        payload = encode_month(
            records,
            instrument,
            month,
            mappings=symbology_mappings(instrument, schedule),
            compress=self.compress,
            end_ns=through_ns,
        )
        contracts = [
            {
                "instrument_id": c.instrument_id,
                "raw_symbol": c.raw_symbol,
                "start_date": c.start_date.isoformat(),
                "end_date": c.end_date.isoformat(),
            }
            for c in schedule
        ]
        log(
            f"demo: generated {len(records):,} SYNTHETIC ohlcv-1s bars for {instrument.symbol} "
            f"{month} ({', '.join(c.raw_symbol for c in schedule)})"
        )
        return FetchedMonth(
            payloads=[payload],
            instrument_ids=frozenset(c.instrument_id for c in schedule),
            metadata={
                "source": self.name,
                "synthetic": True,
                "note": DEMO_NOTE,
                "generator": GENERATOR_VERSION,
                "activity": self.activity,
                "records": len(records),
                "contracts": contracts,
            },
            through_ns=through_ns,
        )


# --- trading calendar -----------------------------------------------------------------------


def _trading_pieces(
    kind: str, month: Month, calendar: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Trading pieces clipped to the month and to the exchange's sessions: UTC start second,
    length, local time of day at the start, index of the local date (for the day's activity),
    and the number of local dates."""
    tz, sessions = (CHICAGO, _FUTURE_SESSIONS) if kind == "future" else (NEW_YORK, _EQUITY_SESSIONS)
    lo, hi = month.start_ns // _NS, month.end_ns // _NS
    first = dt.datetime.fromtimestamp(lo, tz).date() - dt.timedelta(days=1)
    last = dt.datetime.fromtimestamp(hi, tz).date()
    windows = _session_windows(calendar, first, last, tz, extended=kind != "future")
    starts, lengths, tod0, day_index = [], [], [], []
    n_days = (last - first).days + 1
    for d in range(n_days):
        day = first + dt.timedelta(days=d)
        midnight = dt.datetime.combine(day, dt.time(), tzinfo=tz)
        for a, b in sessions[day.weekday()]:
            s0 = _epoch_seconds(midnight + dt.timedelta(seconds=a))
            s1 = _epoch_seconds(midnight + dt.timedelta(seconds=b))
            for w0, w1 in windows:
                start, end = max(s0, lo, w0), min(s1, hi, w1)
                if start < end:
                    starts.append(start)
                    lengths.append(end - start)
                    tod0.append(a + (start - s0))
                    day_index.append(d)
    return (
        np.array(starts, dtype=np.int64),
        np.array(lengths, dtype=np.int64),
        np.array(tod0, dtype=np.int64),
        np.array(day_index, dtype=np.int64),
        n_days,
    )


@lru_cache(maxsize=16)
def _session_windows(
    calendar: str, first: dt.date, last: dt.date, tz: ZoneInfo, *, extended: bool
) -> tuple[tuple[int, int], ...]:
    """The calendar's sessions around ``[first, last]`` as UTC seconds ``[open, close)``.

    ``extended``: a session stands for its whole local date, up to its close when that is
    early (an equity calendar lists the regular hours only, the demo also trades around them).
    """
    with warnings.catch_warnings():
        # exchange_calendars reads Series.values, which pandas 3.1 flags as deprecated.
        warnings.simplefilter("ignore", pd.errors.Pandas4Warning)
        cal = xcals.get_calendar(
            calendar,
            start=pd.Timestamp(first - dt.timedelta(days=7)),
            end=pd.Timestamp(last + dt.timedelta(days=7)),
        )
    schedule = cal.schedule.loc[pd.Timestamp(first) : pd.Timestamp(last + dt.timedelta(days=1))]
    windows = []
    for label, row in schedule.iterrows():
        opens, closes = row["open"].to_pydatetime(), row["close"].to_pydatetime()
        if extended:
            midnight = dt.datetime.combine(label.date(), dt.time(), tzinfo=tz)
            regular_close = dt.datetime.combine(label.date(), dt.time(16), tzinfo=tz)
            opens = midnight
            closes = closes if closes < regular_close else midnight + dt.timedelta(days=1)
        windows.append((_epoch_seconds(opens), _epoch_seconds(closes)))
    return tuple(windows)


@lru_cache(maxsize=4)
def _profile_arrays(kind: str) -> tuple[np.ndarray, np.ndarray]:
    spec = _FUTURE_PROFILE if kind == "future" else _EQUITY_PROFILE
    p = np.zeros(_DAY, dtype=np.float64)
    rth = np.zeros(_DAY, dtype=bool)
    for start, end, prob, regular in spec:
        a, b = _clock(start), _clock(end)
        p[a:b] = prob
        rth[a:b] = regular
    p.flags.writeable = False
    rth.flags.writeable = False
    return p, rth


def _clock(text: str) -> int:
    hours, minutes = text.split(":")
    return int(hours) * _HOUR + int(minutes) * 60


def _epoch_seconds(moment: dt.datetime) -> int:
    return (moment - _UTC_EPOCH) // dt.timedelta(seconds=1)


def _date_of(ns: int) -> dt.date:
    return (_UTC_EPOCH + dt.timedelta(seconds=ns // _NS)).date()


# --- contracts and price levels ----------------------------------------------------------------


def _expiries(symbol: str, first_year: int, last_year: int) -> list[tuple[int, int]]:
    months = (2, 4, 6, 8, 10, 12) if symbol in _BIMONTHLY else (3, 6, 9, 12)
    return [(y, m) for y in range(first_year, last_year + 1) for m in months]


def _roll_ns(symbol: str, year: int, month: int) -> int:
    """00:00 UTC of the day the continuous contract leaves the contract expiring in the month."""
    if symbol in _BIMONTHLY:
        day = dt.date(year, month, 1) - dt.timedelta(days=1)  # end of the month before
        while day.weekday() >= 5:  # the last weekday of the month before
            day -= dt.timedelta(days=1)
        for _ in range(3):  # then three weekdays earlier
            day -= dt.timedelta(days=1)
            while day.weekday() >= 5:
                day -= dt.timedelta(days=1)
    else:
        first = dt.date(year, month, 1)
        third_friday = first + dt.timedelta(days=(4 - first.weekday()) % 7 + 14)
        day = third_friday - dt.timedelta(days=8)
    return _epoch_seconds(dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC)) * _NS


def _stable_id(text: str) -> int:
    digest = hashlib.sha256(f"{GENERATOR_VERSION}|instrument|{text}".encode()).digest()
    return 100_000 + int.from_bytes(digest[:8], "little") % 9_900_000


def _contract_id(symbol: str, year: int, month: int, avoid: int) -> int:
    iid = _stable_id(f"{symbol}|{year:04d}-{month:02d}")
    salt = 0
    while iid == avoid:  # two contracts in a row must never share an id
        salt += 1
        iid = _stable_id(f"{symbol}|{year:04d}-{month:02d}|{salt}")
    return iid


def _level_ticks(instrument: Instrument) -> int:
    known = _SYMBOLS.get(instrument.symbol)
    if known is None:
        return _FALLBACK_LEVEL_TICKS
    return max(round(known[0] / instrument.tick), 100)


def _month_open_ticks(instrument: Instrument, month: Month) -> int:
    """The price (in ticks) at the start of ``month``: a monthly random walk from the anchor.

    Each month's return comes from SHA-256 of (symbol, month) alone, so consecutive months
    join up: a month's walk ends where the next month's begins (before any roll jump).
    """
    level = float(_level_ticks(instrument))
    current = _ANCHOR
    while current < month:
        level *= 1.0 + _monthly_return(instrument.symbol, current)
        current = current.next()
    while current > month:
        current = current.previous()
        level /= 1.0 + _monthly_return(instrument.symbol, current)
    return max(round(level), 100)


def _monthly_return(symbol: str, month: Month) -> float:
    digest = hashlib.sha256(f"{GENERATOR_VERSION}|return|{symbol}|{month}".encode()).digest()
    uniforms = [
        (int.from_bytes(digest[8 * i : 8 * i + 8], "little") >> 11) / _U53 for i in range(4)
    ]
    return 0.08 * (sum(uniforms) - 2.0)  # Irwin-Hall: mean 0, sd ~4.6%, within +-16%


def _tick_fixed_point(tick: float) -> int:
    scaled = tick * PRICE_SCALE
    fixed = round(scaled)
    if fixed < 1 or abs(scaled - fixed) > 1e-6 * max(1.0, scaled):
        raise ValueError(f"tick {tick!r} is not a whole number of 1e-9 price units")
    return fixed


def _publisher_id(dataset: str) -> int:
    """The dataset's own consolidated publisher (GLBX.MDP3.GLBX = 1, EQUS.MINI.EQUS = 95)."""
    from databento import Publisher  # on first use, see DatabentoSource._client_

    venue = dataset.split(".")[0]
    for publisher in Publisher:
        if str(publisher.dataset) == dataset and str(publisher.venue) == venue:
            return int(publisher.to_int())
    return 0


def _check_kind(instrument: Instrument) -> None:
    if instrument.kind not in ("future", "equity"):
        raise ValueError(f"{instrument.symbol}: kind {instrument.kind!r} is not future or equity")


# --- platform-independent random numbers ------------------------------------------------------


def _rng(instrument: Instrument, month: Month, stream: str) -> np.random.Generator:
    text = f"{GENERATOR_VERSION}|{stream}|{instrument.symbol}|{month}"
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest(), "little")
    return np.random.Generator(np.random.PCG64(seed))


def _uniform(rng: np.random.Generator, n: int) -> np.ndarray:
    """Uniform [0, 1) doubles from the raw bit stream (exact: 53-bit integers times 2**-53)."""
    return (rng.bit_generator.random_raw(n) >> np.uint64(11)).astype(np.float64) / _U53


def _geometric_q(mean: float) -> float:
    """The ratio q of a geometric law on {0, 1, ...} with the given mean (q / (1 - q))."""
    mean = max(mean, 0.0)
    return mean / (1.0 + mean)


def _double_geometric_q(sd: float) -> float:
    """q such that the difference of two geometric(q) draws has standard deviation ``sd``."""
    v = sd * sd  # variance 2q / (1 - q)^2  ->  v q^2 - 2(v + 1) q + v = 0
    return ((v + 1.0) - math.sqrt(2.0 * v + 1.0)) / v


@lru_cache(maxsize=64)
def _geometric_table(q: float) -> np.ndarray:
    """53-bit thresholds of the geometric CDF 1 - q^(k+1), built by repeated multiplication."""
    thresholds: list[int] = []
    tail = q
    while tail * _U53 >= 1.0 and len(thresholds) < 2_000_000:
        thresholds.append(int((1.0 - tail) * _U53))
        tail *= q
    table = np.array(thresholds, dtype=np.uint64)
    table.flags.writeable = False
    return table


def _geometric(rng: np.random.Generator, q: float, n: int) -> np.ndarray:
    """``n`` geometric draws on {0, 1, ...} with ratio ``q`` by inverse CDF on 53-bit integers."""
    if q <= 0.0:
        return np.zeros(n, dtype=np.int64)
    draws = rng.bit_generator.random_raw(n) >> np.uint64(11)
    return np.searchsorted(_geometric_table(q), draws, side="right").astype(np.int64)
