"""Month windows: the half-open UTC interval ``[first instant of month, first of next)``.

Databento's ``end`` is exclusive, and every bar is stamped at its open, so a month is exactly
``[YYYY-MM-01T00:00Z, next month's 01T00:00Z)``. Ending at ``23:59:59`` would silently drop
the last second of each month; this module is the one place that computes the window.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pandas as pd

_MONTH = re.compile(r"^(\d{4})-(\d{2})(?:-01)?$")


@dataclass(frozen=True, order=True)
class Month:
    """A calendar month in UTC."""

    year: int
    month: int

    def __post_init__(self) -> None:
        if not 1 <= self.month <= 12:
            raise ValueError(f"month must be 1..12, got {self.month}")

    @classmethod
    def parse(cls, text: str) -> Month:
        """Parse ``2024-01`` or ``2024-01-01`` (the Dagster partition spelling)."""
        match = _MONTH.match(str(text).strip())
        if not match:
            raise ValueError(f"month {text!r} is not YYYY-MM (or YYYY-MM-01)")
        return cls(int(match.group(1)), int(match.group(2)))

    @property
    def start(self) -> pd.Timestamp:
        return pd.Timestamp(year=self.year, month=self.month, day=1, tz="UTC")

    @property
    def end(self) -> pd.Timestamp:
        """The first instant of the next month (exclusive end)."""
        return self.next().start

    def next(self) -> Month:
        return Month(self.year + self.month // 12, self.month % 12 + 1)

    def previous(self) -> Month:
        return Month(self.year - (self.month == 1), (self.month - 2) % 12 + 1)

    @property
    def start_ns(self) -> int:
        return int(self.start.value)

    @property
    def end_ns(self) -> int:
        return int(self.end.value)

    @property
    def key(self) -> str:
        """The Dagster month partition key, ``2024-01-01``."""
        return f"{self.year:04d}-{self.month:02d}-01"

    @property
    def tag(self) -> str:
        """The file-name spelling, ``2024_01``."""
        return f"{self.year:04d}_{self.month:02d}"

    def __str__(self) -> str:
        return f"{self.year:04d}-{self.month:02d}"


def month_range(first: Month, last: Month) -> list[Month]:
    """All months from ``first`` to ``last`` inclusive."""
    out: list[Month] = []
    current = first
    while current <= last:
        out.append(current)
        current = current.next()
    return out


def instant_text(iso: str) -> str:
    """An instant (ISO 8601) as a listing shows it: ``2024-03-17`` at midnight UTC, else
    ``2026-12-01 14:45:30 UTC`` (a date alone would hide the hours a file holds)."""
    try:
        stamp = pd.Timestamp(iso)
    except ValueError:
        return iso
    if stamp is pd.NaT:
        return iso or "?"
    stamp = stamp.tz_convert("UTC") if stamp.tzinfo else stamp.tz_localize("UTC")
    if stamp == stamp.normalize():
        return stamp.strftime("%Y-%m-%d")
    return stamp.strftime("%Y-%m-%d %H:%M:%S UTC")
