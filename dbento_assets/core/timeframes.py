"""Timeframe parsing: turn a user's ``"15s"`` / ``"1min"`` / ``"1h"`` into whole seconds.

A timeframe names the width of an aggregated bar. It must be a whole number of seconds,
greater than one second (the raw bars are already 1s), and must divide a day evenly so that
epoch-aligned bins never straddle midnight UTC and therefore never straddle a month. The
canonical label (used in asset names and file names) is the largest unit that expresses the
width exactly: ``60s`` becomes ``1min``, ``3600s`` becomes ``1h``, ``90s`` stays ``90s``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

SECONDS_PER_DAY = 86_400
_UNITS: dict[str, int] = {"s": 1, "sec": 1, "min": 60, "h": 3600}
_PATTERN = re.compile(r"^\s*(\d+)\s*([A-Za-z]+)\s*$")
_LEGACY = {"S": "s", "T": "min", "H": "h"}


class TimeframeError(ValueError):
    """A timeframe string that cannot be used for bars."""


@dataclass(frozen=True, order=True)
class Timeframe:
    """A bar width in whole seconds, with its canonical label (``15s``, ``1min``, ``1h``)."""

    seconds: int

    @property
    def label(self) -> str:
        for unit, size in (("h", 3600), ("min", 60)):
            if self.seconds % size == 0:
                return f"{self.seconds // size}{unit}"
        return f"{self.seconds}s"

    @property
    def nanos(self) -> int:
        return self.seconds * 1_000_000_000

    @property
    def pandas_freq(self) -> str:
        """The pandas offset alias (pandas 3 spelling: ``15s``, ``1min``, ``1h``)."""
        return self.label

    def __str__(self) -> str:
        return self.label


def finest_first(timeframes: Iterable[Timeframe]) -> list[Timeframe]:
    """``timeframes`` once each, finest first: each after the finer ones it may be built and
    reconciled from."""
    return sorted(set(timeframes), key=lambda tf: tf.nanos)


def parse_timeframe(text: str) -> Timeframe:
    """Parse ``"<integer><unit>"`` with unit ``s``, ``min`` or ``h``; raise TimeframeError."""
    if not isinstance(text, str):
        raise TimeframeError(f"timeframe must be a string like '15s' or '1min', got {text!r}")
    match = _PATTERN.match(text)
    if not match:
        raise TimeframeError(
            f"timeframe {text!r} is not '<whole number><unit>' with unit s, min or h "
            "(for example '15s', '1min', '1h')"
        )
    count, unit = int(match.group(1)), match.group(2)
    if unit in _LEGACY:
        raise TimeframeError(
            f"timeframe {text!r} uses the old pandas alias {unit!r}; write "
            f"'{count}{_LEGACY[unit]}' instead"
        )
    if unit not in _UNITS:
        raise TimeframeError(f"timeframe {text!r} has unknown unit {unit!r}; use s, min or h")
    seconds = count * _UNITS[unit]
    if seconds <= 1:
        raise TimeframeError(
            f"timeframe {text!r} must be longer than 1s: the raw bars are already 1 second"
        )
    if SECONDS_PER_DAY % seconds != 0:
        raise TimeframeError(
            f"timeframe {text!r} ({seconds}s) does not divide a day (86400s) evenly, so its "
            "bars would straddle midnight and month boundaries; pick e.g. 45s, 2min or 5min"
        )
    return Timeframe(seconds)


def parse_timeframes(texts: list[str]) -> list[Timeframe]:
    """Parse a list of timeframes, refusing duplicates such as ``60s`` next to ``1min``."""
    parsed: list[Timeframe] = []
    for text in texts:
        tf = parse_timeframe(text)
        if tf in parsed:
            raise TimeframeError(f"timeframe {text!r} is listed twice (as {tf.label})")
        parsed.append(tf)
    return parsed
