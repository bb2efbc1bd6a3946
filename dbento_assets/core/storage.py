"""Bar files on disk or object storage: paths, atomic writes, Parquet/CSV, one origin per root.

A local write goes to a locked hidden temporary and is renamed over the target when complete;
an object-store write is one upload. Every bar file carries its :class:`FileIdentity` (Parquet
footer ``dbento.*`` keys, or a CSV sidecar with the file's size and SHA-256), and
:func:`identity_problem` says in one sentence why a file is not the one a partition expects.
A root holds one origin (``.dbento_origin``: demo or Databento), and hidden notes beside a raw
file (:meth:`BarStore.write_note`) tell the bars step about a refused download.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from importlib import metadata as package_metadata
from typing import Any, BinaryIO

try:  # POSIX: a temporary file is locked by its writer while written (see write_atomic)
    import fcntl
except ImportError:  # pragma: no cover - Windows: stale temps are then judged by age alone
    fcntl = None  # type: ignore[assignment]

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import xxhash
from upath import UPath

from dbento_assets.core import ahead
from dbento_assets.core.bars import COLUMNS, DTYPES
from dbento_assets.core.months import Month
from dbento_assets.core.timeframes import Timeframe

FORMATS = ("parquet", "csv")
ORIGIN_MARKER = ".dbento_origin"
SIDECAR_SUFFIX = ".json"  # the identity note of a CSV file: ES_2024_01.csv.json
PENDING_SUFFIX = SIDECAR_SUFFIX + ".pending"  # its next note, stored before the file
IDENTITY_PREFIX = "dbento."  # Parquet key-value metadata keys: dbento.symbol, ...
RAW_TIMEFRAME = "1s"
ORIGINS = ("synthetic", "databento")
# Notes kept beside a month's raw file (hidden, ``raw_1s/ES/.ES_2024_01.refused.json``), for
# the steps that build on it: they travel with the data root, whatever runs the steps.
REFUSED_NOTE = "refused"  # the month's latest download was refused by its checks
VENDOR_NOTE = "vendor_1m"  # a run's raw step could not get Databento's 1-minute bars
NOTES = (REFUSED_NOTE, VENDOR_NOTE)
Window = tuple[int, int]  # [start_ns, end_ns) in UTC nanoseconds, as in core.coverage
# A temporary file is removed by a later run only when no writer holds its lock and it is
# older than this (a writer locks its file right after creating it, so the margin only
# covers clocks of a shared file system that disagree a little).
STALE_TEMP_SECONDS = 60.0
LOCAL_PROTOCOLS = ("", "file", "local")
# Every column is required (not nullable): a bar has no missing values, and Parquet then
# stores no definition levels, which makes writing about a fifth faster.
ARROW_SCHEMA = pa.schema(
    [
        pa.field(name, kind, nullable=False)
        for name, kind in [
            ("ts_event", pa.timestamp("ns", tz="UTC")),
            ("symbol", pa.large_string()),  # pandas keeps strings as large_string: no cast
            ("instrument_id", pa.uint32()),
            ("open", pa.float64()),
            ("high", pa.float64()),
            ("low", pa.float64()),
            ("close", pa.float64()),
            ("volume", pa.uint64()),
        ]
    ]
)


class StorageError(RuntimeError):
    """A data root or bar file that cannot be used, with a message a user can act on."""


def share_system_allocator() -> None:
    """Make Arrow allocate through the system allocator, as a run starts.

    Arrow's default allocator (mimalloc) keeps its own reserve of pages beside glibc's, which
    holds the numpy and pandas memory the bars live in. The bar pipeline's Arrow buffers are
    short-lived (converting and encoding files), so sharing glibc's allocator lowers a
    month's peak memory by about 20 MB with no measurable cost in time. A pool chosen with
    Arrow's own ``ARROW_DEFAULT_MEMORY_POOL`` wins.

    glibc is also told to make no more memory arenas (unless ``MALLOC_ARENA_MAX`` or
    ``GLIBC_TUNABLES`` set its own limit): by default each thread that allocates gets an
    arena of its own, whose free memory the others cannot reuse, so a file encoded in a
    worker thread (see :meth:`BarStore.encode_ahead`) would leave its buffers' pages beside
    the main thread's. Threads started from here on share the arenas there are; this lowers a
    month's peak memory by about 5 MB (25 MB when the bars step reads the raw file back).
    glibc fixes its limit once a process has had more than 8 arenas, and then ignores this.
    """
    if not os.environ.get("ARROW_DEFAULT_MEMORY_POOL"):
        pa.set_memory_pool(pa.system_memory_pool())
    if "MALLOC_ARENA_MAX" not in os.environ and "arena_max" not in os.environ.get(
        "GLIBC_TUNABLES", ""
    ):
        _set_malloc_option(_M_ARENA_MAX, 1)


_M_ARENA_MAX = -8  # glibc's malloc.h


def _set_malloc_option(option: int, value: int) -> None:
    """glibc's ``mallopt`` (nothing where the C library has none: macOS, Windows)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):
        return
    mallopt(ctypes.c_int(option), ctypes.c_int(value))


def _code_version() -> str:
    try:
        return f"dbento_assets {package_metadata.version('dbento_assets')}"
    except package_metadata.PackageNotFoundError:  # run from a source tree, not installed
        return "dbento_assets (not installed)"


CODE_VERSION = _code_version()


