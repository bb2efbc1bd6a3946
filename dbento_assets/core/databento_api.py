"""Downloads from Databento's historical API, one symbol-month and schema at a time.

:class:`DatabentoSource` answers a request from the verified cache (:mod:`.dbn_cache`) without
a request, or asks the free metadata endpoints (range, cost under the ceiling, size, count)
before paying for ``timeseries.get_range``, streamed to a temporary file that is checked and
accepted by the caller before it becomes the cache entry. A month in progress is bought in
pieces, each run buying only ``[through, new available end)``. Faults are retried with
``tenacity``, except those a retry would only pay for again (auth, 422, local disk errors).
"""

from __future__ import annotations

import contextlib
import email.utils
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pandas as pd
import tenacity

from dbento_assets.core.catalog import Instrument, catalog_path, sent_symbol
from dbento_assets.core.coverage import VendorMonth, dbn_coverage
from dbento_assets.core.dbn import (
    OHLCV_RTYPES,
    DbnError,
    DbnFileCheck,
    TruncatedDbn,
    check_dbn_file,
    decode_month,
)
from dbento_assets.core.dbn_cache import (
    FORCE_HINT,
    OHLCV_1S,
    PENDING_SUFFIX,
    CacheEntry,
    DbnCache,
    LocalIOError,
    Request,
    local_io_message,
    local_os_error,
)
from dbento_assets.core.frame_rules import check_ohlc
from dbento_assets.core.months import Month
from dbento_assets.core.source import (
    NO_KEY_MESSAGE,
    DownloadRefused,
    FetchedMonth,
    FetchRequest,
    Logger,
    SourceError,
)

if TYPE_CHECKING:
    import databento
    from databento import BentoClientError, BentoServerError

T = TypeVar("T")

DEFAULT_GATEWAY = "https://hist.databento.com"
DEFAULT_MAX_COST_USD = 5.0
DEFAULT_TIMEOUT_SECONDS = 100.0
SCHEMA = OHLCV_1S  # the pipeline's bars
VENDOR_SCHEMA = "ohlcv-1m"  # Databento's own 1-minute bars, for the vendor cross-check
RETRYABLE_STATUS = frozenset({408, 500, 502, 503, 504})
BAR_INTERVAL = {SCHEMA: "s", VENDOR_SCHEMA: "min"}  # pandas aliases of each schema's bar


@dataclass(frozen=True)
class RetryPolicy:
    """How transient faults are retried (tests shrink the delays to zero).

    ``max_attempts`` bounds every HTTP call (the first try included). The n-th backoff waits
    ``min(backoff_max_seconds, backoff_base_seconds * 2**(n-1))`` scaled by a random factor in
    ``[1 - jitter, 1]``. A 429 waits for its ``Retry-After`` (capped at
    ``retry_after_max_seconds``) instead, or for the backoff when the header is missing.
    """

    max_attempts: int = 5
    backoff_base_seconds: float = 1.0
    backoff_max_seconds: float = 60.0
    jitter: float = 0.5
    retry_after_max_seconds: float = 300.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if self.backoff_base_seconds < 0 or self.backoff_max_seconds < 0:
            raise ValueError("backoff delays must not be negative")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be within [0, 1], got {self.jitter}")
        if self.retry_after_max_seconds < 0:
            raise ValueError("retry_after_max_seconds must not be negative")

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """The wait after failed attempt number ``attempt`` (1-based)."""
        delay = min(self.backoff_max_seconds, self.backoff_base_seconds * 2 ** (attempt - 1))
        return delay * (1.0 - self.jitter * rng.random())


@dataclass(frozen=True)
class Availability:
    """What ``metadata.get_dataset_range`` says about one dataset's data of one schema."""

    dataset: str
    schema: str
    start: pd.Timestamp
    end: pd.Timestamp  # exclusive


@dataclass(frozen=True)
class MonthWindow:
    """The part of a month that will be requested, and why it may be shorter."""

    start: pd.Timestamp
    end: pd.Timestamp
    partial_reason: str | None = None


@dataclass(frozen=True)
class CostEstimate:
    """One partition's price, or why it has none (cached, or not available)."""

    symbol: str
    month: Month
    cached: bool
    cost_usd: float | None = None
    billable_size_bytes: int | None = None
    note: str = ""


