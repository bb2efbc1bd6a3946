"""Local DBN files as a source (``DBENTO_SOURCE=dbn``): data bought in Databento's portal.

:class:`DbnFilesSource` scans a folder for ``.dbn``/``.dbn.zst`` files, reads only their
headers to pick a partition's files (dataset, schema, time range, a symbology mapping for the
request symbol) and its instrument ids; a file mapping another symbol to one of those ids is
filtered by id and date before decoding. Its ohlcv-1m files serve the vendor cross-check; a
month in progress may be held in part and is then stored partial.
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dbento_assets.core.bars import empty_bars, sort_bars
from dbento_assets.core.catalog import Instrument
from dbento_assets.core.coverage import (
    VendorMonth,
    Window,
    dbn_coverage,
    defined_end,
    intersect_windows,
    merge_windows,
)
from dbento_assets.core.dbn import (
    DbnError,
    DbnPayload,
    decode_month,
    encode_ohlcv,
    read_metadata,
    read_records,
)
from dbento_assets.core.months import Month
from dbento_assets.core.source import FetchedMonth, FetchRequest, Logger, SourceError

SCHEMA = "ohlcv-1s"
VENDOR_SCHEMA = "ohlcv-1m"
SUFFIXES = (".dbn", ".dbn.zst")
_NS_PER_DAY = 86_400 * 1_000_000_000
_EPOCH = dt.date(1970, 1, 1)


@dataclass(frozen=True)
class DbnFileInfo:
    """What a DBN file's metadata header says (nothing from its records)."""

    path: Path
    dataset: str
    schema: str | None
    stype_in: str | None
    start_ns: int
    end_ns: int | None
    mappings: dict[str, list[tuple[dt.date, dt.date, str]]]

    def overlaps(self, month: Month) -> bool:
        return self.start_ns < month.end_ns and (
            self.end_ns is None or self.end_ns > month.start_ns
        )

    def describe(self, root: Path) -> str:
        end = "open" if self.end_ns is None else _day(self.end_ns).isoformat()
        symbols = ", ".join(sorted(self.mappings)) or "no symbology"
        return (
            f"{_relative(self.path, root)}: {self.dataset} {self.schema} stype_in "
            f"{self.stype_in} [{symbols}] {_day(self.start_ns).isoformat()}..{end}"
        )


@dataclass(frozen=True)
class _InstrumentSpan:
    """``[start_ns, end_ns)`` during which ``instrument_id`` is the partition's symbol."""

    instrument_id: int
    start_ns: int
    end_ns: int


@dataclass(frozen=True)
class _Chosen:
    """A file holding the partition's symbol: our intervals, and the ids other symbols of
    the file map in the month."""

    info: DbnFileInfo
    ours: list[_InstrumentSpan]
    others: set[int]


