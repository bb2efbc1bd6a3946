"""DBN in and out: the one decoding path every source's ohlcv records take.

:func:`decode_month` turns DBN payloads into the sorted bar frame of
:mod:`dbento_assets.core.bars`, keeping the month window. :func:`read_metadata` reads a
header; :func:`verified_chunks` reads the records in one pass that also proves the payload
whole (:class:`TruncatedDbn`), as the client itself only warns. :func:`encode_ohlcv` writes
DBN for the demo source, filtered files and the test gateway.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol, TypeVar, cast

import databento_dbn
import numpy as np
import pandas as pd
import zstandard

from dbento_assets.core.bars import COLUMNS, DTYPES, PRICE_COLUMNS, empty_bars, make_bars, sort_bars
from dbento_assets.core.catalog import Instrument
from dbento_assets.core.months import Month

PRICE_SCALE = 1_000_000_000  # DBN prices are int64 in units of 1e-9
OHLCV_1S_RTYPE = int(databento_dbn.RType.OHLCV_1S)
OHLCV_RTYPES: dict[str, int] = {
    "ohlcv-1s": OHLCV_1S_RTYPE,
    "ohlcv-1m": int(databento_dbn.RType.OHLCV_1M),  # the vendor's own 1-minute bars
}
OHLCV_RECORD_DTYPE = np.dtype(
    [
        ("length", "u1"),
        ("rtype", "u1"),
        ("publisher_id", "<u2"),
        ("instrument_id", "<u4"),
        ("ts_event", "<u8"),
        ("open", "<i8"),
        ("high", "<i8"),
        ("low", "<i8"),
        ("close", "<i8"),
        ("volume", "<u8"),
    ]
)

DbnPayload = bytes | Path  # raw DBN bytes, or a .dbn / .dbn.zst file (a str path works too)


class Digest(Protocol):
    """A running hash (``hashlib.sha256()``) fed the bytes of a payload as they are read."""

    def update(self, data: bytes, /) -> None: ...


class DbnError(ValueError):
    """A DBN payload that is not ohlcv-1s, or cannot be read."""


@dataclass
class DecodedMonth:
    """The bars of one partition plus what the DBN metadata said about them."""

    bars: pd.DataFrame
    records_read: int
    datasets: set[str] = field(default_factory=set)


CHUNK_RECORDS = 65_536  # records decoded at a time (3.5 MiB), so a month is never held twice
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_DBN_MAGIC = b"DBN"
_READ_CHUNK = 1 << 16  # compressed bytes per read: bounds the decompressed chunk
_PLAIN_READ = 1 << 22  # bytes per read of uncompressed DBN (about one decoding chunk)
_RECORD_SIZE = OHLCV_RECORD_DTYPE.itemsize
_CHECK_CHUNK_RECORDS = 4_096  # records per chunk when a file is only checked, not decoded


class TruncatedDbn(DbnError):
    """A DBN file or stream that ends early (cut mid-frame, mid-header or mid-record)."""


def read_metadata(payload: DbnPayload, schema: str | None = "ohlcv-1s") -> databento_dbn.Metadata:
    """The metadata header of one DBN payload (bytes or a file path, zstd or not), its schema
    checked (``None``: any schema, to read the header of any DBN file).

    Only the header is read; :func:`verified_chunks` reads the records. It is decoded by
    ``databento_dbn`` as the client itself does, without importing the client: every process
    that loads the code location reads headers, and few of them download.
    """
    if schema is not None:
        _rtype(schema)
    try:
        with _opened(payload) as handle:
            compressed = _is_zstd(handle)
            reader = handle
            if compressed:
                stream = zstandard.ZstdDecompressor().stream_reader(handle, read_across_frames=True)
                reader = cast(BinaryIO, stream)
            prefix = _read_up_to(reader, 8)
            if not prefix and not compressed:  # (zstd with nothing in it is cut short)
                raise DbnError(f"cannot read DBN from {_describe(payload)}: it is empty")
            if prefix[:3] != _DBN_MAGIC[: len(prefix)]:
                raise DbnError(f"cannot read DBN from {_describe(payload)}: bad magic")
            length = int.from_bytes(prefix[4:8], "little")
            header = prefix + _read_up_to(reader, length)
            if len(prefix) < 8 or len(header) < 8 + length:
                raise TruncatedDbn(f"{_describe(payload)} ends inside the DBN metadata header")
    except (zstandard.ZstdError, OSError) as exc:  # a missing or unreadable file too
        raise DbnError(f"cannot read DBN from {_describe(payload)}: {exc}") from None
    try:
        metadata = databento_dbn.Metadata.decode(
            header, upgrade_policy=databento_dbn.VersionUpgradePolicy.AS_IS
        )
    except Exception as exc:  # databento_dbn raises its own error types for a bad header
        raise DbnError(f"cannot read DBN from {_describe(payload)}: {exc}") from exc
    found = metadata.schema
    if schema is not None and found is not None and str(found) != schema:
        raise DbnError(f"{_describe(payload)} holds schema {found}, expected {schema}")
    return metadata


def _opened(payload: DbnPayload) -> BinaryIO:
    return (
        io.BytesIO(payload)
        if isinstance(payload, bytes | bytearray | memoryview)
        else Path(payload).open("rb")
    )


def _is_zstd(handle: BinaryIO) -> bool:
    """Whether the payload is zstd (its first bytes), the handle left at its start."""
    compressed = handle.read(4) == _ZSTD_MAGIC
    handle.seek(0)
    return compressed


def _read_up_to(reader: BinaryIO, size: int) -> bytes:
    """``size`` bytes, or fewer where the stream ends first."""
    # By pieces: a foreign file's header can claim gigabytes, which must not be reserved.
    pieces: list[bytes] = []
    left = size
    while left > 0 and (more := reader.read(min(left, _READ_CHUNK))):
        pieces.append(more)
        left -= len(more)
    return b"".join(pieces)


def verified_chunks(
    payload: DbnPayload,
    schema: str = "ohlcv-1s",
    chunk_records: int | None = None,
    digest: Digest | None = None,
) -> Iterator[np.ndarray]:
    """The payload's records, at most ``chunk_records`` (default :data:`CHUNK_RECORDS`) at a
    time, read to the very end.

    One streaming pass (only one chunk of decoded records in memory) that checks every record
    is ``schema`` and raises :class:`TruncatedDbn` naming the payload when a zstd frame is left
    open (a file cut anywhere, even between two records), the metadata header is cut, or the
    last record is partial. A payload with no record yields nothing. ``digest`` is fed the
    payload's bytes as they are read (read to the end, it is the hash of the whole file).
    """
    rtype = _rtype(schema)
    chunk_bytes = (chunk_records or CHUNK_RECORDS) * _RECORD_SIZE
    pieces: list[bytes] = []
    held = 0
    for data in _body(payload, digest, chunk_bytes):
        pieces.append(data)
        held += len(data)
        if held < chunk_bytes:
            continue
        joined = b"".join(pieces)  # the one copy of these bytes
        whole = len(joined) - len(joined) % _RECORD_SIZE
        view = memoryview(joined)
        for lo in range(0, whole, chunk_bytes):
            yield _checked(view[lo : min(lo + chunk_bytes, whole)], rtype, payload, schema)
        pieces, held = [joined[whole:]], len(joined) - whole
    tail = b"".join(pieces)
    loose = len(tail) % _RECORD_SIZE
    if loose:
        raise TruncatedDbn(
            f"{_describe(payload)} ends with a partial record ({loose} loose bytes): the file "
            "is cut short"
        )
    if tail:
        yield _checked(tail, rtype, payload, schema)


def _checked(data: bytes | memoryview, rtype: int, payload: DbnPayload, schema: str) -> np.ndarray:
    """Whole records as a read-only view of ``data``, checked to be ``schema``."""
    records = np.frombuffer(data, dtype=OHLCV_RECORD_DTYPE)
    if np.any(records["rtype"] != rtype) or np.any(records["length"] != _RECORD_SIZE // 4):
        raise DbnError(f"{_describe(payload)} holds records that are not {schema}")
    return records


def _body(payload: DbnPayload, digest: Digest | None, ahead: int) -> Iterator[bytes]:
    """The decompressed bytes after the metadata header, checked to be there whole (see
    :func:`_decompressed` for ``ahead``)."""
    header = b""
    meta_left: int | None = None
    for data in _decompressed(payload, digest, ahead):
        if meta_left is None:
            header += data
            if len(header) < 8:
                continue
            if header[:3] != _DBN_MAGIC:
                raise DbnError(f"cannot read DBN from {_describe(payload)}: bad magic")
            meta_left = int.from_bytes(header[4:8], "little")
            data, header = header[8:], b""
        if meta_left:
            skip = min(meta_left, len(data))
            meta_left -= skip
            data = data[skip:]
        if data:
            yield data
    if meta_left is None or meta_left > 0:
        raise TruncatedDbn(f"{_describe(payload)} ends inside the DBN metadata header")


def _decompressed(payload: DbnPayload, digest: Digest | None, ahead: int) -> Iterator[bytes]:
    """The payload's bytes, decompressed when zstd: ``ahead`` bytes at a time decompressed
    in a worker thread while the caller uses the ones before (its chunk size: the worker
    then keeps the caller busy, and memory stays a few chunks)."""
    with _opened(payload) as handle:
        if not _is_zstd(handle):
            while chunk := handle.read(_PLAIN_READ):
                if digest is not None:
                    digest.update(chunk)
                yield chunk
            return
        # zstd releases the GIL: a worker thread decompresses the next few MiB while the
        # caller decodes the ones before (about a third off decoding a month).
        for pieces in _one_ahead(_zstd_pieces(handle, payload, digest, ahead)):
            yield from pieces


def _zstd_pieces(
    handle: BinaryIO, payload: DbnPayload, digest: Digest | None, ahead: int
) -> Iterator[list[bytes]]:
    """The decompressed bytes of a zstd stream (one frame or several), in groups of about
    ``ahead`` bytes; raises :class:`TruncatedDbn` after the last group when the
    stream ends inside a frame."""
    decoder = zstandard.ZstdDecompressor().decompressobj()
    open_frame = False
    group: list[bytes] = []
    held = 0
    while raw := handle.read(_READ_CHUNK):
        if digest is not None:
            digest.update(raw)
        while raw:
            open_frame = True
            try:
                out = decoder.decompress(raw)
            except zstandard.ZstdError as exc:
                if group:
                    yield group  # what was read before the damage, as a reader sees it
                raise DbnError(f"cannot read DBN from {_describe(payload)}: {exc}") from None
            if out:
                group.append(out)
                held += len(out)
            if decoder.eof:
                raw = decoder.unused_data
                decoder = zstandard.ZstdDecompressor().decompressobj()
                open_frame = False
            else:
                raw = b""
        if held >= ahead:
            yield group
            group, held = [], 0
    if group:
        yield group
    if open_frame:
        raise TruncatedDbn(f"{_describe(payload)} ends inside a zstd frame: the file is cut short")


_T = TypeVar("_T")
_END = object()


def _one_ahead(items: Iterator[_T]) -> Iterator[_T]:
    """``items`` in order, each next one computed by a worker thread while the caller uses
    the current one (an exception of ``items`` is raised where the item would come)."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dbento-zstd") as worker:
        coming = worker.submit(next, items, _END)
        while (item := coming.result()) is not _END:
            coming = worker.submit(next, items, _END)
            yield cast(_T, item)