@dataclass(frozen=True)
class FileIdentity:
    """What a bar file holds: one symbol's bars of one month, of one origin and timeframe."""

    symbol: str
    month: Month
    origin: str  # "synthetic" (demo) or "databento" (real market data)
    timeframe: str = RAW_TIMEFRAME  # "1s" for raw bars, else the aggregated label
    dataset: str = ""  # the Databento dataset ("" when the writer did not know it)
    # What was asked of the source for the symbol, e.g. ``ES.v.0 (continuous)`` (see
    # :attr:`~dbento_assets.core.catalog.Instrument.request`); "" in files of older code.
    request: str = ""
    version: str = CODE_VERSION  # the code that wrote the file
    # A month that has not closed yet is stored partial: its bars end before ``through``
    # (exclusive, ISO 8601 UTC). A complete month's ``through`` is "" (the month's end).
    complete: bool = True
    through: str = ""
    # The windows of the month the source's DBN data covers (a dataset starting mid-month, a
    # request cut short); () when it covers the whole month, as files of older code did.
    covered: tuple[Window, ...] = ()
    # A raw file's proof that the blocking raw rules passed on exactly its bars (see
    # :func:`~dbento_assets.core.run_rules.raw_rules_proof`); "" when none was recorded.
    raw_rules: str = ""
    # An aggregated file's: the fingerprint of the raw bars it was built from (see
    # :func:`~dbento_assets.core.run_rules.raw_content`); "" when not recorded. A raw month
    # rebuilt since with other bars leaves this file behind it.
    built_from: str = ""

    def __post_init__(self) -> None:
        windows = tuple((int(s), int(e)) for s, e in self.covered)
        if windows == ((self.month.start_ns, self.month.end_ns),):
            windows = ()
        object.__setattr__(self, "covered", windows)  # frozen: set once, normalized

    @property
    def coverage(self) -> list[Window]:
        """What the file's bars were decoded from covers (the whole month by default)."""
        return list(self.covered) or [(self.month.start_ns, self.month.end_ns)]

    @property
    def through_text(self) -> str:
        """The end of what the file covers (exclusive): ``through``, or the month's end."""
        return self.through or self.month.end.isoformat()

    def to_metadata(self) -> dict[str, str]:
        """The identity as ``dbento.*`` key-value pairs (Parquet footer, CSV sidecar)."""
        fields = {
            "symbol": self.symbol,
            "month": str(self.month),
            "window_start": self.month.start.isoformat(),
            "window_end": self.month.end.isoformat(),
            "origin": self.origin,
            "timeframe": self.timeframe,
            "dataset": self.dataset,
            "request": self.request,
            "version": self.version,
            "complete": "true" if self.complete else "false",
            "through": self.through_text,
        }
        if self.covered:
            fields["covered"] = json.dumps(windows_json(self.covered))
        if self.raw_rules:
            fields["raw_rules"] = self.raw_rules
        if self.built_from:
            fields["built_from"] = self.built_from
        return {IDENTITY_PREFIX + key: value for key, value in fields.items()}

    @classmethod
    def from_metadata(cls, pairs: Mapping[str, str]) -> FileIdentity | None:
        """The identity in ``pairs``; None when there is none (a file of older code).

        Raises :class:`ValueError` when the pairs are there but do not make an identity.
        """
        found = {
            key.removeprefix(IDENTITY_PREFIX): value
            for key, value in pairs.items()
            if key.startswith(IDENTITY_PREFIX)
        }
        if not found:
            return None
        missing = [k for k in ("symbol", "month", "origin", "timeframe") if not found.get(k)]
        if missing:
            raise ValueError(f"its identity lacks {', '.join(missing)}")
        complete = found.get("complete", "true").strip().lower() != "false"
        return cls(
            symbol=found["symbol"],
            month=Month.parse(found["month"]),
            origin=found["origin"],
            timeframe=found["timeframe"],
            dataset=found.get("dataset", ""),
            request=found.get("request", ""),
            version=found.get("version", ""),
            # Files written before partial months existed were always whole months.
            complete=complete,
            through="" if complete else found.get("through", ""),
            covered=windows_from_json(json.loads(found["covered"])) if "covered" in found else (),
            raw_rules=found.get("raw_rules", ""),
            built_from=found.get("built_from", ""),
        )

    def names_the_same_file(self, other: FileIdentity) -> bool:
        """Whether ``other`` names the same file: symbol, month, origin and timeframe (and
        dataset and request when both name them: a symbol asked for otherwise since, say
        ``ES.c.0`` for ``ES.v.0``, is another instrument's bars)."""
        return (
            other.symbol == self.symbol
            and other.month == self.month
            and other.origin == self.origin
            and other.timeframe == self.timeframe
            and (not other.dataset or not self.dataset or other.dataset == self.dataset)
            and (not other.request or not self.request or other.request == self.request)
        )

    def describe(self) -> str:
        """``ES 1s bars of 2024-01 (real Databento market data, GLBX.MDP3, ES.v.0
        (continuous))``."""
        where = "".join(f", {text}" for text in (self.dataset, self.request) if text)
        partial = "" if self.complete else f" up to {self.through_text} (partial)"
        return (
            f"{self.symbol} {self.timeframe} bars of {self.month}{partial} "
            f"({_origin_words(self.origin)}{where})"
        )


def fingerprint(frame: pd.DataFrame) -> str:
    """A 128-bit digest of a frame's content: column names, dtypes, row count and every value.

    Any edited value changes it. It hashes the columns' memory as it is (xxh3, about 10 ms
    for a 1.2M-bar month, no copy of a column): numbers and timestamps as their numpy
    buffers, Arrow-backed strings as their bytes and lengths (however they are chunked, so a
    file read back gives the same digest as the frame that was written). Two equal frames
    laid out otherwise may differ; a false difference only costs a re-check, never a false
    match.
    """
    digest = xxhash.xxh3_128()
    digest.update(f"{len(frame)}|{list(frame.columns)}|{list(map(str, frame.dtypes))}".encode())
    for name in frame.columns:
        column = frame[name]
        if isinstance(column.dtype, pd.DatetimeTZDtype):
            values: Any = column.array.asi8
        elif hasattr(column.array, "__arrow_array__"):
            _digest_arrow(digest, pa.array(column.array))
            continue
        else:
            values = column.to_numpy()
        if values.dtype == object:  # not a bar column's dtype: hashed value by value
            values = pd.util.hash_array(values)
        digest.update(np.ascontiguousarray(values).view(np.uint8))
    return digest.hexdigest()


