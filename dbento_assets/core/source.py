"""The source interface: "the ohlcv-1s records of this instrument for this month, as DBN".

Every place bars can come from (the embedded demo generator, Databento's historical API, a
folder of DBN files bought through the batch portal) implements :class:`MonthSource`. A source
returns DBN payloads (bytes or file paths) and never decodes them itself, so all data takes
the one decoding path in :mod:`dbento_assets.core.dbn`. Sources raise :class:`SourceError`
with a message written for the person running the job.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from dbento_assets.core.catalog import Instrument
from dbento_assets.core.dbn import DbnPayload
from dbento_assets.core.months import Month

SYNTHETIC = "synthetic"
VENDOR = "databento"
SOURCE_ORIGINS: dict[str, str] = {"demo": SYNTHETIC, "databento": VENDOR, "dbn": VENDOR}

Logger = Callable[[str], None]


class SourceError(RuntimeError):
    """A month that cannot be fetched, with a message a user can act on."""


@dataclass(frozen=True)
class FetchRequest:
    """One partition's question to a source."""

    instrument: Instrument
    month: Month
    force: bool = False


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


class MonthSource(Protocol):
    """Anything that can answer a :class:`FetchRequest` with DBN."""

    name: str

    def fetch(self, request: FetchRequest, log: Logger) -> FetchedMonth: ...


def origin_of(source_name: str) -> str:
    """``synthetic`` for the demo source, ``databento`` for real data; a data root holds one."""
    try:
        return SOURCE_ORIGINS[source_name]
    except KeyError:
        raise SourceError(
            f"DBENTO_SOURCE={source_name!r} is not a source; use one of {', '.join(SOURCE_ORIGINS)}"
        ) from None