class DbnFilesSource:
    """A folder of DBN files as a :class:`~dbento_assets.core.source.MonthSource`."""

    name = "dbn"
    vendor_requested = False
    paid_usd = 0.0  # it buys nothing

    def cache_folder(self, symbol: str, month: Month) -> None:
        return None  # nothing is bought, so nothing is cached

    def __init__(self, dbn_dir: Path | str, now: pd.Timestamp | None = None) -> None:
        self.dbn_dir = Path(dbn_dir).expanduser()
        self.now = now  # None: the clock; tests move it to run a month's life
        self._scanned: dict[Path, tuple[tuple[int, int], DbnFileInfo]] = {}

    def __repr__(self) -> str:
        return f"DbnFilesSource(dbn_dir={str(self.dbn_dir)!r})"

    def scan(self) -> list[DbnFileInfo]:
        """Read the metadata header of every DBN file in the folder (cached by mtime/size)."""
        if not self.dbn_dir.is_dir():
            raise SourceError(
                f"DBENTO_DBN_DIR={str(self.dbn_dir)!r} is not a folder; point it at the folder "
                "holding your .dbn / .dbn.zst files (for example the unzipped batch download)"
            )
        files = sorted(
            p for p in self.dbn_dir.rglob("*") if p.is_file() and p.name.endswith(SUFFIXES)
        )
        if not files:
            raise SourceError(
                f"DBENTO_DBN_DIR={str(self.dbn_dir)!r} holds no .dbn or .dbn.zst files"
            )
        infos = []
        for path in files:
            stat = path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
            cached = self._scanned.get(path)
            if cached is None or cached[0] != stamp:
                cached = (stamp, _read_info(path))
                self._scanned[path] = cached
            infos.append(cached[1])
        return infos

    def fetch(self, request: FetchRequest, log: Logger) -> FetchedMonth:
        """The DBN payloads and instrument ids of one partition, from the folder's files."""
        inst, month = request.instrument, request.month
        infos = self.scan()
        chosen, skipped = self._choose(infos, inst, month, SCHEMA)
        if skipped:
            log(f"ignoring DBN files that are not {SCHEMA}: {', '.join(skipped)}")
        if not chosen:
            raise SourceError(self._nothing_matches(inst, month, infos))
        self._refuse_overlaps(chosen, inst, month)

        wanted = _wanted(chosen)
        payloads: list[DbnPayload] = []
        filtered: list[str] = []
        for choice in chosen:
            payload = _payload(choice, wanted, inst, SCHEMA)
            payloads.append(payload)
            if isinstance(payload, bytes):
                filtered.append(_relative(choice.info.path, self.dbn_dir))
        if filtered:
            log(
                "filtered by date-aware symbology (the file maps other symbols to the same "
                f"instrument ids): {', '.join(filtered)}"
            )
        names = [_relative(choice.info.path, self.dbn_dir) for choice in chosen]
        log(f"{inst.symbol} {month}: {len(names)} DBN file(s) from {self.dbn_dir}: {names}")
        covered = _covered_days(choice.info for choice in chosen)
        month_days = _month_days(month)
        days_in_month = sorted(covered & month_days)
        metadata: dict[str, Any] = {
            "source": self.name,
            "dbn_dir": str(self.dbn_dir),
            "dbn_files": names,
            "dbn_file_count": len(names),
            "dataset": inst.dataset,
            "request_symbol": inst.request_symbol,
            "stype_in": inst.stype_in,
            "schema": SCHEMA,
            "instrument_ids": sorted(wanted),
            "symbol_mappings": [
                f"{inst.request_symbol} -> {iv.instrument_id} "
                f"[{_day(iv.start_ns).isoformat()}, {_day(iv.end_ns).isoformat()})"
                for iv in _merge(iv for choice in chosen for iv in choice.ours)
            ],
            "date_filtered_files": filtered,
            "days_covered": len(days_in_month),
            "days_in_month": len(month_days),
            "coverage_complete": len(days_in_month) == len(month_days),
        }
        if days_in_month:
            metadata["first_day_covered"] = days_in_month[0].isoformat()
            metadata["last_day_covered"] = days_in_month[-1].isoformat()
        now = self.now if self.now is not None else pd.Timestamp.now(tz="UTC")
        through_ns = None
        if month.end > now:  # the month in progress: as far as the files reach
            reach = dbn_coverage(payloads, month, SCHEMA)
            if reach and reach[-1][1] < month.end_ns:
                through_ns = reach[-1][1]
                metadata["through"] = pd.Timestamp(through_ns, tz="UTC").isoformat()
        return FetchedMonth(
            payloads=payloads,
            instrument_ids=frozenset(wanted),
            metadata=metadata,
            through_ns=through_ns,
        )

    def vendor_bars(self, request: FetchRequest, log: Logger) -> VendorMonth | str:
        """The folder's ohlcv-1m of the partition (they cost nothing, so always compared)."""
        inst, month = request.instrument, request.month
        found = self.vendor_1m(inst, month)
        if found is None:
            return (
                f"no {VENDOR_SCHEMA} DBN file for {inst.symbol} ({inst.request_symbol}, "
                f"{inst.dataset}) in {month} in {self.dbn_dir}"
            )
        return found

    def vendor_1m(self, instrument: Instrument, month: Month) -> VendorMonth | None:
        """Databento's ohlcv-1m of the instrument-month from the folder, or None if no file.

        Files are chosen as :meth:`fetch` chooses its ohlcv-1s files, and filtered the same
        way, so a file mapping ``ES.v.0`` and ``ES.v.1`` never mixes contracts. Each file's
        coverage is clipped to the dates its symbology maps the request symbol.
        """
        chosen, _ = self._choose(self.scan(), instrument, month, VENDOR_SCHEMA)
        if not chosen:
            return None
        wanted = _wanted(chosen)
        frames, covered = [], []
        for choice in chosen:
            payload = _payload(choice, wanted, instrument, VENDOR_SCHEMA)
            decoded = decode_month(
                [payload], instrument.symbol, month, wanted, schema=VENDOR_SCHEMA
            )
            frames.append(decoded.bars)
            mapped: list[Window] = merge_windows((iv.start_ns, iv.end_ns) for iv in choice.ours)
            covered += intersect_windows(dbn_coverage([payload], month, VENDOR_SCHEMA), mapped)
        frames = [frame for frame in frames if len(frame)]
        bars = sort_bars(pd.concat(frames, ignore_index=True)) if frames else empty_bars()
        names = ", ".join(_relative(choice.info.path, self.dbn_dir) for choice in chosen)
        return VendorMonth(bars, merge_windows(covered), f"DBN files in {self.dbn_dir}: {names}")

    def _choose(
        self, infos: list[DbnFileInfo], inst: Instrument, month: Month, schema: str
    ) -> tuple[list[_Chosen], list[str]]:
        """The files of ``schema`` holding the partition's symbol in the month, and the
        files of the dataset and month skipped for their schema."""
        chosen: list[_Chosen] = []
        skipped: list[str] = []
        for info in infos:
            if info.dataset != inst.dataset or not info.overlaps(month):
                continue
            if info.schema != schema:
                skipped.append(f"{_relative(info.path, self.dbn_dir)} (schema {info.schema})")
                continue
            if info.stype_in is not None and info.stype_in != inst.stype_in:
                continue
            ours = _intervals(info.mappings.get(inst.request_symbol, []), month)
            if not ours:
                continue
            others = {
                iv.instrument_id
                for raw, ivs in info.mappings.items()
                if raw != inst.request_symbol
                for iv in _intervals(ivs, month)
            }
            chosen.append(_Chosen(info, ours, others))
        return chosen, skipped

    def _refuse_overlaps(self, chosen: list[_Chosen], inst: Instrument, month: Month) -> None:
        """Two files holding the same hours (a file next to its decompressed copy, a month's
        file next to its daily ones) would give every bar twice: refused naming them."""
        spans = sorted(
            (c.info for c in chosen if c.info.end_ns is not None), key=lambda i: i.start_ns
        )
        for before, after in itertools.pairwise(spans):
            if before.end_ns is not None and after.start_ns < before.end_ns:
                raise SourceError(
                    f"{_relative(before.path, self.dbn_dir)} and "
                    f"{_relative(after.path, self.dbn_dir)} in {self.dbn_dir} both hold "
                    f"{inst.request_symbol} from {_day(after.start_ns).isoformat()} (the same "
                    "data twice: a file and its decompressed copy, or a month's file and its "
                    f"daily files?): keep one of them there. Nothing of {inst.symbol} {month} "
                    "was stored."
                )

    def _nothing_matches(self, inst: Instrument, month: Month, infos: list[DbnFileInfo]) -> str:
        shown = [info.describe(self.dbn_dir) for info in infos[:12]]
        more = f"\n  ... and {len(infos) - 12} more" if len(infos) > 12 else ""
        return (
            f"no DBN file in {self.dbn_dir} holds {SCHEMA} data of {inst.symbol} (symbol "
            f"{inst.request_symbol!r}, stype_in {inst.stype_in!r}, dataset {inst.dataset!r}) "
            f"for {month}. The symbol must appear in a file's symbology mappings for a date "
            f"of the month. The folder holds:\n  " + "\n  ".join(shown) + more
        )