def _digest_arrow(digest: Any, arrow: pa.Array | pa.ChunkedArray) -> None:
    """Feed an Arrow column to ``digest`` independently of its chunks: strings as their
    bytes, then their lengths, then where the nulls are; other types as their buffers."""
    chunks = arrow.chunks if isinstance(arrow, pa.ChunkedArray) else [arrow]
    if not (pa.types.is_string(arrow.type) or pa.types.is_large_string(arrow.type)):
        for buffer in pa.concat_arrays(chunks).buffers():  # not a bar column's type
            digest.update(b"" if buffer is None else memoryview(buffer))
        return
    wide = pa.types.is_large_string(arrow.type)
    offsets = [
        np.frombuffer(c.buffers()[1], np.int64 if wide else np.int32)[c.offset :][: len(c) + 1]
        for c in chunks
    ]
    for chunk, ends in zip(chunks, offsets, strict=True):
        if len(chunk):
            digest.update(memoryview(chunk.buffers()[2])[int(ends[0]) : int(ends[-1])])
    for ends in offsets:
        for lo in range(0, max(len(ends) - 1, 0), _DIGEST_BLOCK):  # lengths in small blocks
            digest.update(np.diff(ends[lo : lo + _DIGEST_BLOCK + 1]).astype(np.int64))
    digest.update(f"|nulls {arrow.null_count}|".encode())
    if arrow.null_count:
        digest.update(np.asarray(pc.is_valid(arrow)).view(np.uint8))


_DIGEST_BLOCK = 65_536


def windows_json(windows: Iterable[Window]) -> list[dict[str, str]]:
    """Windows as JSON-friendly ``{"start": iso, "end": iso}`` items (UTC)."""
    return [
        {
            "start": pd.Timestamp(s, tz="UTC").isoformat(),
            "end": pd.Timestamp(e, tz="UTC").isoformat(),
        }
        for s, e in windows
    ]


def windows_from_json(items: Sequence[Mapping[str, str]]) -> tuple[Window, ...]:
    """Windows written by :func:`windows_json` (a ValueError when they are not such)."""
    try:
        return tuple(
            (int(pd.Timestamp(item["start"]).value), int(pd.Timestamp(item["end"]).value))
            for item in items
        )
    except (KeyError, TypeError) as exc:
        raise ValueError(f"its covered windows are not readable ({exc})") from None


def data_root(location: str | os.PathLike[str]) -> UPath:
    """The data root as a UPath (a local folder, or an fsspec URL such as ``s3://b/p``)."""
    text = os.fspath(location).strip()
    if not text:
        raise StorageError("DBENTO_DATA_DIR is empty; set it to a folder such as ./data")
    root = UPath(text)
    if is_local(root):
        root = UPath(os.path.abspath(os.path.expanduser(text)))
    return root


def is_local(path: UPath) -> bool:
    return path.protocol in LOCAL_PROTOCOLS


