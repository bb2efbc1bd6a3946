"""Local DBN files as a source: data bought through Databento's batch portal, no API calls.

:class:`DbnFilesSource` (``DBENTO_SOURCE=dbn``, folder ``DBENTO_DBN_DIR``) scans a folder,
recursively, for ``.dbn`` and ``.dbn.zst`` files, split by day or month and holding one or
several symbols each, and reads only their metadata headers to choose the files of a
partition: same dataset, schema ohlcv-1s, a time range overlapping the month, and a symbology
mapping for the catalog's request symbol (``QQQ`` with stype raw_symbol, ``ES.v.0`` with stype
continuous, ...) on at least one of the month's dates. The instrument ids of the partition come
from those mappings (``raw_symbol -> instrument_id`` per date interval), so a continuous
future picks up every contract it rolled through in the month. When a file also maps another
symbol to one of those ids (``ES.v.0`` and ``ES.v.1`` in one file, where next month's contract
is ``ES.v.1`` before the roll and ``ES.v.0`` after it), an id filter alone would mix contracts,
so that file's records are filtered by id *and* date interval and handed over re-encoded as
DBN; every other file is handed over as a path. Decoding stays in :mod:`dbento_assets.core.dbn`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import databento
import numpy as np

from dbento_assets.core.catalog import Instrument
from dbento_assets.core.dbn import DbnError, DbnPayload, encode_ohlcv_1s, read_records
from dbento_assets.core.months import Month
from dbento_assets.core.source import FetchedMonth, FetchRequest, Logger, SourceError

SCHEMA = "ohlcv-1s"
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
class _Interval:
    """``[start_ns, end_ns)`` during which ``instrument_id`` is the partition's symbol."""

    instrument_id: int
    start_ns: int
    end_ns: int


class DbnFilesSource:
    """A folder of DBN files as a :class:`~dbento_assets.core.source.MonthSource`."""

    name = "dbn"

    def __init__(self, dbn_dir: Path | str) -> None:
        self.dbn_dir = Path(dbn_dir).expanduser()
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
        chosen: list[tuple[DbnFileInfo, list[_Interval], set[int]]] = []
        skipped: list[str] = []
        for info in infos:
            if info.dataset != inst.dataset or not info.overlaps(month):
                continue
            if info.schema != SCHEMA:
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
            chosen.append((info, ours, others))
        if skipped:
            log(f"ignoring DBN files that are not {SCHEMA}: {', '.join(skipped)}")
        if not chosen:
            raise SourceError(self._nothing_matches(inst, month, infos))

        wanted = {iv.instrument_id for _, ours, _ in chosen for iv in ours}
        payloads: list[DbnPayload] = []
        filtered: list[str] = []
        for info, ours, others in chosen:
            if others & wanted:
                payloads.append(_filtered_payload(info, ours, inst, month))
                filtered.append(_relative(info.path, self.dbn_dir))
            else:
                payloads.append(info.path)
        if filtered:
            log(
                "filtered by date-aware symbology (the file maps other symbols to the same "
                f"instrument ids): {', '.join(filtered)}"
            )
        names = [_relative(info.path, self.dbn_dir) for info, _, _ in chosen]
        log(f"{inst.symbol} {month}: {len(names)} DBN file(s) from {self.dbn_dir}: {names}")
        covered = _covered_days(info for info, _, _ in chosen)
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
                for iv in _merge(iv for _, ours, _ in chosen for iv in ours)
            ],
            "date_filtered_files": filtered,
            "days_covered": len(days_in_month),
            "days_in_month": len(month_days),
            "coverage_complete": len(days_in_month) == len(month_days),
        }
        if days_in_month:
            metadata["first_day_covered"] = days_in_month[0].isoformat()
            metadata["last_day_covered"] = days_in_month[-1].isoformat()
        return FetchedMonth(payloads=payloads, instrument_ids=frozenset(wanted), metadata=metadata)

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
        store = databento.DBNStore.from_file(path)
        meta = store.metadata
    except Exception as exc:  # the client raises several types for unreadable input
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


def _intervals(mapped: list[tuple[dt.date, dt.date, str]], month: Month) -> list[_Interval]:
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
        out.append(_Interval(iid, lo, hi))
    return out


def _filtered_payload(
    info: DbnFileInfo, ours: list[_Interval], inst: Instrument, month: Month
) -> bytes:
    try:
        records, _ = read_records(info.path)
    except DbnError as exc:
        raise SourceError(str(exc)) from None
    ts = records["ts_event"].astype("int64")
    iid = records["instrument_id"]
    keep = np.zeros(len(records), dtype=bool)
    for iv in ours:
        keep |= (iid == iv.instrument_id) & (ts >= iv.start_ns) & (ts < iv.end_ns)
    return encode_ohlcv_1s(
        records[keep],
        dataset=info.dataset,
        symbols=[inst.request_symbol],
        stype_in=inst.stype_in,
        start_ns=month.start_ns,
        end_ns=month.end_ns,
        compress=False,
    )


def _merge(intervals: Iterable[_Interval]) -> list[_Interval]:
    """Join touching or overlapping intervals of the same instrument (day-split files)."""
    merged: list[_Interval] = []
    for iv in sorted(intervals, key=lambda i: (i.start_ns, i.instrument_id)):
        same = [k for k, m in enumerate(merged) if m.instrument_id == iv.instrument_id]
        if same and merged[same[-1]].end_ns >= iv.start_ns:
            last = merged[same[-1]]
            merged[same[-1]] = _Interval(
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
