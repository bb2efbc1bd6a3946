"""The source interface: "the ohlcv-1s records of this instrument for this month, as DBN".

Every place bars can come from (the embedded demo generator, Databento's historical API, a
folder of DBN files bought through the batch portal) implements :class:`MonthSource`. A source
returns DBN payloads (bytes or file paths) and never decodes them itself, so all data takes
the one decoding path in :mod:`dbento_assets.core.dbn`. Sources raise :class:`SourceError`
with a message written for the person running the job. :func:`fetch_accepted` is how a
caller hands a source its ``accept`` step (decode and check the data): a source with a paid
cache (the Databento API) runs it before the data enters the cache; the others return their
payloads and the step runs on them afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from dbento_assets.core.catalog import Instrument
from dbento_assets.core.dbn import DbnPayload
from dbento_assets.core.months import Month

if TYPE_CHECKING:  # coverage imports this module
    from dbento_assets.core.coverage import VendorMonth

SYNTHETIC = "synthetic"
VENDOR = "databento"
SOURCE_ORIGINS: dict[str, str] = {"demo": SYNTHETIC, "databento": VENDOR, "dbn": VENDOR}

Logger = Callable[[str], None]
T = TypeVar("T")


class SourceError(RuntimeError):
    """A month that cannot be fetched, with a message a user can act on."""


class DownloadRefused(SourceError):
    """Data that must not become a cache entry or a month (raised by an ``accept`` callable or
    by the file check). ``rules`` names what refused it; ``results`` carries whatever the
    caller wants back (the asset's check results); the cache adds ``outcome``, a sentence on
    where the data went, and ``paid_usd``, what the refused download cost (0: none bought)."""

    def __init__(self, message: str, rules: list[str], results: Any = None) -> None:
        super().__init__(message)
        self.rules = rules
        self.results = results
        self.outcome = ""
        self.paid_usd = 0.0

    def __str__(self) -> str:
        return f"{self.args[0]} {self.outcome}".strip()


NO_KEY_MESSAGE = (
    "DBENTO_SOURCE=databento needs a Databento API key and none is set. Put "
    "DATABENTO_API_KEY=db-... in the dbento.env file of the project folder (or in the "
    "environment), then reload the code location; or try the pipeline without an account "
    "with DBENTO_SOURCE=demo (synthetic data)."
)


@dataclass(frozen=True)
class FetchRequest:
    """One partition's question to a source."""

    instrument: Instrument
    month: Month
    force: bool = False
    # Store the month only whole: a source holding part of it (Databento late with a month
    # that has closed) refuses it, buying nothing, instead of storing it partial.
    whole: bool = False
    # A force that renews even a month held in pieces none of which was refused (asked for
    # the vendor's 1-minute bars alone); otherwise such a force keeps them, buys the rest.
    renew_pieces: bool = False
    # DBN files an earlier run recorded buying this month into (another data or cache
    # folder, say): used again, once verified, instead of buying the month again.
    bought_before: tuple[str, ...] = ()
    # The runs a force belongs to (Dagster's root run id): a re-execution or retry of a
    # forced run does not buy again what a run of the same lineage bought already.
    lineage: str | None = None


@dataclass
class FetchedMonth:
    """A source's answer: DBN payloads plus facts worth showing in the UI."""

    payloads: list[DbnPayload]
    instrument_ids: frozenset[int] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    # The dataset's first instant when it starts inside the month (Databento says so): the
    # payloads then need to cover the month only from there. None: the whole month.
    available_from_ns: int | None = None
    # How many records the payloads hold, when the server announced it (Databento's
    # metadata.get_record_count); None when nobody announced a count (DBN files do not).
    announced_records: int | None = None
    # The end of what the payloads cover when the month has not closed yet (the current
    # month, up to the source's available end, exclusive); None: the whole month.
    through_ns: int | None = None

    @property
    def complete(self) -> bool:
        """Whether the payloads cover the month to its end (a partial month never is)."""
        return self.through_ns is None


class MonthSource(Protocol):
    """Anything that can answer a :class:`FetchRequest` with DBN."""

    name: str

    # Whether the user asked for the vendor comparison: then comparing nothing is a warning.
    vendor_requested: bool

    # What its downloads have cost so far: every file that arrived, refused ones included
    # (0 for a source that buys nothing). A step tells what it paid from the difference.
    paid_usd: float

    def fetch(self, request: FetchRequest, log: Logger) -> FetchedMonth: ...

    def cache_folder(self, symbol: str, month: Month) -> Path | None:
        """The local folder its downloads of a symbol-month are kept in (None: it buys nothing)."""
        ...

    def vendor_bars(self, request: FetchRequest, log: Logger) -> VendorMonth | str:
        """Databento's own ohlcv-1m bars of the partition, or why there are none to compare."""
        ...


@runtime_checkable
class AcceptingSource(Protocol):
    """A source that checks data with the caller's ``accept`` before it keeps it."""

    def fetch_accepted(
        self, request: FetchRequest, log: Logger, accept: Callable[[FetchedMonth], T]
    ) -> tuple[FetchedMonth, T]: ...


def fetch_accepted(
    source: MonthSource, request: FetchRequest, log: Logger, accept: Callable[[FetchedMonth], T]
) -> tuple[FetchedMonth, T]:
    """Fetch a month and ``accept`` it (``accept`` raises to refuse the data), in the order the
    source needs: inside the source when it keeps what it fetched, else right after."""
    if isinstance(source, AcceptingSource):
        return source.fetch_accepted(request, log, accept)
    fetched = source.fetch(request, log)
    return fetched, accept(fetched)


def origin_of(source_name: str) -> str:
    """``synthetic`` for the demo source, ``databento`` for real data; a data root holds one."""
    try:
        return SOURCE_ORIGINS[source_name]
    except KeyError:
        raise SourceError(
            f"DBENTO_SOURCE={source_name!r} is not a source; use one of {', '.join(SOURCE_ORIGINS)}"
        ) from None