@dataclass(frozen=True)
class BarStore:
    """Where and how one data root keeps bar files."""

    root: UPath
    fmt: str = "parquet"

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise StorageError(
                f"DBENTO_FORMAT={self.fmt!r} is not a bar file format: set it to "
                f"{' or '.join(FORMATS)}."
            )

    @classmethod
    def at(cls, location: str | os.PathLike[str], fmt: str = "parquet") -> BarStore:
        return cls(data_root(location), fmt.strip().lower())

    def raw_path(self, symbol: str, month: Month) -> UPath:
        return self.root / "raw_1s" / symbol / f"{symbol}_{month.tag}.{self.fmt}"

    def aggregated_path(self, symbol: str, month: Month, timeframe: Timeframe) -> UPath:
        name = f"{symbol}_{month.tag}_{timeframe.label}.{self.fmt}"
        return self.root / "aggregated" / timeframe.label / name

    def note_path(self, symbol: str, month: Month, kind: str) -> UPath:
        """The hidden note ``kind`` (one of :data:`NOTES`) beside a month's raw file; one for
        both formats, so changing the format does not lose it."""
        return self.root / "raw_1s" / symbol / f".{symbol}_{month.tag}.{kind}.json"

    def write_note(self, symbol: str, month: Month, kind: str, note: Mapping[str, Any]) -> None:
        """Write a note atomically (readers see the old note or the new one)."""
        path = self.note_path(symbol, month, kind)
        text = json.dumps(dict(note), indent=2, sort_keys=True) + "\n"
        with _remote_errors(path, "write"):
            write_atomic(path, lambda f: f.write(text.encode()))

    def read_note(self, symbol: str, month: Month, kind: str) -> dict[str, Any] | None:
        """A note written by :meth:`write_note`; None when there is none (or it is unreadable:
        a note is advice, and a broken one must not stop anything)."""
        path = self.note_path(symbol, month, kind)
        with _remote_errors(path, "read"):
            if not path.exists():
                return None
            try:
                note = json.loads(path.read_text())
            except (OSError, ValueError):
                return None
        return note if isinstance(note, dict) else None

    def clear_note(self, symbol: str, month: Month, kind: str) -> None:
        path = self.note_path(symbol, month, kind)
        with _remote_errors(path, "remove"), contextlib.suppress(FileNotFoundError):
            path.unlink()

    def partition_paths(
        self, symbol: str, month: Month, timeframes: Iterable[Timeframe]
    ) -> list[UPath]:
        """Every bar file of one partition: raw, then one per timeframe."""
        return [
            self.raw_path(symbol, month),
            *(self.aggregated_path(symbol, month, tf) for tf in timeframes),
        ]

    # -- origin -----------------------------------------------------------------------------

    def origin(self) -> str | None:
        """The origin recorded for this root, or None while it holds no bar file."""
        marker = self.root / ORIGIN_MARKER
        with _remote_errors(marker, "read"):
            return marker.read_text().strip() if marker.exists() else None

    def check_origin(self, origin: str, source_name: str) -> None:
        """Refuse if this root holds data of the other origin; write nothing."""
        _refuse_other_origin(self.root, self.origin(), origin, source_name)

    def claim(self, origin: str, source_name: str) -> None:
        """Record that this root holds ``origin`` data, or refuse if it holds the other kind.

        Called once a bar file has been written (see :meth:`write_claimed`), so that a run
        which wrote nothing never marks a folder.
        """
        found = self.origin()
        _refuse_other_origin(self.root, found, origin, source_name)
        if found is None:
            write_atomic(self.root / ORIGIN_MARKER, lambda f: f.write(f"{origin}\n".encode()))

    # -- settings ---------------------------------------------------------------------------

    def check_writable(self, paths: Iterable[UPath]) -> None:
        """Prove that the files in ``paths`` can be written, creating nothing that stays.

        Locally, a temporary file is created and removed in each file's folder, or in its
        nearest existing parent when the folder does not exist yet (folders are created
        only by real writes). On object storage one small probe object is stored and
        deleted at the root: that needs the bucket and write access, which is what a bar
        write needs.
        """
        if not is_local(self.root):
            probe = self.root / ".dbento_write_check"
            with _remote_errors(probe, "write"):
                probe.fs.pipe_file(probe.path, b"")
                probe.fs.rm_file(probe.path)
            return
        for folder in sorted({os.fspath(path.parent.path) for path in paths}):
            check_local_folder(
                folder,
                f"The data folder {self.root}",
                "set DBENTO_DATA_DIR to a folder you can write, or give this user write "
                "access to it",
            )

    def remove_stale_temps(self, paths: Iterable[UPath]) -> list[str]:
        """Remove temporary files that killed writes of ``paths`` left behind; return them.

        Only the temporary files of these files (and their sidecars) are looked at, and
        one is removed only when no writer holds its lock and it is older than
        :data:`STALE_TEMP_SECONDS`, so a write in progress is never touched.
        """
        removed: list[str] = []
        if not is_local(self.root):
            return removed  # object storage has no temporary files
        for path in paths:
            target = os.fspath(path.path)
            for name in (target, target + SIDECAR_SUFFIX, target + PENDING_SUFFIX):
                removed += remove_stale_temps_of(name)
        return removed

    def remove_all_stale_temps(self) -> list[str]:
        """:meth:`remove_stale_temps` for every file of this root that has one (a build's
        start: a partition already built is not written again, so it would never clear its
        own)."""
        if not is_local(self.root):
            return []
        targets = {
            os.path.join(folder, match.group(1))
            for folder, _, names in os.walk(os.fspath(self.root.path))
            for name in names
            if (match := _TEMP_NAME.match(name))
        }
        return [path for target in sorted(targets) for path in remove_stale_temps_of(target)]

    # -- bar files --------------------------------------------------------------------------

    def write(self, frame: pd.DataFrame, path: UPath, identity: FileIdentity | None = None) -> int:
        """Write ``frame`` atomically in this store's format; return the file size in bytes.

        ``identity`` goes into the Parquet footer, or (CSV) into the sidecar next to the
        file, stored as pending before the file is replaced and as the sidecar after it; a
        CSV written without one loses any old sidecar.
        """
        encoding = ahead.take(frame, _ENCODING) if self.fmt == "parquet" else None
        table = to_arrow(frame) if encoding is None else None
        pairs = identity.to_metadata() if identity is not None else {}
        if pairs and table is not None:
            table = table.replace_schema_metadata(pairs)
        hashed = _Hashing()  # the CSV's size and SHA-256, taken as it is written
        sidecar, pending = _sidecar(path), _pending(path)
        note_text = ""

        def note_first(written: str | None) -> None:
            # The new CSV's note is stored (pending) before the CSV replaces the old one: a
            # write killed between the two still leaves each file with its note.
            nonlocal note_text
            if pairs:
                note = {
                    **pairs,
                    "dbento.size_bytes": hashed.size,
                    "dbento.sha256": hashed.hexdigest(),
                }
                if written is not None:  # kept by the rename: an edit since changes it
                    note[_MTIME_KEY] = os.stat(written).st_mtime_ns
                note_text = json.dumps(note, indent=2, sort_keys=True) + "\n"
                write_atomic(pending, lambda f: f.write(note_text.encode()))

        try:
            if encoding is not None:
                encoded = _finish(encoding, pairs)
                write_atomic(path, lambda f: f.write(encoded))
            elif self.fmt == "parquet":
                write_atomic(path, lambda f: _write_parquet(table, f))
            else:
                write_atomic(path, lambda f: _write_csv(table, hashed.wrap(f)), note_first)
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            raise StorageError(
                f"{disk_full_text(exc, os.fspath(path.path))}. Nothing was written: any "
                "earlier file there is unchanged. Free some space, or point DBENTO_DATA_DIR "
                "at a larger disk, then materialize again; a month already downloaded is "
                "not bought again (it stays in the DBN cache)."
            ) from None
        # Hand the writer's working memory back to the operating system now rather than
        # hold it for the rest of the run (see share_system_allocator).
        pa.default_memory_pool().release_unused()
        size = path.stat().st_size
        if self.fmt == "csv":
            if pairs:
                write_atomic(sidecar, lambda f: f.write(note_text.encode()))
            for gone in (pending,) if pairs else (sidecar, pending):
                with _remote_errors(gone, "remove"), contextlib.suppress(FileNotFoundError):
                    gone.unlink()
        return size

    def encode_ahead(self, frame: pd.DataFrame) -> None:
        """Begin encoding ``frame`` for this store in the worker thread of :mod:`.ahead`, while
        the caller goes on with other work (the rules that decide whether it is stored at all).

        Arrow encodes Parquet without holding the GIL, so on a machine with two cores the
        encoding costs little wall time. :meth:`write` of this same frame finishes that
        encoding (adds the identity, closes it) instead of starting over; nothing reaches
        the disk before it. A frame changed in between (a column replaced, or a value set in
        place, which pandas then copies on write) is encoded again by :meth:`write`. A frame
        dropped unwritten lets its encoding go. CSV is written whole by :meth:`write`.
        """
        if self.fmt != "parquet":
            return
        try:
            ahead.begin(frame, _ENCODING, to_arrow, _encode_rows)
        except StorageError:
            return  # the write refuses it, saying why

    def write_claimed(
        self, frame: pd.DataFrame, path: UPath, identity: FileIdentity, source_name: str
    ) -> int:
        """Write a bar file into a root of ``identity.origin`` and mark the root with it.

        The origin is checked before the write and recorded after it: a root is marked by
        its first bar file, never by a run that failed before writing one.
        """
        self.check_origin(identity.origin, source_name)
        size = self.write(frame, path, identity)
        self.claim(identity.origin, source_name)
        return size

    def read(self, path: UPath) -> pd.DataFrame:
        """Read a bar file written by :meth:`write` (format from the store)."""
        return self.read_with_identity(path)[0]

    def identity_of(self, path: UPath) -> FileIdentity | None:
        """The identity a bar file carries, read from its Parquet footer or CSV note only
        (no bars read: for listings such as ``dbento status``); None when the file is
        missing, of older code, unreadable, or a CSV of another size than its note says."""
        try:
            if self.fmt == "parquet":
                with path.open("rb") as f:
                    raw = pq.read_metadata(f).metadata or {}
                pairs = {k.decode(): v.decode() for k, v in raw.items()}
            else:
                pairs = self._sized_note_pairs(path)
            return FileIdentity.from_metadata(pairs)
        except (OSError, ValueError, TypeError, AttributeError, pa.ArrowException, UnfitFile):
            return None

    @staticmethod
    def _sized_note_pairs(path: UPath) -> dict[str, str]:
        """The identity in the note written for this CSV as it is, the pending note first (a
        write may have ended between file and note); raises OSError without one.

        As it is: of the note's size and, locally, of its modification time (kept by the
        rename that stored it); when that time differs (an edit, even one keeping the size,
        or a copy), of the note's SHA-256. On object storage the size alone is compared, so
        as not to download every file to list it."""
        stat = path.stat()
        hashed: str | None = None
        for note in (_pending(path), _sidecar(path)):
            with contextlib.suppress(OSError, UnfitFile):
                pairs, written_size, digest = _parsed_note(note)
                if written_size != stat.st_size:
                    continue
                if not is_local(path) or pairs.get(_MTIME_KEY) == str(stat.st_mtime_ns):
                    return pairs
                hashed = hashed or _sha256_of(path)
                if hashed == digest:
                    return pairs
        raise FileNotFoundError(f"no note written for {path} as it is")

    def read_with_identity(self, path: UPath) -> tuple[pd.DataFrame, FileIdentity | None]:
        """A bar file and the identity it carries (None for a file of older code).

        Raises :class:`StorageError` naming the file when it is missing, unreadable, not
        bar columns, or (CSV) does not match its sidecar any more.
        """
        with _remote_errors(path, "read"):
            if not path.exists():
                raise StorageError(f"{path} does not exist; materialize its upstream asset first")
            text: dict[str, str] = {}
            hashed = _Hashing()  # CSV: to compare the file with its sidecar
            with path.open("rb") as f:
                try:
                    if self.fmt == "parquet":
                        pairs = pq.read_metadata(f).metadata or {}
                        f.seek(0)
                        table = pq.read_table(f)
                        text = {k.decode(): v.decode() for k, v in pairs.items()}
                    else:
                        source = hashed.wrap(f)
                        table = _read_csv(source)
                        source.read()  # the hash covers the whole file
                except (pa.ArrowException, OSError, UnicodeDecodeError) as exc:
                    raise UnfitFile(
                        f"{path} is not a readable {self.fmt} bar file "
                        f"({type(exc).__name__}: {_first_line(exc)})"
                    ) from exc
            note = self._sidecar_pairs(path, hashed) if self.fmt == "csv" else text
        try:
            frame = from_arrow(table)
        except (KeyError, pa.ArrowException) as exc:
            raise UnfitFile(
                f"{path} holds the columns {', '.join(table.column_names)} "
                f"({_first_line(exc)}), not the bar columns {', '.join(COLUMNS)}"
            ) from exc
        if note is None:
            raise UnfitFile(
                f"{path} was replaced after it was written (it no longer matches its "
                f"identity note {_sidecar(path).name}) and holds {describe_bars(frame)}"
            )
        try:
            identity = FileIdentity.from_metadata(note)
        except ValueError as exc:
            raise UnfitFile(f"{path} carries a broken identity: {exc}") from exc
        return frame, identity

    def _sidecar_pairs(self, path: UPath, read: _Hashing) -> dict[str, str] | None:
        """The identity of a CSV file from its sidecar ({} when it has none, None when the
        sidecar was written for another file)."""
        sidecar, pending = _sidecar(path), _pending(path)
        # A write that ended between storing the file and its note (or is finishing now).
        with contextlib.suppress(FileNotFoundError):
            found = _note_of(pending, read)
            if found is not None:
                return found
        if not sidecar.exists():
            return {}
        return _note_of(sidecar, read)