def read_records(
    payload: DbnPayload, schema: str = "ohlcv-1s"
) -> tuple[np.ndarray, databento_dbn.Metadata]:
    """All records of one DBN payload of ``schema``, with its metadata (proved whole)."""
    metadata = read_metadata(payload, schema)
    chunks = list(verified_chunks(payload, schema))
    records = np.concatenate(chunks) if chunks else np.empty(0, dtype=OHLCV_RECORD_DTYPE)
    return records, metadata


def decode_month(
    payloads: Sequence[DbnPayload],
    symbol: str,
    month: Month,
    instrument_ids: Iterable[int] | None = None,
    schema: str = "ohlcv-1s",
) -> DecodedMonth:
    """Decode DBN payloads into the sorted raw bars of ``symbol`` inside ``month``.

    ``schema`` is ``ohlcv-1s`` for the pipeline; ``ohlcv-1m`` reads the vendor's own
    1-minute bars (same record layout) for the vendor cross-check.

    Records outside ``[month.start, month.end)`` are dropped (so nothing leaks in from a
    neighbouring month), and so are records of other instruments when ``instrument_ids`` is
    given. Prices become float64 by one exact division of the int64 fixed-point value.
    Records are decoded chunk by chunk straight into the output columns, which grow in
    place, so the peak memory is about one month of bars plus one chunk, never the records
    and the bars side by side nor the columns twice. A payload that is cut short raises
    :class:`TruncatedDbn` naming it: a partial file is never decoded into a month.
    """
    # One bar per second is the most one instrument can have in the window; more
    # instruments (a roll, a DBN file of several) grow the columns beyond it.
    columns = _GrowingColumns((month.end_ns - month.start_ns) // 1_000_000_000)
    datasets: set[str] = set()
    read = 0
    wanted = None if instrument_ids is None else np.fromiter(instrument_ids, dtype="uint32")
    for payload in payloads:
        datasets.add(str(read_metadata(payload, schema).dataset))
        for chunk in verified_chunks(payload, schema):
            read += len(chunk)
            ts = chunk["ts_event"]
            keep = (ts >= month.start_ns) & (ts < month.end_ns)
            if wanted is not None:
                keep &= np.isin(chunk["instrument_id"], wanted)
            columns.append(chunk if keep.all() else chunk[keep])
            del chunk
    if columns.rows == 0:
        return DecodedMonth(bars=empty_bars(), records_read=read, datasets=datasets)
    out = columns.finish()
    bars = make_bars(
        out["ts_event"],
        symbol,
        out["instrument_id"],
        out["open"],
        out["high"],
        out["low"],
        out["close"],
        out["volume"],
    )
    return DecodedMonth(bars=sort_bars(bars), records_read=read, datasets=datasets)


# The decoded columns: the bar columns but ``symbol``, timestamps as int64 nanoseconds.
_DECODED: dict[str, object] = {
    name: np.dtype("int64") if name == "ts_event" else DTYPES[name]
    for name in COLUMNS
    if name != "symbol"
}


class _GrowingColumns:
    """The bar columns of decoded records, filled chunk by chunk.

    Each column is one numpy array reserved at ``capacity`` rows up front. Reserved memory
    that is never written is address space only (the operating system gives a page to the
    process when it is first touched), so reserving a whole month of seconds costs only the
    rows decoded. The arrays double in place (``realloc``) if more rows come, and
    :meth:`finish` trims the unused tail the same way, so a month is never held as pieces
    plus their concatenation, nor copied to grow.
    """

    def __init__(self, capacity: int) -> None:
        self.rows = 0
        self._capacity = max(int(capacity), CHUNK_RECORDS)
        self._columns = {name: np.empty(self._capacity, dtype) for name, dtype in _DECODED.items()}

    def append(self, records: np.ndarray) -> None:
        n, end = len(records), self.rows + len(records)
        if end > self._capacity:
            self._resize(max(2 * self._capacity, end))
        for name, column in self._columns.items():
            target = column[self.rows : end]
            if name in PRICE_COLUMNS:
                np.divide(records[name], PRICE_SCALE, out=target)
            else:
                target[:] = records[name]
        self.rows += n

    def finish(self) -> dict[str, np.ndarray]:
        self._resize(self.rows)
        return self._columns

    def _resize(self, capacity: int) -> None:
        for column in self._columns.values():
            column.resize(capacity, refcheck=False)  # in place: no view of it exists
        self._capacity = capacity


def ohlcv_records(
    ts_ns: np.ndarray,
    instrument_id: np.ndarray,
    opens: np.ndarray,
    highs: np.ndarray,
    lows: np.ndarray,
    closes: np.ndarray,
    volume: np.ndarray,
    publisher_id: int | np.ndarray = 1,
    schema: str = "ohlcv-1s",
) -> np.ndarray:
    """Pack columns (prices already int64 fixed-point) into OHLCV DBN records of ``schema``."""
    out = np.zeros(len(ts_ns), dtype=OHLCV_RECORD_DTYPE)
    out["length"] = OHLCV_RECORD_DTYPE.itemsize // 4
    out["rtype"] = _rtype(schema)
    out["publisher_id"] = publisher_id
    out["instrument_id"] = instrument_id
    out["ts_event"] = ts_ns
    out["open"] = opens
    out["high"] = highs
    out["low"] = lows
    out["close"] = closes
    out["volume"] = volume
    return out


def encode_ohlcv(
    records: np.ndarray,
    *,
    dataset: str,
    symbols: Sequence[str],
    stype_in: str,
    start_ns: int,
    end_ns: int | None,
    mappings: dict[str, list[dict[str, object]]] | None = None,
    compress: bool = True,
    schema: str = "ohlcv-1s",
    limit: int | None = None,
) -> bytes:
    """Encode OHLCV records as a DBN v3 stream of ``schema`` (zstd unless told otherwise).

    The header names ``schema``; the records are written as given (their ``rtype`` is the
    caller's, see :func:`ohlcv_records`). ``end_ns`` None leaves the end undefined, ``limit``
    records a request's record limit. ``mappings`` uses the client's own spelling:
    ``{"ES.v.0": [{"start_date": date, "end_date": date, "symbol": "4916"}]}``.
    """
    _rtype(schema)
    metadata = databento_dbn.Metadata(
        dataset=dataset,
        schema=databento_dbn.Schema(schema),
        start=int(start_ns),
        stype_in=databento_dbn.SType(stype_in),
        stype_out=databento_dbn.SType.INSTRUMENT_ID,
        end=None if end_ns is None else int(end_ns),
        limit=None if not limit else int(limit),
        symbols=list(symbols),
        partial=[],
        not_found=[],
        mappings=_mapping_objects(mappings or {}),
    )
    raw = metadata.encode() + np.ascontiguousarray(records, dtype=OHLCV_RECORD_DTYPE).tobytes()
    return zstandard.ZstdCompressor(level=3).compress(raw) if compress else raw


def encode_month(
    records: np.ndarray,
    instrument: Instrument,
    month: Month,
    *,
    mappings: dict[str, list[dict[str, object]]] | None = None,
    compress: bool = True,
    end_ns: int | None = None,
) -> bytes:
    """One instrument-month of ohlcv-1s records as Databento would send it: the catalog
    entry's dataset, request symbol and ``stype_in``, and the month window in the header
    (up to ``end_ns`` when the month has not closed yet)."""
    return encode_ohlcv(
        records,
        dataset=instrument.dataset,
        symbols=[instrument.request_symbol],
        stype_in=instrument.stype_in,
        start_ns=month.start_ns,
        end_ns=month.end_ns if end_ns is None else end_ns,
        mappings=mappings,
        compress=compress,
    )


def _rtype(schema: str) -> int:
    try:
        return OHLCV_RTYPES[schema]
    except KeyError:
        raise DbnError(f"schema {schema!r} is not one of {', '.join(OHLCV_RTYPES)}") from None


@dataclass(frozen=True)
class _MappingInterval:
    """One interval of a symbol mapping, as databento_dbn reads it."""

    start_date: object
    end_date: object
    symbol: str


@dataclass(frozen=True)
class _Mapping:
    raw_symbol: str
    intervals: list[_MappingInterval]


def _mapping_objects(mappings: dict[str, list[dict[str, object]]]) -> list[_Mapping]:
    # databento_dbn reads mappings through attribute access (its SymbolMapping protocol).
    return [
        _Mapping(
            raw, [_MappingInterval(i["start_date"], i["end_date"], str(i["symbol"])) for i in ivs]
        )
        for raw, ivs in mappings.items()
    ]


def _describe(payload: DbnPayload) -> str:
    if isinstance(payload, bytes | bytearray | memoryview):
        return f"a {len(payload)}-byte DBN payload"
    return str(payload)


@dataclass(frozen=True)
class DbnFileCheck:
    """The result of reading a DBN file end to end."""

    records: int
    first_ts_ns: int | None
    last_ts_ns: int | None
    sha256: str
    """The SHA-256 of the file's bytes, hashed in the same pass (no second read for it)."""


def check_dbn_file(
    path: Path, start_ns: int, end_ns: int, schema: str = "ohlcv-1s"
) -> DbnFileCheck:
    """Read a DBN file (zstd or plain) in bounded memory and prove it whole.

    Raises :class:`TruncatedDbn` when a zstd frame is unfinished, the metadata header is
    cut, or the last record is partial, and :class:`DbnError` when the file holds anything but
    ``schema`` records inside ``[start_ns, end_ns)``.
    """
    count = 0
    first: int | None = None
    last: int | None = None
    digest = hashlib.sha256()
    # Small chunks: only counts and bounds are kept, so a download is checked in ~1 MB.
    for records in verified_chunks(path, schema, _CHECK_CHUNK_RECORDS, digest):
        ts = records["ts_event"]
        lo, hi = int(ts.min()), int(ts.max())
        if lo < start_ns or hi >= end_ns:
            raise DbnError(
                f"{path} holds records outside the requested window "
                f"[{pd.Timestamp(start_ns, tz='UTC')}, {pd.Timestamp(end_ns, tz='UTC')})"
            )
        first = lo if first is None else min(first, lo)
        last = hi if last is None else max(last, hi)
        count += len(records)
    return DbnFileCheck(
        records=count, first_ts_ns=first, last_ts_ns=last, sha256=digest.hexdigest()
    )
