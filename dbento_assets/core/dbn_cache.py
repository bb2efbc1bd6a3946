"""The local cache of paid Databento downloads: one DBN file per symbol, month and schema.

Under ``<cache root>/dbn/``: entries with their manifests (size, SHA-256, counts, cost,
gateway), refusal notes (``<entry>.refused.json``: not bought again without force),
``quarantine/`` (refused or broken files, never deleted), ``by_request/`` (good files bought
for a request the catalog no longer makes, kept to be used again) and ``.locks/`` (one
``filelock`` per entry, dropped by the kernel when its holder dies). Every read verifies an
entry against its manifest; a download becomes an entry only by :meth:`DbnCache.commit`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from filelock import FileLock, Timeout
from upath import UPath

from dbento_assets.core.catalog import sent_symbol
from dbento_assets.core.dbn import DbnError, check_dbn_file, read_metadata
from dbento_assets.core.months import Month
from dbento_assets.core.source import DownloadRefused, SourceError
from dbento_assets.core.storage import disk_full_text, fsync_dir, is_disk_full, write_atomic

MANIFEST_SUFFIX = ".json"  # the name of the sidecar earlier versions wrote, now a manifest
REFUSED_SUFFIX = ".refused.json"
PART_SUFFIX = ".part"
PENDING_SUFFIX = ".pending"  # a paid, checked download waiting for the rules' verdict
LOCK_SUFFIX = ".lock"
QUARANTINE = "quarantine"
PARKED = "by_request"
LOCKS = ".locks"
NOT_ENTRIES = (QUARANTINE, PARKED, LOCKS)  # folders of dbn/ that are no catalog symbol's
MANIFEST_VERSION = 1
DBN_FILE_KEY = "dbn_file"  # the manifest field naming the file it describes
Request = tuple[str, str, str]  # (dataset, request symbol as sent, stype_in)
OHLCV_1S = "ohlcv-1s"  # the pipeline's bars; other schemas serve checks
LOCK_LOG_SECONDS = 30.0  # how often a run waiting for another one's download says so
FORCE_HINT = (
    "the run tag dbento/force=true (or the run config force: true) buys it again (a paid request)"
)
# Errors of the local disk: retrying them as network faults would pay again for nothing.
LOCAL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


class CacheEntryBroken(SourceError):
    """A cached file that failed verification; it was moved to the quarantine folder."""


class LocalIOError(SourceError):
    """The local disk refused a write (no space, read-only, no permission): never retried."""


@dataclass(frozen=True)
class CacheEntry:
    """Where one symbol-month-schema lives in the cache."""

    folder: Path  # the cache's dbn/ folder
    symbol: str
    month: Month
    schema: str
    # A piece of a month that has not closed yet: its window [start_ns, end_ns); None: the
    # whole month's entry.
    piece: tuple[int, int] | None = None

    @property
    def stem(self) -> str:
        return f"{self.symbol}_{self.month.tag}.{self.schema}"

    @property
    def path(self) -> Path:
        if self.piece is None:
            return self.folder / self.symbol / f"{self.stem}.dbn.zst"
        start, end = (_stamp(ns) for ns in self.piece)
        return self.folder / self.symbol / f"{self.stem}.{start}-{end}.dbn.zst"

    @property
    def manifest_path(self) -> Path:
        return self.path.with_name(self.path.name + MANIFEST_SUFFIX)

    @property
    def refused_path(self) -> Path:
        return self.month_entry.path.with_name(self.month_entry.path.name + REFUSED_SUFFIX)

    @property
    def lock_path(self) -> Path:  # one lock per month, pieces included
        return self.folder / LOCKS / (self.month_entry.path.name + LOCK_SUFFIX)

    @property
    def month_entry(self) -> CacheEntry:
        return CacheEntry(self.folder, self.symbol, self.month, self.schema)

    def with_piece(self, start_ns: int, end_ns: int) -> CacheEntry:
        return CacheEntry(self.folder, self.symbol, self.month, self.schema, (start_ns, end_ns))

    def __str__(self) -> str:
        if self.piece is None:
            return f"{self.symbol} {self.month} {self.schema}"
        start, end = (pd.Timestamp(ns, tz="UTC").isoformat() for ns in self.piece)
        return f"{self.symbol} {self.month} {self.schema} [{start}, {end})"


_STAMP = "%Y%m%dT%H%M%SZ"


def _stamp(ns: int) -> str:
    return pd.Timestamp(ns, tz="UTC").strftime(_STAMP)


def _acquired(path: Path, what: str, log: Callable[[str], None]) -> FileLock:
    """``path``'s file lock, held: waits as long as another run holds it, saying so."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path, thread_local=False)
    while True:
        try:
            lock.acquire(timeout=LOCK_LOG_SECONDS)
            return lock
        except Timeout:
            log(f"waiting for another run that holds {path} ({what})")