class UnfitFile(StorageError):
    """A bar file that exists but is not usable: unreadable, not bar columns, a broken
    identity, or a CSV that no longer matches its sidecar."""


def check_local_folder(folder: str | os.PathLike[str], what: str, fix: str) -> None:
    """Prove that files can be created in local ``folder`` without leaving anything behind.

    A temporary file is created and removed in the folder, or in its nearest existing
    parent while the folder does not exist yet (only real writes create folders). Raises
    :class:`StorageError` as ``"<what> is not writable (...): <fix>."``.
    """
    existing = os.path.abspath(os.fspath(folder))
    while not os.path.isdir(existing):
        parent = os.path.dirname(existing)
        # Asked again: another process (a build sharing the range) may just have made it.
        if parent == existing or (os.path.exists(existing) and not os.path.isdir(existing)):
            raise StorageError(f"{what} cannot be created: {existing} is not a folder; {fix}.")
        existing = parent
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".dbento_write_check"):
            pass
    except OSError as exc:
        # from None: the reason is in the sentence, and a build prints the innermost error.
        raise StorageError(
            f"{what} is not writable ({existing}: {exc.strerror or exc}): {fix}."
        ) from None


def _refuse_other_origin(root: UPath, found: str | None, origin: str, source_name: str) -> None:
    if found is not None and found != origin:
        raise StorageError(
            f"The data folder {root} holds {_origin_words(found)}, and "
            f"DBENTO_SOURCE={source_name} would add {_origin_words(origin)}. A data "
            "folder holds one kind only, so that synthetic bars can never be mistaken "
            "for market data. Set DBENTO_DATA_DIR to another folder (for example "
            f"./data-{source_name}) and run again."
        )