def _read_info(path: Path) -> DbnFileInfo:
    try:
        meta = read_metadata(path, schema=None)  # the header only, any schema
    except DbnError as exc:
        raise SourceError(f"cannot read the DBN file {path}: {exc}") from None
    mappings: dict[str, list[tuple[dt.date, dt.date, str]]] = {}
    for raw, intervals in (meta.mappings or {}).items():
        mappings[str(raw)] = [
            (_as_date(iv["start_date"]), _as_date(iv["end_date"]), str(iv["symbol"]))
            for iv in intervals
        ]
    schema = None if meta.schema is None else str(meta.schema)
    stype_in = None if meta.stype_in is None else str(meta.stype_in)
    end = meta.end
    return DbnFileInfo(
        path=path,
        dataset=str(meta.dataset),
        schema=schema,
        stype_in=stype_in,
        start_ns=int(meta.start),
        end_ns=None if end is None or int(end) >= 2**63 - 1 or int(end) <= 0 else int(end),
        mappings=mappings,
    )


def _intervals(mapped: list[tuple[dt.date, dt.date, str]], month: Month) -> list[_InstrumentSpan]:
    """Mapping intervals clipped to the month, with numeric instrument ids."""
    out = []
    for start, end, symbol in mapped:
        if not symbol.strip():
            continue  # a date range where the symbol resolved to nothing
        lo = max(_ns(start), month.start_ns)
        hi = min(_ns(end), month.end_ns)
        if lo >= hi:
            continue
        try:
            iid = int(symbol)
        except ValueError:
            raise SourceError(
                f"a DBN file maps to {symbol!r}, not an instrument id; request the data with "
                "stype_out=instrument_id"
            ) from None
        out.append(_InstrumentSpan(iid, lo, hi))
    return out