class _Transient(Exception):
    """A fault worth another attempt."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


def _rtype(schema: str) -> int:
    try:
        return OHLCV_RTYPES[schema]
    except KeyError:
        raise SourceError(
            f"schema {schema!r} is not one the Databento source downloads "
            f"({', '.join(OHLCV_RTYPES)})"
        ) from None


def dbn_cache_path(data_root: Path | str, symbol: str, month: Month, schema: str = SCHEMA) -> Path:
    """The cache file of one partition and schema: ``<root>/dbn/ES/ES_2024_01.ohlcv-1s.dbn.zst``
    (``...ohlcv-1m.dbn.zst`` for the vendor's 1-minute bars)."""
    _rtype(schema)
    return DbnCache(data_root).entry(symbol, month, schema).path


def _announced(metadata: dict[str, Any]) -> dict[str, Any]:
    """What a download (or its sidecar, on a cache hit) says the month must hold: its first
    instant when the dataset starts mid-month, and the record count Databento announced."""
    start = metadata.get("request_start") if metadata.get("partial_month") else None
    count = metadata.get("record_count")
    return {
        "available_from_ns": None if start is None else pd.Timestamp(start).value,
        "announced_records": int(count) if isinstance(count, int) else None,
    }


def _vendor_accept(instrument: Instrument, month: Month) -> Callable[[FetchedMonth], VendorMonth]:
    """The ``accept`` of a vendor 1m download: it must decode and its bars must be consistent
    (high/low), or it is refused, quarantined and remembered (not bought again without force).
    Returns what the cross-check compares with, so the file is decoded once per step."""

    def accept(fetched: FetchedMonth) -> VendorMonth:
        bars = decode_month(
            fetched.payloads, instrument.symbol, month, fetched.instrument_ids, VENDOR_SCHEMA
        ).bars
        ohlc = check_ohlc(bars)
        if not ohlc.passed:
            raise DownloadRefused(
                f"Databento's {VENDOR_SCHEMA} bars of {instrument.symbol} {month} fail the "
                f"rule {ohlc.rule} ({ohlc.description}).",
                rules=[ohlc.rule],
            )
        covered = dbn_coverage(fetched.payloads, month, VENDOR_SCHEMA)
        return VendorMonth(bars, covered, f"Databento API ({VENDOR_SCHEMA})")

    return accept


def _accept_all(fetched: FetchedMonth) -> None:
    """The ``accept`` of a plain fetch: the file checks are the only gate."""


class DatabentoSource:
    """Month-by-month ohlcv-1s (and, on request, ohlcv-1m) downloads from Databento's
    historical API, cached as DBN."""

    name = "databento"

    def __init__(
        self,
        api_key: str,
        data_root: Path | str,
        *,
        gateway: str = DEFAULT_GATEWAY,
        max_cost_usd: float = DEFAULT_MAX_COST_USD,
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
        retry: RetryPolicy | None = None,
        catalog_file: Path | None = None,
        vendor_check: bool = False,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        if not api_key or not api_key.strip() or api_key.strip() == "YOUR_API_KEY":
            raise SourceError(NO_KEY_MESSAGE)
        if max_cost_usd < 0:
            raise SourceError(f"DBENTO_MAX_COST_USD must not be negative, got {max_cost_usd}")
        if timeout_seconds <= 0:
            raise SourceError(f"the timeout must be positive, got {timeout_seconds}")
        self._key = api_key.strip()
        self.data_root = Path(data_root)
        self.gateway = gateway
        self.max_cost_usd = float(max_cost_usd)
        self.timeout_seconds = float(timeout_seconds)
        self.retry = retry or RetryPolicy()
        self.catalog_file = catalog_file
        self.vendor_requested = vendor_check
        self.paid_usd = 0.0  # see MonthSource.paid_usd
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._client: databento.Historical | None = None
        self._ranges: dict[tuple[str, str], Availability] = {}
        self.cache = DbnCache(self.data_root)

    def __repr__(self) -> str:  # never show the key
        return (
            f"DatabentoSource(data_root={str(self.data_root)!r}, gateway={self.gateway!r}, "
            f"max_cost_usd={self.max_cost_usd})"
        )

    # ------------------------------------------------------------------ public API

    def cache_path(self, symbol: str, month: Month, schema: str = SCHEMA) -> Path:
        return dbn_cache_path(self.data_root, symbol, month, schema)

    def cache_folder(self, symbol: str, month: Month) -> Path:
        return self.cache_path(symbol, month).parent

    def fetch(self, request: FetchRequest, log: Logger) -> FetchedMonth:
        """Return the month's cached ohlcv-1s DBN file, downloading it first when needed."""
        return self.fetch_accepted(request, log, _accept_all)[0]

    def fetch_vendor_1m(self, request: FetchRequest, log: Logger) -> FetchedMonth:
        """Return Databento's own ohlcv-1m of the partition (same dataset, symbol, stype_in
        and month window), cached as ``<SYM>_<YYYY>_<MM>.ohlcv-1m.dbn.zst`` and downloaded
        first when needed, with every check, ceiling and retry of :meth:`fetch`."""
        return self.fetch_accepted(request, log, _accept_all, VENDOR_SCHEMA)[0]

    def vendor_bars(self, request: FetchRequest, log: Logger) -> VendorMonth | str:
        """Databento's ohlcv-1m of the partition when the user asked for the comparison
        (``DBENTO_VENDOR_CHECK``): cached like the 1-second month, bought at most once (a
        refused download is remembered), renewed by a forced request; in a month not closed
        yet, up to the available end, growing by pieces (its ``covered`` says how far). Any
        failure is the reason there is nothing to compare; it never fails the data."""
        if not self.vendor_requested:
            return (
                "the optional download of Databento's 1-minute bars is off "
                "(DBENTO_VENDOR_CHECK=true turns it on)"
            )
        entry = self.cache.entry(request.instrument.symbol, request.month, VENDOR_SCHEMA)
        try:
            # Inside the try: pieces that do not follow one another are a reason to compare
            # nothing, never a failure of the 1-second month already bought.
            if (
                request.force
                and not request.renew_pieces
                and self.cache.pieces(entry)
                and self.cache.refused_piece(entry, _asked(request.instrument)) is None
            ):
                # A force on a growing month is about its 1-second data (a refused tail, most
                # often): the 1m pieces already bought are kept, only the new 1m tail is bought.
                request = replace(request, force=False)
            fetched, found = self.fetch_accepted(
                request, log, _vendor_accept(request.instrument, request.month), VENDOR_SCHEMA
            )
        except (SourceError, DbnError, OSError) as exc:
            return f"Databento's 1-minute bars could not be read ({exc})"
        return replace(found, metadata=fetched.metadata)

    def fetch_accepted(
        self,
        request: FetchRequest,
        log: Logger,
        accept: Callable[[FetchedMonth], T],
        schema: str = SCHEMA,
    ) -> tuple[FetchedMonth, T]:
        """The month's DBN file, with what ``accept`` made of it.

        ``accept`` sees the data before it becomes the cache entry (a download, still under a
        temporary name) or before it is used (a cached entry): it raises
        :class:`~dbento_assets.core.dbn_cache.DownloadRefused` to refuse it. A refused
        download is quarantined and remembered (a later run without force fails at once,
        without paying), and a forced download that is refused leaves the cached file as it
        was. A refused tail of a growing month is quarantined and remembered as that piece:
        the pieces bought before it stay, and a forced run buys only the tail again. All of
        it runs under the entry's lock, so one download per entry at a time.
        """
        inst, month = request.instrument, request.month
        entry = self.cache.entry(inst.symbol, month, schema)
        with self.cache.lock(entry, log, _asked(inst)):
            if request.force and self._forced_already(entry, request.lineage):
                log(
                    f"force: {entry} was bought again by run {request.lineage} or one of its "
                    "re-executions already; this re-execution uses that download"
                )
                request = replace(request, force=False, renew_pieces=False)
            if not request.force:
                self._reuse_bought(entry, inst, log, request.bought_before)
            if entry.path.is_file() and not request.force:
                manifest = self._verified(entry, inst, log)
                hit = self._cache_hit_metadata(manifest)
                fetched = FetchedMonth(payloads=[entry.path], metadata=hit, **_announced(hit))
                log(f"DBN cache hit for {entry}: {entry.path} (no Databento request)")
                try:
                    return fetched, accept(fetched)
                except DownloadRefused as exc:
                    self._refuse(entry, entry.path, exc, _asked(inst), _settings(inst), cached=True)
                    raise
            # A forced run buys the month again in one piece, except after a refused piece
            # of a growing month: then the verified pieces before it are kept, and only the
            # refused tail is bought again.
            refused_piece = self.cache.refused_piece(entry, _asked(inst))
            keep = not request.force or (refused_piece is not None and not entry.path.is_file())
            held = self._held_pieces(entry, inst, log) if keep else []
            if request.force and held and not self._pass_alone(held, entry, month, accept, log):
                held = []
            if held and held[-1][0].piece is not None and held[-1][0].piece[1] >= month.end_ns:
                # Every piece of a month that has closed since is here: no request at all.
                log(f"DBN cache hit for {entry}: {len(held)} pieces (no Databento request)")
                return self._assemble(held, None, None, month, accept)
            if not request.force and self.cache.judge_again(
                entry, _asked(inst), _settings(inst), log
            ):
                return self._buy(request, entry, log, accept, held)
            if not request.force:
                refused = self.cache.refused_message(entry, _asked(inst))
                if refused:
                    raise SourceError(refused)
            if request.force and entry.path.is_file():
                log(f"force: re-downloading {entry}; {entry.path} is kept until then")
            elif request.force and held:
                log(
                    f"force: buying the refused tail of {entry} again; the {len(held)} piece(s) "
                    "bought before it are kept"
                )
            return self._buy(request, entry, log, accept, held)

    def _forced_already(self, entry: CacheEntry, lineage: str | None) -> bool:
        """Whether a forced run of ``lineage`` bought ``entry``'s month (or a piece of it)
        that is still the cache's: its re-execution must not pay for it once more."""
        if lineage is None:
            return False
        files = [entry.month_entry, *self.cache.pieces(entry, checked=False)]
        return any(
            (self.cache.manifest_of(f) or {}).get(FORCED_IN_KEY) == lineage
            for f in files
            if f.path.is_file()
        )

    def _verified(self, entry: CacheEntry, inst: Instrument, log: Logger) -> dict[str, Any]:
        """The manifest of a cached file (see :meth:`DbnCache.verify`). A file bought for
        another request than the catalog's now (a symbol corrected in the catalog, or
        mistyped) is never served as this symbol's data: the month's files are parked under
        the request they were bought for (``by_request/``), where a catalog asking for that
        request again finds them, so that the next run buys the month as the catalog asks."""
        manifest = self.cache.verify(entry, log)
        if _same_request(manifest, inst):
            return manifest
        bought = _request_of(manifest, inst)
        month = entry.month_entry
        files = [month] if month.path.is_file() else []
        files += self.cache.pieces(month, checked=False)
        moved = [self.cache.park(f, bought) for f in files]
        raise SourceError(
            f"The cached DBN file {entry.path} was bought for {bought[1]} ({bought[2]}) on "
            f"{bought[0]}, but the catalog now asks for {inst.request} on {inst.dataset} for "
            f"{inst.symbol}: nothing was decoded from it and nothing was requested. The "
            f"month's file(s) were moved to {moved[0].parent if moved else 'by_request/'}, "
            f"where they are used again, without buying, if the catalog asks for "
            f"{bought[1]} again. Materialize again to buy {month} for {inst.request_symbol} "
            "(a paid request)."
        )

    def _reuse_bought(
        self, entry: CacheEntry, inst: Instrument, log: Logger, bought_before: tuple[str, ...]
    ) -> None:
        """Before buying a month this symbol has no file of: the files bought for the same
        request parked by a catalog change (a typo and its fix), else a whole month bought for
        the same request where an earlier run recorded it (``bought_before``: another data
        folder) or under another catalog symbol (a symbol renamed), become this entry."""
        if entry.path.is_file():
            return
        # Every parked file missing here (a restore killed halfway is finished now).
        restored = self.cache.unpark(entry, _asked(inst))
        if restored:
            log(
                f"DBN cache: {entry} restored from {self.cache.request_folder(_asked(inst))}: "
                f"bought before for {inst.request}; nothing is bought"
            )
            return
        if self.cache.pieces(entry, checked=False):
            return
        found = self.cache.bought_elsewhere(entry, lambda m: _bought_for(m, inst), bought_before)
        if found is not None:
            where = (
                "in another data or cache folder (DBENTO_DATA_DIR, DBENTO_CACHE_DIR or the "
                "working directory changed since)"
                if found.parent.parent != self.cache.folder
                else "under another catalog symbol"
            )
            log(
                f"DBN cache: {entry} was bought before for {inst.request} {where}: {found} "
                "is used, after checking its size and SHA-256; nothing is bought"
            )

    def _pass_alone(
        self,
        held: list[tuple[CacheEntry, dict[str, Any]]],
        entry: CacheEntry,
        month: Month,
        accept: Callable[[FetchedMonth], T],
        log: Logger,
    ) -> bool:
        """Whether the pieces bought before a refused tail pass ``accept`` on their own.

        A month can be refused for a piece it already held (rules made stricter by an
        upgrade, data the vendor has corrected since): buying only the tail again would be
        refused again, run after forced run. Checked here without a request; when they fail,
        the forced run buys the month again in one piece, as it does for a closed month."""
        try:
            self._assemble(held, None, None, month, accept)
        except DownloadRefused as exc:
            log(
                f"force: the {len(held)} piece(s) of {entry} bought before its refused tail "
                f"are refused on their own ({exc}); buying the month again in one piece"
            )
            return False
        return True

    def _held_pieces(
        self, entry: CacheEntry, inst: Instrument, log: Logger
    ) -> list[tuple[CacheEntry, dict[str, Any]]]:
        """The verified pieces of a month bought while it was open, with their manifests.

        They must begin where the month does (or the dataset, when it starts mid-month): a
        first piece quarantined or moved away leaves a hole no later piece would fill, and a
        month assembled from the rest would silently begin late. That is refused before any
        request, naming the files."""
        pieces = self.cache.pieces(entry, settle=True)
        held = [(piece, self._verified(piece, inst, log)) for piece in pieces]
        if held:
            first, manifest = held[0]
            month = entry.month
            begins = max(month.start, pd.Timestamp(manifest.get("available_start", month.start)))
            if first.piece is not None and first.piece[0] > begins.value:
                starts = pd.Timestamp(first.piece[0], tz="UTC")
                raise SourceError(
                    f"The cached pieces of {entry.month_entry} begin at {starts.isoformat()}, "
                    f"after the month's start {begins.isoformat()}: the piece before "
                    f"{first.path} is missing (quarantined or moved), so the month cannot be "
                    "made whole from them. Nothing was requested. Put the missing piece back, "
                    "or move the pieces aside: the next run then buys the month in one piece."
                )
        return held

    def _assemble(
        self,
        held: list[tuple[CacheEntry, dict[str, Any]]],
        tail: tuple[Path, dict[str, Any]] | None,
        through_ns: int | None,
        month: Month,
        accept: Callable[[FetchedMonth], T],
    ) -> tuple[FetchedMonth, T]:
        """A month made of the pieces already held (and a new tail not committed yet): its
        record count is the sum of theirs, its first instant that of the first piece."""
        manifests = [m for _, m in held] + ([tail[1]] if tail else [])
        payloads = [p.path for p, _ in held] + ([tail[0]] if tail else [])
        if tail is None:
            metadata = self._cache_hit_metadata(manifests[-1])
            end = pd.Timestamp(manifests[-1]["request_end"])
            through_ns = None if end.value >= month.end_ns else int(end.value)
        else:
            metadata = dict(tail[1])
        counts = [m.get("record_count") for m in manifests]
        metadata.update(
            {
                "pieces": len(payloads),
                "month_request_start": manifests[0]["request_start"],
                "records_in_pieces": sum(int(m.get("records_downloaded", 0)) for m in manifests),
            }
        )
        first = _announced(manifests[0])
        fetched = FetchedMonth(
            payloads=payloads,
            metadata=metadata,
            available_from_ns=first["available_from_ns"],
            announced_records=sum(counts) if all(isinstance(c, int) for c in counts) else None,
            through_ns=through_ns,
        )
        return fetched, accept(fetched)

    def _buy(
        self,
        request: FetchRequest,
        entry: CacheEntry,
        log: Logger,
        accept: Callable[[FetchedMonth], T],
        held: list[tuple[CacheEntry, dict[str, Any]]] | None = None,
    ) -> tuple[FetchedMonth, T]:
        inst, month, schema = request.instrument, request.month, entry.schema
        held = held or []
        what = str(entry)
        availability = self._availability(
            inst.dataset, inst, month, schema, use_cache=False, log=log
        )
        window = self._window(inst, month, availability)
        if request.whole and window.end < month.end:
            raise SourceError(
                _not_fully_available(
                    f"{inst.symbol} {month} ({inst.dataset} {schema})", window.end, month
                )
                + " This run asks for the whole month (as the monthly schedule does): "
                "re-execute it once Databento has published the rest."
            )
        if window.partial_reason:
            log(window.partial_reason)
        if held:
            # Pay only for what is new: from where the last piece ended.
            through = pd.Timestamp(held[-1][1]["request_end"])
            if window.end <= through:
                log(f"{what}: nothing new since {through.isoformat()} (no Databento request)")
                return self._assemble(held, None, None, month, accept)
            window = replace(window, start=through)
            log(f"{what}: {len(held)} piece(s) held up to {through.isoformat()}; buying the rest")
        grows = window.end < month.end or bool(held)  # stored as a piece of the month
        left = self.cache.held_download(
            entry, _asked(inst), window.start.value, window.end.value, log
        )
        if left is not None:  # paid for by a run stopped before it was judged
            pending, target, metadata = left
            cost = float(metadata.get("cost_usd") or 0.0)
            if request.force:  # a forced run's purchase now, its re-executions' too
                metadata["dbn_cache"] = "forced"
                if request.lineage:
                    metadata[FORCED_IN_KEY] = request.lineage
            log(
                f"{what}: using the download of {target} a stopped run paid for and left at "
                f"{pending} (its size and SHA-256 checked); nothing is bought"
            )
        else:
            pending, target, metadata, cost = self._pay(
                request, entry, window, availability, grows, held, log
            )
        through_ns = (
            None
            if pd.Timestamp(metadata["request_end"]) >= month.end
            else int(pd.Timestamp(metadata["request_end"]).value)
        )
        try:
            fetched, accepted = self._assemble(held, (pending, metadata), through_ns, month, accept)
        except DownloadRefused as exc:
            exc.paid_usd = cost
            self._refuse(
                entry,
                pending,
                exc,
                _asked(inst),
                _settings(inst),
                cached=False,
                piece=target,
                held=len(held),
            )
            self.cache.release(pending)
            raise
        try:
            metadata = self.cache.commit(
                pending, target, metadata, str(metadata["sha256"]), _asked(inst)
            )
        except OSError as exc:
            raise LocalIOError(local_io_message(exc, target.path)) from None
        self.cache.release(pending)
        if request.force:  # the accepted download replaces every piece it covers
            kept = {piece for piece, _ in held} | {target}
            for old in self.cache.pieces(entry, checked=False):
                if old not in kept:
                    old.path.unlink(missing_ok=True)
                    old.manifest_path.unlink(missing_ok=True)
        log(
            f"stored {target.path} ({metadata['records_downloaded']:,} records, "
            f"{metadata['dbn_file_bytes']:,} bytes)"
        )
        fetched.payloads[-1] = target.path
        fetched.metadata.update(metadata)
        return fetched, accepted

    def _pay(
        self,
        request: FetchRequest,
        entry: CacheEntry,
        window: MonthWindow,
        availability: Any,
        grows: bool,
        held: list[tuple[CacheEntry, dict[str, Any]]],
        log: Logger,
    ) -> tuple[Path, CacheEntry, dict[str, Any], float]:
        """Buy ``window`` of the month: price it (refusing above the ceiling), download it,
        prove the file whole, and hold it (see :meth:`DbnCache.hold`) under the entry it is
        to become. Returns the held file, that entry, its metadata and the price paid."""
        inst, month, schema = request.instrument, request.month, entry.schema
        what = str(entry)
        query = self._query(inst, window, schema)
        cost = self._call(
            "metadata.get_cost",
            inst,
            month,
            lambda: self._client_().metadata.get_cost(**query),
            log=log,
        )
        cost = float(cost)
        if cost > self.max_cost_usd:
            raise SourceError(
                f"{what}: Databento estimates {format_usd(cost)} for this partition, above the "
                f"ceiling of {format_usd(self.max_cost_usd)} (DBENTO_MAX_COST_USD). Nothing was "
                "downloaded. Raise DBENTO_MAX_COST_USD if the price is expected, and check the "
                "total first with `dbento estimate`."
            )
        billable = int(
            self._call(
                "metadata.get_billable_size",
                inst,
                month,
                lambda: self._client_().metadata.get_billable_size(**query),
                log=log,
            )
        )
        expected = int(
            self._call(
                "metadata.get_record_count",
                inst,
                month,
                lambda: self._client_().metadata.get_record_count(**query),
                log=log,
            )
        )
        log(
            f"{what}: estimated cost ${cost:,.4f}, billable size "
            f"{billable:,} bytes, {expected:,} records"
        )
        if expected == 0 and not held:
            raise SourceError(
                f"Databento has no {schema} records for {inst.symbol} (symbol "
                f"{inst.request_symbol!r}, stype_in {inst.stype_in!r}, dataset {inst.dataset!r}) "
                f"in {month}. An empty month is not stored as complete: check the "
                f"[instruments.{inst.symbol}] entry in {self._catalog_file()}."
            )
        target = entry.with_piece(window.start.value, window.end.value) if grows else entry
        try:
            part, check, attempts = self._download(
                inst, month, window, entry, target, expected, billable, log
            )
        except DownloadRefused as exc:  # a file that arrived, paid for, and was refused
            exc.paid_usd = cost
            self.paid_usd += cost
            raise
        self.paid_usd += cost
        metadata: dict[str, Any] = {
            "source": self.name,
            "dbn_cache": "forced" if request.force else "miss",
            "dataset": inst.dataset,
            "request_symbol": inst.request_symbol,
            "stype_in": inst.stype_in,
            "schema": schema,
            "request_start": window.start.isoformat(),
            "request_end": window.end.isoformat(),
            "available_start": availability.start.isoformat(),
            "available_end": availability.end.isoformat(),
            "partial_month": window.partial_reason is not None,
            "cost_usd": cost,
            "max_cost_usd": self.max_cost_usd,
            "billable_size_bytes": billable,
            "record_count": expected,
            "records_downloaded": check.records,
            "download_attempts": attempts,
            "downloaded_at": pd.Timestamp.now(tz="UTC").isoformat(),
            "gateway": self.gateway,
        }
        if request.force and request.lineage:
            metadata[FORCED_IN_KEY] = request.lineage
        if window.partial_reason:
            metadata["partial_month_reason"] = window.partial_reason
        metadata["sha256"] = check.sha256
        try:
            pending = self.cache.hold(part, target, metadata, check.sha256)
        except OSError as exc:  # the .part goes when the entry's lock is released
            raise LocalIOError(local_io_message(exc, target.path, billable)) from None
        return pending, target, metadata, cost

    def _refuse(
        self,
        entry: CacheEntry,
        data: Path,
        exc: DownloadRefused,
        request: Request,
        settings: dict[str, Any],
        *,
        cached: bool,
        piece: CacheEntry | None = None,
        held: int = 0,
    ) -> None:
        """Quarantine refused data and say where it went (on ``exc.outcome``); remember the
        refusal unless a good cached file stays in place (a refused forced download). A
        refused ``piece`` of a growing month is quarantined and remembered as that piece
        (its window): the ``held`` pieces bought before it stay as they were."""
        named = piece if piece is not None and piece.piece is not None else entry
        judged = data.name.endswith(PENDING_SUFFIX)  # kept with its manifest, to judge again
        moved = self.cache.quarantine(data, named, with_manifest=cached or judged)
        if not cached and entry.path.is_file():
            exc.outcome = (
                f"The new download was quarantined at {moved}; the cached file {entry.path} "
                "was kept unchanged."
            )
            return
        self.cache.remember_refused(named, exc, moved, request, settings)
        what = "cached file" if cached else "download"
        kept = (
            f"; the {held} piece(s) bought before it are kept, and the month stored so far "
            "is unchanged"
            if held
            else ""
        )
        exc.outcome = (
            f"The {what} of {named} was refused, moved to {moved} and not cached{kept}; later "
            f"runs fail at once without paying again, and {FORCE_HINT}."
        )

    def estimate(
        self, instrument: Instrument, month: Month, schema: str = SCHEMA, *, ask: bool = False
    ) -> CostEstimate:
        """Price one partition without downloading it (free calls only; cached: no call,
        unless ``ask``: then Databento prices it even so, as proof that the key works)."""
        final = self.cache_path(instrument.symbol, month, schema)
        entry = self.cache.entry(instrument.symbol, month, schema)
        other = ""  # a cached file bought for another request than the catalog's now
        if final.is_file() and not ask:  # a price, not a read: the run using it verifies it
            manifest = self.cache.manifest_of(entry) or {}
            if _same_request(manifest, instrument):
                return CostEstimate(instrument.symbol, month, cached=True, note=f"cached: {final}")
            bought = _request_of(manifest, instrument)
            other = f"cached for {bought[1]} ({bought[2]}), bought again for {instrument.request}"
        elif not ask:
            whole = f"_{month.tag}.{schema}.dbn.zst"
            parked = [
                p for p in self.cache.parked(entry, _asked(instrument)) if p.name.endswith(whole)
            ]
            reused = (
                parked[0]
                if parked
                else self.cache.elsewhere(entry, lambda found: _bought_for(found, instrument))
            )
            reused = reused or next(iter(self.cache.held_for(entry, _asked(instrument))), None)
            if reused is not None:  # the run uses that file: nothing is bought
                return CostEstimate(
                    instrument.symbol, month, cached=True, note=f"bought before: {reused}"
                )
        try:
            pieces = [] if ask or other else self.cache.pieces(entry)
        except SourceError as exc:
            return CostEstimate(instrument.symbol, month, cached=False, note=str(exc))
        through = (
            pd.Timestamp(pieces[-1].piece[1], tz="UTC") if pieces and pieces[-1].piece else None
        )
        if through is not None and through >= month.end:
            return CostEstimate(
                instrument.symbol, month, cached=True, note=f"cached in {len(pieces)} pieces"
            )
        availability = self._availability(
            instrument.dataset, instrument, month, schema, use_cache=True
        )
        try:
            window = self._window(instrument, month, availability)
        except SourceError as exc:
            return CostEstimate(instrument.symbol, month, cached=False, note=str(exc))
        if through is not None:  # only the tail not bought yet is priced
            if window.end <= through:
                return CostEstimate(
                    instrument.symbol, month, cached=True, note=f"cached up to {through}"
                )
            window = replace(
                window, start=through, partial_reason=f"only the tail from {through.isoformat()}"
            )
        query = self._query(instrument, window, schema)
        cost = float(
            self._call(
                "metadata.get_cost",
                instrument,
                month,
                lambda: self._client_().metadata.get_cost(**query),
            )
        )
        size = int(
            self._call(
                "metadata.get_billable_size",
                instrument,
                month,
                lambda: self._client_().metadata.get_billable_size(**query),
            )
        )
        refused = "" if ask or other else self.cache.refused_message(entry, _asked(instrument))
        if refused:  # a run fails at once without buying it; only a forced one pays
            refused = "refused before: bought only by a forced run (--force)"
        note = "; ".join(text for text in (other, refused, window.partial_reason or "") if text)
        if cost > self.max_cost_usd:
            note = (note + "; " if note else "") + (
                f"above the ceiling {format_usd(self.max_cost_usd)} (DBENTO_MAX_COST_USD)"
            )
        return CostEstimate(instrument.symbol, month, False, cost, size, note)

    # ------------------------------------------------------------------ internals

    def _client_(self) -> databento.Historical:
        if self._client is None:
            # Imported on first use: the client and its HTTP stack cost about 15 MB and 0.3 s
            # in every process that loads the code location, and most never download.
            import databento

            try:
                client = databento.Historical(key=self._key, gateway=self.gateway)
            except ValueError as exc:
                raise SourceError(
                    f"cannot use DBENTO_GATEWAY={self.gateway!r}: {self._scrub(str(exc))}"
                ) from None
            for api in (client.metadata, client.timeseries):
                # The client reads its (connect, read) timeout from this attribute.
                api.TIMEOUT = self.timeout_seconds  # type: ignore[misc]
            self._client = client
        return self._client

    def _catalog_file(self) -> Path:
        return self.catalog_file or catalog_path()

    def _query(self, inst: Instrument, window: MonthWindow, schema: str) -> dict[str, Any]:
        return {
            "dataset": inst.dataset,
            "start": window.start,
            "end": window.end,
            "symbols": [inst.request_symbol],
            "schema": schema,
            "stype_in": inst.stype_in,
        }

    def _availability(
        self,
        dataset: str,
        inst: Instrument,
        month: Month,
        schema: str,
        *,
        use_cache: bool,
        log: Logger | None = None,
    ) -> Availability:
        if use_cache and (dataset, schema) in self._ranges:
            return self._ranges[(dataset, schema)]
        raw = self._call(
            "metadata.get_dataset_range",
            inst,
            month,
            lambda: self._client_().metadata.get_dataset_range(dataset=dataset),
            log=log,
        )
        try:
            schemas = raw.get("schema") or {}
            span = schemas.get(schema) or raw
            found = Availability(dataset, schema, _utc(span["start"]), _utc(span["end"]))
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise SourceError(
                f"Databento's dataset range for {dataset} is not understood ({exc!r})"
            ) from None
        self._ranges[(dataset, schema)] = found
        return found

    def _window(self, inst: Instrument, month: Month, avail: Availability) -> MonthWindow:
        what = f"{inst.symbol} {month} ({inst.dataset} {avail.schema})"
        if month.end <= avail.start:
            raise SourceError(
                f"{what}: the month lies wholly before the dataset's start "
                f"({avail.start.isoformat()}); nothing to download. Move start_month in "
                f"{self._catalog_file()} to {avail.start.strftime('%Y-%m')} or later."
            )
        # A piece ends on a whole bar of its schema: a bar stamped before the end but still
        # open at it would be missing from this piece and from the next one.
        end = avail.end.floor(BAR_INTERVAL[avail.schema])
        if month.end > avail.end and end > max(month.start, avail.start):
            # The current month (1-second bars and the vendor's 1-minute bars alike): what
            # Databento serves so far, stored partial, a piece of the month.
            return MonthWindow(
                start=max(month.start, avail.start),
                end=end,
                partial_reason=(
                    f"{what}: the month has not closed yet; downloading up to "
                    f"{end.isoformat()} (Databento's available end), stored partial"
                )
                if avail.start <= month.start
                else (
                    f"{what}: the dataset starts mid-month at {avail.start.isoformat()} and the "
                    f"month has not closed yet; downloading up to {end.isoformat()}"
                ),
            )
        if month.end > avail.end:
            raise SourceError(
                _not_fully_available(what, avail.end, month)
                + " Materialize it once the month is complete."
            )
        if avail.start > month.start:
            return MonthWindow(
                start=avail.start,
                end=month.end,
                partial_reason=(
                    f"{what}: the dataset starts mid-month at {avail.start.isoformat()}; "
                    "downloading from there (there are no bars before it)"
                ),
            )
        return MonthWindow(start=month.start, end=month.end)

    def _download(
        self,
        inst: Instrument,
        month: Month,
        window: MonthWindow,
        entry: CacheEntry,
        target: CacheEntry,
        expected: int,
        billable: int,
        log: Logger,
    ) -> tuple[Path, DbnFileCheck, int]:
        """Pay for ``get_range`` into a temporary file of ``entry`` and prove the file whole;
        the caller owns the returned file (to become ``target``: the month, or one piece of
        it). Only network faults and cut streams are retried."""
        attempts = 0
        schema = entry.schema

        def attempt() -> tuple[Path, DbnFileCheck]:
            nonlocal attempts
            attempts += 1
            part = self.cache.new_part(entry)
            log(f"downloading {entry} to {part.name} (attempt {attempts})")
            keep = False
            try:
                local: OSError | None = None
                try:
                    store = self._client_().timeseries.get_range(
                        **self._query(inst, window, schema), path=part
                    )
                    del store  # the client's DBNStore keeps the file open
                except Exception as exc:
                    local = local_os_error(exc)
                    if local is None:
                        raise
                    local.__traceback__ = local.__context__ = None  # free the client's frames
                if local is not None:
                    # Out of the except block, the client's file is closed: removing it now
                    # frees its space before the message measures what is free.
                    part.unlink(missing_ok=True)
                    local.filename = None  # name the entry, not its temporary file
                    raise LocalIOError(local_io_message(local, entry.path, billable))
                try:
                    check = check_dbn_file(part, window.start.value, window.end.value, schema)
                except TruncatedDbn as exc:
                    raise _Transient(f"truncated download: {exc}") from None
                except DbnError as exc:
                    refusal = DownloadRefused(
                        f"Databento's {schema} answer for {inst.symbol} {month} is not usable "
                        f"({exc}).",
                        rules=["the DBN file check"],
                    )
                    held = len(self.cache.pieces(entry, checked=False)) if target.piece else 0
                    self._refuse(
                        entry,
                        part,
                        refusal,
                        _asked(inst),
                        _settings(inst),
                        cached=False,
                        piece=target,
                        held=held,
                    )
                    raise refusal from None
                if check.records < expected:
                    raise _Transient(
                        f"truncated download: {check.records:,} records received, "
                        f"{expected:,} announced"
                    )
                keep = True
                return part, check
            finally:
                if not keep:
                    part.unlink(missing_ok=True)

        part, check = self._call("timeseries.get_range", inst, month, attempt, log=log)
        return part, check, attempts

    def _call(
        self,
        what: str,
        inst: Instrument,
        month: Month,
        fn: Callable[[], T],
        log: Logger | None = None,
    ) -> T:
        """Run one API call under the retry policy (tenacity); faults become SourceError."""

        import databento  # on first use, as in _client_
        import requests

        def classified() -> T:
            try:
                return fn()
            except (_Transient, SourceError):
                raise
            except databento.BentoClientError as exc:
                raise self._client_fault(exc, what, inst, month) from None
            except databento.BentoServerError as exc:
                raise _Transient(f"HTTP {exc.http_status} {self._detail(exc)}") from None
            except (databento.BentoError, requests.RequestException, ConnectionError) as exc:
                raise _Transient(f"{type(exc).__name__}: {self._scrub(str(exc))}") from None

        def wait(state: tenacity.RetryCallState) -> float:
            fault = state.outcome.exception() if state.outcome is not None else None
            if isinstance(fault, _Transient) and fault.retry_after is not None:
                return min(fault.retry_after, self.retry.retry_after_max_seconds)
            return self.retry.backoff(state.attempt_number, self._rng)

        def before_sleep(state: tenacity.RetryCallState) -> None:
            fault = state.outcome.exception() if state.outcome is not None else None
            if log is not None:
                log(f"{what} failed ({fault}); retrying in {state.upcoming_sleep:.2f}s")

        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.retry.max_attempts),
            wait=wait,
            retry=tenacity.retry_if_exception_type(_Transient),
            sleep=self._sleep,
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            return retrying(classified)
        except _Transient as exc:
            raise SourceError(
                f"{what} for {inst.symbol} {month} failed {self.retry.max_attempts} times; "
                f"giving up. Last error: {exc.reason}. Nothing was cached; materialize again "
                "later."
            ) from None

    def _client_fault(
        self, exc: BentoClientError, what: str, inst: Instrument, month: Month
    ) -> _Transient:
        status = exc.http_status
        detail = self._detail(exc)
        if status == 429:
            return _Transient(f"HTTP 429 {detail}", retry_after=_retry_after(exc.headers))
        if status in RETRYABLE_STATUS:
            return _Transient(f"HTTP {status} {detail}")
        if status in (401, 403):
            raise SourceError(
                f"Databento rejected the API key (HTTP {status}: {detail}) during {what}. "
                "Check DATABENTO_API_KEY in the project's dbento.env (or your environment; the "
                "key is not shown here), that it is active, and that it is entitled to the "
                "dataset. Not retried."
            ) from None
        raise SourceError(
            f"Databento refused {what} for {inst.symbol} {month} (HTTP {status}: {detail}): "
            f"symbol {inst.request_symbol!r}, dataset {inst.dataset!r}, stype_in "
            f"{inst.stype_in!r}. Check the [instruments.{inst.symbol}] entry in "
            f"{self._catalog_file()}. Not retried."
        ) from None

    def _detail(self, exc: BentoClientError | BentoServerError) -> str:
        body = exc.json_body if isinstance(exc.json_body, dict) else {}
        detail = body.get("detail")
        if isinstance(detail, dict):
            text = f"{detail.get('case', '')}: {detail.get('message', '')}".strip(": ")
        elif detail:
            text = str(detail)
        else:
            text = exc.message or ""
        return self._scrub(str(text)) or "<no message>"

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "<redacted>") if self._key else text

    def _cache_hit_metadata(self, manifest: dict[str, Any]) -> dict[str, Any]:
        metadata = dict(manifest)
        if "cost_usd" in metadata:
            metadata["original_cost_usd"] = metadata["cost_usd"]
        metadata.update({"source": self.name, "dbn_cache": "hit", "cost_usd": 0.0})
        return metadata