def _sidecar(path: UPath) -> UPath:
    return path.with_name(path.name + SIDECAR_SUFFIX)


def _pending(path: UPath) -> UPath:
    """The note of a CSV being written, stored before the CSV itself."""
    return path.with_name(path.name + PENDING_SUFFIX)


def _note_of(note_path: UPath, read: _Hashing) -> dict[str, str] | None:
    """The identity in a CSV's note, None when the note was written for other bytes than
    those ``read`` saw."""
    pairs, size, digest = _parsed_note(note_path)
    return pairs if read.size == size and read.hexdigest() == digest else None


_MTIME_KEY = "dbento.mtime_ns"  # a CSV note: the file's modification time once written


def _sha256_of(path: UPath) -> str:
    read = _Hashing()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            read.update(chunk)
    return read.hexdigest()


def _parsed_note(note_path: UPath) -> tuple[dict[str, str], int, str]:
    """A CSV note: its identity pairs, and the size and SHA-256 of the file it was written
    for. Raises :class:`UnfitFile` when it cannot be read as one (OSError when missing)."""
    try:
        note = json.loads(note_path.read_text())
        size, digest = int(note.pop("dbento.size_bytes")), str(note.pop("dbento.sha256"))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UnfitFile(f"{note_path} is not a readable identity note ({exc})") from exc
    return {str(k): str(v) for k, v in note.items()}, size, digest


class _Hashing:
    """The size and SHA-256 of the bytes that pass through the file objects it wraps."""

    def __init__(self) -> None:
        self.size = 0
        self._digest = hashlib.sha256()

    def hexdigest(self) -> str:
        return self._digest.hexdigest()

    def wrap(self, f: BinaryIO) -> BinaryIO:
        return _HashingFile(f, self)  # type: ignore[return-value]

    def update(self, data: bytes | memoryview) -> None:
        self.size += len(data)
        self._digest.update(data)


class _HashingFile(io.RawIOBase):
    """``f`` for a reader or writer (pyarrow's CSV ones) that hashes what passes."""

    def __init__(self, f: BinaryIO, hashing: _Hashing) -> None:
        super().__init__()
        self._f = f
        self._hashing = hashing

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        n = self._f.readinto(buffer)  # type: ignore[attr-defined]
        if n:
            self._hashing.update(memoryview(buffer)[:n])
        return n or 0

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self._f.write(data)
        self._hashing.update(data)
        return len(data)

    def flush(self) -> None:
        self._f.flush()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def identity_problem(
    expected: FileIdentity, found: FileIdentity | None, frame: pd.DataFrame
) -> str | None:
    """What a bar file holds when it is not ``expected`` (``"NQ 1s bars of 2024-01 (...)"``),
    or None when it is.

    A file with an identity must match it in symbol, month, origin and timeframe (and
    dataset and request when both name them), and its bars must be of that symbol. A file without an
    identity (written before identities existed) is judged by its bars alone: one symbol,
    the expected one, and bars in the month (its origin is that of the root it lies in).
    Bars outside the month in a file of this month are for the raw rules to report.
    """
    if found is not None and not expected.names_the_same_file(found):
        return found.describe()
    if frame.empty:
        return None
    symbols = pd.unique(frame["symbol"])
    ts = frame["ts_event"]
    ours = len(symbols) == 1 and symbols[0] == expected.symbol
    # Without an identity the month is told by the bars: a file none of whose bars lies in
    # the month is another month's. A few bars outside it are left to the raw rules
    # (inside_month), which say how many and where.
    if ours and (
        found is not None or ((ts >= expected.month.start) & (ts < expected.month.end)).any()
    ):
        return None
    return describe_bars(frame) + ("" if found is not None else " and no identity")


def describe_bars(frame: pd.DataFrame) -> str:
    """What a bar frame holds, from its bars: ``NQ bars from <first> to <last>``."""
    if frame.empty:
        return "no bars"
    symbols = ", ".join(sorted(str(x) for x in pd.unique(frame["symbol"])))
    first, last = frame["ts_event"].min(), frame["ts_event"].max()
    return f"{symbols} bars from {first.isoformat()} to {last.isoformat()}"