def _wanted(chosen: list[_Chosen]) -> set[int]:
    return {iv.instrument_id for choice in chosen for iv in choice.ours}


def _payload(choice: _Chosen, wanted: set[int], inst: Instrument, schema: str) -> DbnPayload:
    """The file itself, or its records of our intervals re-encoded when another symbol of
    the file maps one of the partition's instrument ids (an id filter would mix them)."""
    if choice.others & wanted:
        return _filtered_payload(choice.info, choice.ours, inst, schema)
    return choice.info.path


def _filtered_payload(
    info: DbnFileInfo, ours: list[_InstrumentSpan], inst: Instrument, schema: str
) -> bytes:
    """The file's records of ``ours`` (id and date interval) as DBN of ``schema``.

    The header keeps the original request's start and end, or, when the original was cut
    short by its ``limit``, ends at its last record as :func:`dbn_coverage` would read it:
    the filtered file never claims more coverage than the file it comes from.
    """
    try:
        records, meta = read_records(info.path, schema)
    except DbnError as exc:
        raise SourceError(str(exc)) from None
    end = defined_end(meta.end)
    if meta.limit and len(records) >= int(meta.limit) and len(records):
        last = int(records["ts_event"].max())
        end = last if end is None else min(end, last)
    ts = records["ts_event"].astype("int64")
    iid = records["instrument_id"]
    keep = np.zeros(len(records), dtype=bool)
    for iv in ours:
        keep |= (iid == iv.instrument_id) & (ts >= iv.start_ns) & (ts < iv.end_ns)
    return encode_ohlcv(
        records[keep],
        dataset=info.dataset,
        symbols=[inst.request_symbol],
        stype_in=inst.stype_in,
        start_ns=int(meta.start),
        end_ns=end,
        compress=False,
        schema=schema,
    )


def _merge(intervals: Iterable[_InstrumentSpan]) -> list[_InstrumentSpan]:
    """Join touching or overlapping intervals of the same instrument (day-split files)."""
    merged: list[_InstrumentSpan] = []
    for iv in sorted(intervals, key=lambda i: (i.start_ns, i.instrument_id)):
        same = [k for k, m in enumerate(merged) if m.instrument_id == iv.instrument_id]
        if same and merged[same[-1]].end_ns >= iv.start_ns:
            last = merged[same[-1]]
            merged[same[-1]] = _InstrumentSpan(
                iv.instrument_id, last.start_ns, max(last.end_ns, iv.end_ns)
            )
        else:
            merged.append(iv)
    return sorted(merged, key=lambda i: (i.start_ns, i.instrument_id))


def _covered_days(infos: Iterable[DbnFileInfo]) -> set[dt.date]:
    days: set[dt.date] = set()
    for info in infos:
        first = _day(info.start_ns)
        last_ns = info.end_ns if info.end_ns is not None else info.start_ns + _NS_PER_DAY
        count = max(1, -(-(last_ns - _ns(first)) // _NS_PER_DAY))
        days.update(first + dt.timedelta(days=k) for k in range(count))
    return days


def _month_days(month: Month) -> set[dt.date]:
    first = month.start.date()
    count = (month.end.date() - first).days
    return {first + dt.timedelta(days=k) for k in range(count)}


def _as_date(value: Any) -> dt.date:
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    return dt.date.fromisoformat(str(value)[:10])


def _ns(day: dt.date) -> int:
    return (day - _EPOCH).days * _NS_PER_DAY


def _day(ns: int) -> dt.date:
    return _EPOCH + dt.timedelta(days=ns // _NS_PER_DAY)


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)