FORCED_IN_KEY = "forced_in_run"  # the root run of the forced run that bought a file


def _utc(value: Any) -> pd.Timestamp:
    stamp = pd.Timestamp(value)
    return stamp.tz_convert("UTC") if stamp.tzinfo else stamp.tz_localize("UTC")


def _retry_after(headers: Any) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date)."""
    raw = None
    with contextlib.suppress(AttributeError, TypeError):
        raw = headers.get("Retry-After")
    if raw is None:
        return None
    text = str(raw).strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _not_fully_available(what: str, end: pd.Timestamp, month: Month) -> str:
    return (
        f"{what}: the month is not fully available yet: Databento has data up to "
        f"{end.isoformat()} (exclusive) and the month ends {month.end.isoformat()}. Nothing "
        "was downloaded or written."
    )


def format_usd(amount: float) -> str:
    """Dollars: whole cents as such, any other amount to 1/100 of a cent (Databento prices
    small requests in fractions of a cent), so a price just above a ceiling never reads as
    the ceiling itself."""
    return f"${amount:,.2f}" if amount >= 1 and round(amount, 2) == amount else f"${amount:,.4f}"


def _request_of(manifest: dict[str, Any], inst: Instrument) -> tuple[str, str, str]:
    """(dataset, symbol as sent, stype_in) a cached file was bought for (an early manifest
    without them: the instrument's)."""
    stype = str(manifest.get("stype_in") or inst.stype_in)
    symbol = str(manifest.get("request_symbol") or inst.request_symbol)
    return str(manifest.get("dataset") or inst.dataset), sent_symbol(symbol, stype), stype


def _settings(inst: Instrument) -> dict[str, Any]:
    """The catalog settings a month is judged under, besides its request: a refusal under
    others is judged again (see :meth:`DbnCache.judge_again`)."""
    return {"negative_prices": inst.negative_prices}


def _asked(inst: Instrument) -> tuple[str, str, str]:
    """(dataset, symbol as sent, stype_in): what the catalog asks Databento for ``inst``."""
    return inst.dataset, sent_symbol(inst.request_symbol, inst.stype_in), inst.stype_in


def _bought_for(manifest: dict[str, Any], inst: Instrument) -> bool:
    """Whether another symbol's cached file says it was bought for exactly what the catalog
    asks for ``inst``: a manifest that does not say (a file of earlier versions) never is."""
    if not all(manifest.get(key) for key in ("dataset", "request_symbol", "stype_in")):
        return False
    return _same_request(manifest, inst)


def _same_request(manifest: dict[str, Any], inst: Instrument) -> bool:
    """Whether a cached file was bought for what the catalog asks for ``inst``, compared as
    Databento reads it (a symbol spelled otherwise is the same request)."""
    return _request_of(manifest, inst) == _asked(inst)