def write_atomic(
    path: UPath,
    write: Callable[[BinaryIO], object],
    before_replace: Callable[[str | None], object] | None = None,
) -> None:
    """Write a file so that readers see the old file or the complete new one, never a part.

    Locally: a temporary file in the same folder, fsync, then ``os.replace``; on failure the
    temporary file is removed and the old file is untouched. On object storage the whole
    file is serialized in memory and stored with one ``pipe_file`` call (one PUT, or for
    objects over 100 MB a multipart upload that is completed only after every part arrived),
    so a failure before or during the upload leaves the previous object as it was.
    ``before_replace`` runs once the new file is complete, before it takes the old one's
    place, given the complete file's temporary path (None on object storage).
    """
    if not is_local(path):
        buffer = io.BytesIO()
        write(buffer)
        if before_replace is not None:
            before_replace(None)
        with _remote_errors(path, "write"):
            path.fs.pipe_file(path.path, buffer.getvalue())
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    target = os.fspath(path.path)
    folder, name = os.path.split(target)
    tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            # Held until the file is closed (or the process dies): a later run removes only
            # temporary files that nobody holds, see remove_stale_temps_of.
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace(tmp)
        os.replace(tmp, target)
        fsync_dir(folder)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def is_disk_full(error: OSError) -> bool:
    return error.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full_text(error: OSError, path: str | os.PathLike[str]) -> str:
    """``No space left on the device holding PATH (reason), N MB are free there``."""
    where = os.fspath(error.filename or path)
    existing = where
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    free = ""
    with contextlib.suppress(OSError):
        free = f", {shutil.disk_usage(existing).free / 1e6:,.1f} MB are free there"
    return f"No space left on the device holding {where} ({error.strerror}){free}"


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Make a rename in ``folder`` durable (a no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_TEMP_NAME = re.compile(r"^\.(.+)\.[0-9a-f]{32}\.tmp$")  # write_atomic's, of the file named


def remove_stale_temps_of(target: str) -> list[str]:
    """Remove the temporary files :func:`write_atomic` left next to local file ``target``
    when its writer was killed; return their paths.

    One is removed only when it is older than :data:`STALE_TEMP_SECONDS` and no process
    holds its lock (a writer holds it from creating the file to renaming it, and the
    operating system drops it when the writer dies), so a write in progress is never hit.
    """
    folder, name = os.path.split(target)
    pattern = re.compile(rf"^\.{re.escape(name)}\.[0-9a-f]{{32}}\.tmp$")
    try:
        candidates = [entry for entry in os.scandir(folder) if pattern.match(entry.name)]
    except FileNotFoundError:
        return []
    removed: list[str] = []
    now = time.time()
    for entry in candidates:
        try:
            if now - entry.stat().st_mtime < STALE_TEMP_SECONDS:
                continue
            with open(entry.path, "rb") as f:
                if fcntl is not None:
                    try:
                        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue  # a live writer holds it
                os.remove(entry.path)
                removed.append(entry.path)
        except FileNotFoundError:
            continue  # its writer finished (renamed it) or another run removed it
        except OSError:
            continue  # not ours to remove (another user's): left as it is
    return removed


def to_arrow(frame: pd.DataFrame) -> pa.Table:
    """The bar frame as an Arrow table with the fixed schema (columns in canonical order).

    A frame with exactly the bar dtypes (all frames this package makes) is wrapped without
    copying a column; any other frame is converted by ``Table.from_pandas``. A missing value
    anywhere is refused with :class:`StorageError`.
    """
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise StorageError(f"bar frame is missing columns {missing}")
    try:
        if all(frame[name].dtype == DTYPES[name] for name in COLUMNS):
            return _wrap_bar_columns(frame)
        return pa.Table.from_pandas(frame[list(COLUMNS)], schema=ARROW_SCHEMA, preserve_index=False)
    except (ValueError, pa.ArrowException) as exc:  # a missing value, or an unusable one
        raise StorageError(f"bar frame cannot be written: {exc}") from exc


def _wrap_bar_columns(frame: pd.DataFrame) -> pa.Table:
    """Arrow views of a frame's columns (which have exactly :data:`DTYPES`)."""
    arrays: list[pa.Array] = []
    for field in ARROW_SCHEMA:
        column = frame[field.name]
        if field.name == "ts_event":
            array = pa.array(column.array.asi8).view(field.type)
        elif field.name == "symbol":
            array = pa.array(column)  # pandas hands over its Arrow strings as they are
        else:
            array = pa.array(column.to_numpy(), type=field.type)
        if array.null_count or (
            pa.types.is_floating(field.type) and pc.any(pc.is_nan(array)).as_py()
        ):
            raise ValueError(f"column {field.name} has missing values")
        arrays.append(array)
    return pa.Table.from_arrays(arrays, schema=ARROW_SCHEMA)


def from_arrow(table: pa.Table) -> pd.DataFrame:
    """An Arrow table of bars back to a pandas frame with :data:`DTYPES`."""
    table = table.select(list(COLUMNS)).cast(ARROW_SCHEMA)
    # One column per block and buffers released as they are converted: numeric columns are
    # handed over without a copy, so reading a month does not hold it twice.
    frame = table.to_pandas(split_blocks=True, self_destruct=True)
    del table
    differ = {name: dtype for name, dtype in DTYPES.items() if frame[name].dtype != dtype}
    return frame.astype(differ) if differ else frame


# How bars are laid out in Parquet. Timestamps, instrument ids and volumes are small steps
# or small integers (delta + bit packing); prices compress best with their bytes split by
# significance; only the symbol column uses a dictionary. Min/max statistics are kept for
# the columns readers filter on (time, instrument), not for prices. Row groups of 128Ki
# rows (as DuckDB writes them) bound the writer's working memory. On a 1.2M-row month this
# writes about 2x faster than zstd on default settings and the file is about 2.6x smaller
# (4.3 MB against 11.3 MB); all are standard Parquet features that pyarrow, DuckDB, Polars
# and Spark read.
_PARQUET_ENCODINGS = {
    "ts_event": "DELTA_BINARY_PACKED",
    "instrument_id": "DELTA_BINARY_PACKED",
    "volume": "DELTA_BINARY_PACKED",
    **{name: "BYTE_STREAM_SPLIT" for name in ("open", "high", "low", "close")},
}
_PARQUET_STATISTICS = ["ts_event", "symbol", "instrument_id"]
_PARQUET_ROW_GROUP = 131_072


def _write_parquet(table: pa.Table, f: BinaryIO) -> None:
    identity = table.schema.metadata or {}  # the file's identity, see BarStore.write
    table = _symbol_as_dictionary(table.replace_schema_metadata(None))
    with _parquet_writer(f, table.schema) as writer:
        writer.write_table(table, row_group_size=_PARQUET_ROW_GROUP)
        if identity:
            writer.add_key_value_metadata(dict(identity))


def _parquet_writer(sink: Any, schema: pa.Schema) -> pq.ParquetWriter:
    """A writer of bars with the layout above, ``schema`` being the bars' own."""
    return pq.ParquetWriter(
        sink,
        schema,
        compression="zstd",
        compression_level=1,
        use_dictionary=["symbol"],
        column_encoding=_PARQUET_ENCODINGS,
        write_statistics=_PARQUET_STATISTICS,
        # Plain Parquet types only (no Arrow schema in the footer), so a reader sees a
        # string symbol, not the dictionary it was written from: pandas.read_parquet gives
        # back exactly the bar dtypes. The identity goes in as plain key-value pairs, which
        # every Parquet reader shows and none interprets.
        store_schema=False,
    )


_Encoded = tuple[pa.BufferOutputStream, pq.ParquetWriter]


def _encode_rows(table: pa.Table) -> _Encoded:
    """``table``'s bars encoded in memory, the writer left open for the file's identity."""
    sink = pa.BufferOutputStream()
    table = _symbol_as_dictionary(table)
    writer = _parquet_writer(sink, table.schema)
    writer.write_table(table, row_group_size=_PARQUET_ROW_GROUP)
    return sink, writer


_ENCODING = "parquet encoding"  # the kind of work BarStore.encode_ahead begins


def _finish(encoding: Future[_Encoded], identity: Mapping[str, str]) -> pa.Buffer:
    """The whole file of an encoding begun ahead: the bars, then ``identity`` in the footer."""
    sink, writer = encoding.result()  # raises what the encoding raised
    if identity:
        writer.add_key_value_metadata(dict(identity))
    writer.close()
    return sink.getvalue()


def _symbol_as_dictionary(table: pa.Table) -> pa.Table:
    """The table with a one-value ``symbol`` column as an Arrow dictionary (one entry, all
    indices 0), which the writer stores as is instead of hashing every row's string; the
    file is the same. A column of several symbols is left for the writer to encode."""
    column = table["symbol"]
    if len(column) == 0 or column.null_count:
        return table
    first = column[0]
    if not pc.all(pc.equal(column, first)).as_py():
        return table
    indices = pa.array(np.zeros(len(column), dtype=np.int32))
    dictionary = pa.DictionaryArray.from_arrays(indices, pa.array([first.as_py()]))
    field = pa.field("symbol", dictionary.type, nullable=False)
    return table.set_column(table.schema.get_field_index("symbol"), field, dictionary)


def iso_utc_strings(ts: pa.ChunkedArray | pa.Array, whole: bool | None = None) -> pa.Array:
    """UTC timestamps as ISO-8601 text: ``2024-01-31T23:59:59Z``, or with 9 fractional
    digits (``...59.250000000Z``) when any timestamp is not a whole second (``whole``
    False; None finds out from ``ts``).

    Arrow formats tz-aware timestamps about 30x slower than naive ones, so the UTC values are
    formatted as naive and the ``T`` and ``Z`` are put in place afterwards.
    """
    nanos = pc.cast(pc.cast(ts, pa.timestamp("ns", tz="UTC")), pa.int64())
    if whole is None:
        whole = _whole_seconds(nanos)
    naive = (
        pc.cast(pc.divide(nanos, 10**9), pa.timestamp("s"))  # integer division
        if whole
        else pc.cast(nanos, pa.timestamp("ns"))
    )
    text = pc.cast(naive, pa.string())
    text = pc.utf8_replace_slice(text, 10, 11, "T")
    return pc.binary_join_element_wise(text, pa.scalar("Z"), "")


def _whole_seconds(nanos: pa.Array | pa.ChunkedArray) -> bool:
    return pc.all(pc.equal(pc.multiply(pc.divide(nanos, 10**9), 10**9), nanos)).as_py() is not False


_CSV_BATCH = 65_536  # rows formatted at a time, so the text of a month is never held whole


def _write_csv(table: pa.Table, f: BinaryIO) -> None:
    # One timestamp format for the whole file, then the rows in batches: formatting a
    # batch's timestamps as text costs a few megabytes instead of a month's worth.
    whole = _whole_seconds(pc.cast(table["ts_event"], pa.int64()))
    schema = table.schema.set(0, pa.field("ts_event", pa.string(), nullable=False))
    options = pacsv.WriteOptions(quoting_style="none", quoting_header="none")
    with pacsv.CSVWriter(f, schema, write_options=options) as writer:
        for batch in table.to_batches(max_chunksize=_CSV_BATCH):
            text = iso_utc_strings(batch.column(0), whole)
            writer.write_batch(
                pa.RecordBatch.from_arrays([text, *batch.columns[1:]], schema=schema)
            )


def _read_csv(f: BinaryIO) -> pa.Table:
    types = {field.name: field.type for field in ARROW_SCHEMA}
    types["ts_event"] = pa.timestamp("ns", tz="UTC")
    return pacsv.read_csv(
        f,
        convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=False),
    )


@contextlib.contextmanager
def _remote_errors(path: UPath, action: str) -> Iterator[None]:
    """Turn a failure of remote storage into a :class:`StorageError` that says what to check.

    Local paths are left alone (their errors are already plain ``OSError`` messages).
    """
    if is_local(path):
        yield
        return
    try:
        yield
    except StorageError:
        raise
    except Exception as exc:
        hint = (
            "Check that the bucket exists (it is never created for you), that the credentials "
            "may use it (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and, for an "
            "S3-compatible server, that AWS_ENDPOINT_URL points at it."
            if path.protocol in ("s3", "s3a")
            else "Check the storage URL in DBENTO_DATA_DIR and the credentials for it."
        )
        raise StorageError(
            f"could not {action} {path}: {type(exc).__name__}: {exc}. {hint}"
        ) from exc


def _origin_words(origin: str) -> str:
    return "SYNTHETIC demo data" if origin == "synthetic" else "real Databento market data"