def _request_fields(manifest: dict[str, Any]) -> tuple[Any, ...] | None:
    """What a manifest says its file was bought for; None when it does not say."""
    fields = tuple(manifest.get(k) for k in ("dataset", "request_symbol", "stype_in"))
    return fields if all(fields) else None


def _manifest_of(path: Path) -> Path:
    return path.with_name(path.name + MANIFEST_SUFFIX)


def _bought_for(note: dict[str, Any], request: Request) -> bool:
    """Whether a held download's manifest names ``request``, as Databento reads it."""
    symbol = note.get("request_symbol")
    return (
        isinstance(symbol, str)
        and (note.get("dataset"), note.get("stype_in")) == (request[0], request[2])
        and sent_symbol(symbol, request[2]) == request[1]
    )


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_file(path: Path) -> None:
    with path.open("rb") as handle:
        os.fsync(handle.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader sees the old or the new file, never a part
    (the bar files' atomic write, which also makes the rename durable)."""
    write_atomic(UPath(path), lambda handle: handle.write(text.encode("utf-8")))


def local_os_error(exc: BaseException) -> OSError | None:
    """The local-disk ``OSError`` (see :data:`LOCAL_ERRNOS`) behind ``exc``, if any: the
    databento client wraps a failed write in a ``BentoError`` (``from None`` keeps it as the
    context), requests in its own exceptions."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        item = stack.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, OSError) and item.errno in LOCAL_ERRNOS:
            return item
        stack += [item.__cause__, item.__context__]
        stack += [arg for arg in getattr(item, "args", ()) if isinstance(arg, BaseException)]
    return None


def local_io_message(error: OSError, path: Path, needed_bytes: int | None = None) -> str:
    """One message for a local-disk failure: the path, what happened, what to do."""
    where = Path(error.filename) if error.filename else path
    if is_disk_full(error):
        need = (
            f" The download needs roughly {needed_bytes / 1e6:,.1f} MB (its billable size; "
            "the compressed file is smaller)."
            if needed_bytes
            else ""
        )
        return (
            f"{disk_full_text(error, where)}.{need} "
            "Free some space, or point DBENTO_CACHE_DIR at a larger disk, then materialize "
            "again. Not retried (every retry would be billed again); nothing was cached."
        )
    kind = "is read-only" if error.errno == errno.EROFS else "is not writable (permission denied)"
    return (
        f"The DBN cache location {where} {kind} ({error.strerror}). Fix the folder's "
        "permissions or point DBENTO_CACHE_DIR (or DBENTO_DATA_DIR) at a writable folder. "
        "Not retried; nothing was cached."
    )


def _requested(path: Path) -> dict[str, str]:
    """The dataset, ``stype_in`` and (single) request symbol a DBN file's header names; what
    it cannot tell is left out."""
    try:
        meta = read_metadata(path, None)
    except (DbnError, OSError, ValueError):
        return {}
    found = {
        "dataset": str(meta.dataset or ""),
        "stype_in": str(getattr(meta.stype_in, "value", meta.stype_in) or ""),
        "request_symbol": str(meta.symbols[0]) if len(meta.symbols or []) == 1 else "",
    }
    return {key: value for key, value in found.items() if value and value != "None"}


def _parse_stamp(text: str) -> int:
    stamp = pd.Timestamp(pd.to_datetime(text, format=_STAMP, utc=True))
    return int(stamp.value)


class DbnCache:
    """The DBN cache under one local folder (its ``dbn/`` subfolder)."""

    def __init__(self, root: Path | str) -> None:
        # Absolute: manifests and runs record where a file is, read from any working directory.
        self.folder = Path(root).expanduser().absolute() / "dbn"

    def entry(self, symbol: str, month: Month, schema: str) -> CacheEntry:
        return CacheEntry(self.folder, symbol, month, schema)

    def pieces(
        self, entry: CacheEntry, *, checked: bool = True, settle: bool = False
    ) -> list[CacheEntry]:
        """The pieces of a month bought while it was open, in window order.

        They must follow one another without gap or overlap from the first (each starts
        where the previous ended); anything else is not what this cache writes, and is
        refused naming the files rather than assembled into a month (``checked=False``: listed
        as they are, to replace them).
        """
        found: list[CacheEntry] = []
        for path in entry.path.parent.glob(f"{entry.stem}.*-*.dbn.zst"):
            start, _, end = path.name.removeprefix(entry.stem + ".").split(".")[0].partition("-")
            try:
                window = (_parse_stamp(start), _parse_stamp(end))
            except ValueError:
                continue
            found.append(entry.month_entry.with_piece(*window))
        found.sort(key=lambda e: e.piece or (0, 0))
        if settle:  # under the entry's lock only
            found = self._without_covered(found)
        for before, after in itertools.pairwise(found if checked else []):
            if before.piece and after.piece and before.piece[1] != after.piece[0]:
                raise SourceError(
                    f"The cached pieces {before.path} and {after.path} of {entry.month_entry} "
                    "do not follow one another; move them aside (nothing was requested)."
                )
        return found

    def _without_covered(self, found: list[CacheEntry]) -> list[CacheEntry]:
        """``found`` without the pieces a forced piece of the same request covers, which go to
        the quarantine folder: a forced run removes them once its piece is stored, and a run
        stopped in between leaves them. Any other overlap is left for :meth:`pieces` to
        refuse, naming the files."""
        manifests = {e: self._read_json(e.manifest_path) or {} for e in found}
        kept = []
        for entry in found:
            window = entry.piece or (0, 0)
            if any(
                other.piece is not None
                and other.piece != entry.piece
                and other.piece[0] <= window[0]
                and window[1] <= other.piece[1]
                and manifests[other].get("dbn_cache") == "forced"
                and _request_fields(manifests[other]) is not None
                and _request_fields(manifests[other]) == _request_fields(manifests[entry])
                for other in found
            ):
                self.quarantine(entry.path, entry, with_manifest=True)
            else:
                kept.append(entry)
        return kept

    # ------------------------------------------------------------------ lock and leftovers

    @contextlib.contextmanager
    def lock(
        self, entry: CacheEntry, log: Callable[[str], None], request: Request | None = None
    ) -> Iterator[None]:
        """Hold the entry's lock (waiting for another run's download, saying so), clean the
        temporary files a killed holder left, and clean this run's on the way out.

        With ``request``, also the lock of that request's month: two catalog symbols asking
        Databento for the same thing then buy it once, the second one waiting and reusing
        the first one's file. Always taken second, so two holders never wait on each other.
        """
        try:
            entry.path.parent.mkdir(parents=True, exist_ok=True)
            held = [_acquired(entry.lock_path, str(entry), log)]
        except OSError as exc:
            raise LocalIOError(local_io_message(exc, entry.lock_path)) from None
        try:
            if request is not None:
                path = self.request_lock_path(entry, request)
                try:
                    held.append(_acquired(path, f"{entry.month_entry} of {request[1]}", log))
                except OSError as exc:
                    raise LocalIOError(local_io_message(exc, path)) from None
            self._clean_parts(entry, log)  # we hold the lock: any part left is stale
            yield
        finally:
            self._clean_parts(entry, None)
            for lock in reversed(held):
                lock.release()

    def request_lock_path(self, entry: CacheEntry, request: Request) -> Path:
        """The lock of ``entry``'s month and schema as bought for ``request``, whatever
        catalog symbol asks for it."""
        stem = f"{self.request_folder(request).name}_{entry.month.tag}.{entry.schema}"
        return self.folder / LOCKS / PARKED / (stem + LOCK_SUFFIX)

    def new_part(self, entry: CacheEntry) -> Path:
        return entry.path.with_name(
            f"{entry.path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}{PART_SUFFIX}"
        )

    def _clean_parts(self, entry: CacheEntry, log: Callable[[str], None] | None) -> None:
        folder = entry.path.parent
        for pattern in (f"{entry.path.name}.*{PART_SUFFIX}", f".{entry.path.name}*{PART_SUFFIX}"):
            for part in folder.glob(pattern):
                part.unlink(missing_ok=True)
                if log is not None:
                    log(f"removed {part}, left by a run that ended before finishing")

    # ------------------------------------------------------------------ reading

    def verify(self, entry: CacheEntry, log: Callable[[str], None]) -> dict[str, Any]:
        """The manifest of a cached entry, after proving the file is what it says.

        A file whose size or SHA-256 does not match its manifest is moved to the quarantine
        folder and :class:`CacheEntryBroken` names it. An entry without a manifest (written by
        an earlier version) is decoded in full once and given one.
        """
        manifest = self._read_json(entry.manifest_path)
        if manifest is not None and manifest.get("manifest_version") == MANIFEST_VERSION:
            problem = self._mismatch(entry, manifest)
        else:
            manifest, problem = self._adopt_legacy(entry, manifest or {})
            if not problem:
                log(
                    f"{entry.path} had no manifest (an earlier version's cache): decoded in full, "
                    "found whole, and given one"
                )
        if problem:
            moved = self.quarantine(entry.path, entry, with_manifest=True)
            raise CacheEntryBroken(
                f"The cached DBN file of {entry} failed verification ({problem}); it was moved "
                f"to {moved} and nothing was decoded from it. Materialize again to download "
                "the month again (a paid request), or put the file back if it was moved "
                "by mistake."
            )
        return manifest

    def _mismatch(self, entry: CacheEntry, manifest: dict[str, Any]) -> str | None:
        # The manifest was written from a file read whole to its end (check_dbn_file at
        # download, or on adoption), so equal bytes prove equal records: no second decode
        # here, the month's own decode is the one read of the data.
        size = entry.path.stat().st_size
        if size != manifest.get("dbn_file_bytes"):
            return f"{size:,} bytes on disk, {manifest.get('dbn_file_bytes')} in the manifest"
        if sha256_of(entry.path) != manifest.get("sha256"):
            return "its SHA-256 differs from the manifest's"
        return None

    def _adopt_legacy(
        self, entry: CacheEntry, sidecar: dict[str, Any]
    ) -> tuple[dict[str, Any], str | None]:
        start = sidecar.get("request_start") or entry.month.start.isoformat()
        end = sidecar.get("request_end") or entry.month.end.isoformat()
        try:
            check = check_dbn_file(
                entry.path, pd.Timestamp(start).value, pd.Timestamp(end).value, entry.schema
            )
        except (DbnError, ValueError) as exc:
            return sidecar, str(exc)
        expected = sidecar.get("records_downloaded")
        if isinstance(expected, int) and check.records != expected:
            return sidecar, f"{check.records:,} records decoded, {expected:,} when downloaded"
        manifest = {
            **_requested(entry.path),  # what it was bought for, as its DBN header says
            **sidecar,
            "request_start": start,
            "request_end": end,
            "schema": entry.schema,
            "records_downloaded": check.records,
            "adopted_at": pd.Timestamp.now(tz="UTC").isoformat(),
        }
        self.write_manifest(entry, manifest, check.sha256)
        return manifest, None

    # ------------------------------------------------------------------ writing

    def write_manifest(
        self, entry: CacheEntry, manifest: dict[str, Any], sha256: str
    ) -> dict[str, Any]:
        """Complete ``manifest`` with the file's size and ``sha256`` (hashed by the pass that
        checked these very bytes, so the file is not read again for it); write it atomically."""
        manifest = {
            **manifest,
            "manifest_version": MANIFEST_VERSION,
            DBN_FILE_KEY: str(entry.path),
            "dbn_file_bytes": entry.path.stat().st_size,
            "sha256": sha256,
        }
        atomic_write_text(entry.manifest_path, json.dumps(manifest, indent=2, sort_keys=True))
        return manifest

    def commit(
        self,
        part: Path,
        entry: CacheEntry,
        manifest: dict[str, Any],
        sha256: str,
        request: Request,
    ) -> dict[str, Any]:
        """Make an accepted download for ``request`` the entry; ``sha256`` is the hash of
        ``part``'s bytes, taken by the file check's pass. The old manifest goes first: a crash
        before the new one is written leaves an entry without manifest, which the next read
        verifies in full, never a manifest describing another file. A refusal of the month
        for another request (a catalog typo since fixed) is kept for that request."""
        fsync_file(part)
        entry.manifest_path.unlink(missing_ok=True)
        os.replace(part, entry.path)
        fsync_dir(entry.path.parent)
        written = self.write_manifest(entry, manifest, sha256)
        if self._refusal(entry, request) is not None:
            entry.refused_path.unlink(missing_ok=True)
        return written

    def quarantine(self, path: Path, entry: CacheEntry, *, with_manifest: bool = False) -> Path:
        """Move ``path`` (an entry or a download of it) to the quarantine folder; its new name."""
        stamp = pd.Timestamp.now(tz="UTC").strftime("%Y%m%dT%H%M%S%fZ")
        target = self.folder / QUARANTINE / entry.symbol / f"{entry.path.name}.{stamp}"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
        # A held download's manifest is its own (see hold); an entry's sits beside it.
        manifest = _manifest_of(path) if path.name.endswith(PENDING_SUFFIX) else entry.manifest_path
        if with_manifest and manifest.exists():
            os.replace(manifest, _manifest_of(target))
        fsync_dir(target.parent)
        return target

    # ------------------------------------------------------------------ other requests

    def request_folder(self, request: Request) -> Path:
        """Where files bought for ``request`` wait while the catalog asks for another."""
        slug = "__".join(re.sub(r"[^A-Za-z0-9.-]", "_", part) for part in request)
        return self.folder / PARKED / slug

    def park(self, entry: CacheEntry, request: Request) -> Path:
        """Move ``entry`` (with its manifest), bought for ``request``, out of the way of a
        symbol the catalog now asks for otherwise; :meth:`unpark` brings it back."""
        target = self.request_folder(request) / entry.path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        # The data first: killed in between, no file without its manifest stays at the entry
        # (it would be adopted as a file of earlier versions, of unknown request).
        os.replace(entry.path, target)
        if entry.manifest_path.exists():
            os.replace(entry.manifest_path, target.with_name(target.name + MANIFEST_SUFFIX))
        fsync_dir(target.parent)
        return target

    def parked(self, entry: CacheEntry, request: Request) -> list[Path]:
        """The files of ``entry``'s month and schema parked for ``request`` (under whatever
        symbol they were bought)."""
        mark = f"_{entry.month.tag}.{entry.schema}."
        return sorted(self.request_folder(request).glob(f"*{mark}*dbn.zst"))

    def unpark(self, entry: CacheEntry, request: Request) -> list[Path]:
        """Bring back the files :meth:`parked` for ``request``, as ``entry``'s; the paths
        restored."""
        mark = f"_{entry.month.tag}.{entry.schema}."
        restored = []
        for path in self.parked(entry, request):
            target = entry.path.parent / f"{entry.stem}.{path.name.split(mark, 1)[1]}"
            if target.exists():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            manifest = path.with_name(path.name + MANIFEST_SUFFIX)
            if manifest.exists():  # the manifest first: data never lies there without it
                os.replace(manifest, target.with_name(target.name + MANIFEST_SUFFIX))
            os.replace(path, target)
            restored.append(target)
        if restored:
            fsync_dir(entry.path.parent)
        return restored

    def elsewhere(
        self,
        entry: CacheEntry,
        same: Callable[[dict[str, Any]], bool],
        also: tuple[str, ...] = (),
    ) -> Path | None:
        """A whole month of ``entry``'s month and schema, its manifest ``same`` request, that
        one of the files ``also`` names holds (where a run bought it before: another data
        folder or cache folder), else another catalog symbol's entry (a symbol renamed in
        the catalog, or two names for one request)."""
        whole = f"_{entry.month.tag}.{entry.schema}.dbn.zst"
        named = [
            Path(f + MANIFEST_SUFFIX)
            for f in also
            if f.endswith(whole) and Path(f).resolve() != entry.path.resolve()
        ]
        siblings = sorted(self.folder.glob(f"*/*{whole}{MANIFEST_SUFFIX}"))
        for manifest in named + siblings:
            if manifest in siblings and manifest.parent.name in (*NOT_ENTRIES, entry.symbol):
                continue
            data = manifest.with_name(manifest.name.removesuffix(MANIFEST_SUFFIX))
            loaded = self._read_json(manifest)
            if loaded is not None and data.is_file() and same(loaded):
                return data
        return None

    def bought_elsewhere(
        self,
        entry: CacheEntry,
        same: Callable[[dict[str, Any]], bool],
        also: tuple[str, ...] = (),
    ) -> Path | None:
        """Link into ``entry`` the month :meth:`elsewhere` finds, when it is still the file its
        manifest describes (size and SHA-256); the file it was, or None. The data file is
        shared (a hard link, else a copy), the manifest copied. Anything that goes wrong (the
        other entry moved meanwhile, a full disk) only means nothing is reused."""
        data = self.elsewhere(entry, same, also)
        if data is None:
            return None
        # A name _clean_parts removes: a copy cut short by a kill is not left behind.
        part = entry.path.with_name(f".{entry.path.name}.{uuid.uuid4().hex}{PART_SUFFIX}")
        try:
            text = data.with_name(data.name + MANIFEST_SUFFIX).read_bytes()
            manifest = json.loads(text)
            if data.stat().st_size != manifest.get("dbn_file_bytes") or sha256_of(
                data
            ) != manifest.get("sha256"):
                return None
            entry.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(data, part)
            except OSError:
                shutil.copyfile(data, part)
            # It now describes this entry, and says where it came from.
            text = json.dumps(
                {**manifest, DBN_FILE_KEY: str(entry.path), "copied_from": str(data)},
                indent=2,
                sort_keys=True,
            ).encode()
            write_atomic(UPath(entry.manifest_path), lambda f: f.write(text))
            os.replace(part, entry.path)
            fsync_dir(entry.path.parent)
        except (OSError, ValueError):
            return None
        finally:
            part.unlink(missing_ok=True)
        return data

    # ------------------------------------------------------------------ paid, not yet accepted

    def hold(self, part: Path, target: CacheEntry, metadata: dict[str, Any], sha256: str) -> Path:
        """Keep a download whose file check passed (every byte arrived, paid for) under a
        name that outlives this run, while the rules judge it: a run stopped meanwhile (Ctrl-C,
        a kill) leaves it for the next run, which uses it instead of buying it again. Its
        manifest goes first, so the data never waits without one."""
        pending = target.path.with_name(target.path.name + PENDING_SUFFIX)
        note = {
            **metadata,
            "sha256": sha256,
            "dbn_file_bytes": part.stat().st_size,
            "piece": list(target.piece) if target.piece else None,
        }
        fsync_file(part)
        atomic_write_text(_manifest_of(pending), json.dumps(note, indent=2, sort_keys=True))
        os.replace(part, pending)
        fsync_dir(pending.parent)
        return pending

    def release(self, pending: Path) -> None:
        """Forget a held download once it was committed or quarantined."""
        _manifest_of(pending).unlink(missing_ok=True)
        pending.unlink(missing_ok=True)

    def _held(self, entry: CacheEntry) -> Iterator[tuple[Path, dict[str, Any] | None]]:
        """The downloads of ``entry``'s month held (see :meth:`hold`), with their manifests
        (None: unreadable). A manifest whose data never arrived (stopped in between) goes."""
        for note_path in sorted(entry.path.parent.glob(f"{entry.stem}*{PENDING_SUFFIX}.json")):
            data = note_path.with_name(note_path.name.removesuffix(MANIFEST_SUFFIX))
            if data.is_file():
                yield data, self._read_json(note_path)
            else:
                note_path.unlink(missing_ok=True)

    def held_for(self, entry: CacheEntry, request: Request) -> list[Path]:
        """The downloads of ``entry``'s month held for ``request``, as they are listed: for
        a price, not for use (:meth:`held_download` checks them)."""
        return [data for data, note in self._held(entry) if _bought_for(note or {}, request)]

    def held_download(
        self,
        entry: CacheEntry,
        request: Request,
        start_ns: int,
        end_ns: int,
        log: Callable[[str], None],
    ) -> tuple[Path, CacheEntry, dict[str, Any]] | None:
        """A download of ``entry``'s month an earlier run paid for and held (see :meth:`hold`)
        but never finished judging, when it is what this run would buy: bought for
        ``request``, for exactly [``start_ns``, ``end_ns``), still the bytes its
        manifest describes. Returns its path, the entry it becomes and its metadata. One
        that does not fit (another request, or a window that no longer is this run's, such
        as a growing month's piece after the month closed) is moved to the quarantine folder
        with its manifest (kept, never deleted)."""
        found = None
        for data, note in self._held(entry):
            piece = (note or {}).get("piece")
            target = entry.month_entry.with_piece(*piece) if piece else entry.month_entry
            if (
                found is None
                and note is not None
                and note.get("schema") == entry.schema
                and _bought_for(note, request)
                and pd.Timestamp(note.get("request_start")).value == start_ns
                and pd.Timestamp(note.get("request_end")).value == end_ns
                and data.stat().st_size == note.get("dbn_file_bytes")
                and sha256_of(data) == note.get("sha256")
            ):
                metadata = {k: v for k, v in note.items() if k not in ("piece", "dbn_file_bytes")}
                found = (data, target, metadata)
                continue
            moved = self.quarantine(data, target, with_manifest=True)
            log(
                f"a download of {target} held by an earlier run is not what this run buys "
                f"(another request or window, or changed since): moved to {moved}"
            )
        return found

    # ------------------------------------------------------------------ refusals

    def remember_refused(
        self,
        entry: CacheEntry,
        refusal: DownloadRefused,
        moved: Path,
        request: Request,
        settings: dict[str, Any],
    ) -> None:
        """Remember a refused download of ``entry`` (a month, or one piece of a growing month:
        its window is kept, so that only that piece is bought again when forced), bought for
        ``request`` and judged under the catalog's rule ``settings``."""
        note: dict[str, Any] = {
            "refused_at": pd.Timestamp.now(tz="UTC").isoformat(),
            "entry": str(entry),
            "request": list(request),
            "settings": settings,
            "rules": refusal.rules,
            "reason": refusal.args[0],
            "quarantined": str(moved),
        }
        if entry.piece is not None:
            note["piece"] = list(entry.piece)
        atomic_write_text(entry.refused_path, json.dumps(note, indent=2))

    def _refusal(self, entry: CacheEntry, request: Request) -> dict[str, Any] | None:
        """The refusal note of ``entry``'s month when it concerns ``request``: a month refused
        as the catalog asked for it before (a typo, fixed since) is not refused as it asks
        now. A note that does not say (written by earlier versions) concerns any request."""
        note = self._read_json(entry.refused_path)
        if note is None or note.get("request") in (None, list(request)):
            return note
        return None

    def refused_piece(self, entry: CacheEntry, request: Request) -> tuple[int, int] | None:
        """The window of the refused piece of ``entry``'s month, when a piece was refused."""
        piece = (self._refusal(entry, request) or {}).get("piece")
        if isinstance(piece, list) and len(piece) == 2 and all(isinstance(n, int) for n in piece):
            return piece[0], piece[1]
        return None

    def judge_again(
        self,
        entry: CacheEntry,
        request: Request,
        settings: dict[str, Any],
        log: Callable[[str], None],
    ) -> bool:
        """Whether the download of ``entry``'s month refused for ``request`` under other rule
        settings than the catalog's now (``negative_prices`` set since, say) was put back as
        a held download (see :meth:`hold`), for this run to judge without buying it again:
        its refusal is then forgotten. False when there is none, or its quarantined copy (with
        its manifest) is gone."""
        note = self._refusal(entry, request)
        if note is None or note.get("settings") in (None, settings):
            return False
        moved = Path(str(note.get("quarantined", "")))
        held = self._read_json(_manifest_of(moved))
        if held is None or not moved.is_file():
            return False
        piece = held.get("piece")
        target = entry.month_entry.with_piece(*piece) if piece else entry.month_entry
        pending = target.path.with_name(target.path.name + PENDING_SUFFIX)
        # The manifest first: stopped in between, no held data is left without one.
        os.replace(_manifest_of(moved), _manifest_of(pending))
        os.replace(moved, pending)
        fsync_dir(pending.parent)
        entry.refused_path.unlink(missing_ok=True)
        log(
            f"{target} was refused on {note.get('refused_at', '?')} under other catalog settings "
            f"({note.get('settings')}, now {settings}): its copy {moved} is judged again; "
            "nothing is bought"
        )
        return True

    def _refused_elsewhere(self, entry: CacheEntry, request: Request) -> dict[str, Any] | None:
        """A whole month's refusal of the same request under another catalog symbol (two
        names for one request): the same data, which would be refused again once paid."""
        pattern = f"*/*_{entry.month.tag}.{entry.schema}.dbn.zst{REFUSED_SUFFIX}"
        for path in sorted(self.folder.glob(pattern)):
            if path.parent.name in (*NOT_ENTRIES, entry.symbol):
                continue
            note = self._read_json(path)
            if note is not None and note.get("request") == list(request) and not note.get("piece"):
                return note
        return None

    def refused_message(self, entry: CacheEntry, request: Request) -> str | None:
        """Why this entry must not be bought again for ``request`` without force, or None."""
        note = self._refusal(entry, request) or self._refused_elsewhere(entry, request)
        if note is None:
            return None
        rules = ", ".join(note.get("rules") or []) or "its checks"
        also = (
            ""
            if entry.schema == OHLCV_1S
            else ", with the month's 1-second data; dbento/force=vendor-1m buys only these "
            "1-minute bars again"
        )
        return (
            f"The download of {note.get('entry') or entry} was refused on "
            f"{note.get('refused_at', '?')} by {rules}, and is quarantined at "
            f"{note.get('quarantined', '?')}; nothing was requested this time, and "
            f"{FORCE_HINT}{also}."
        )

    def manifest_of(self, entry: CacheEntry) -> dict[str, Any] | None:
        """The manifest of ``entry`` as written, unverified (None: none readable)."""
        return self._read_json(entry.manifest_path)

    def _read_json(self, path: Path) -> dict[str, Any] | None:
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return loaded if isinstance(loaded, dict) else None
