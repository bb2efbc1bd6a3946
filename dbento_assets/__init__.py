"""dbento_assets: a Dagster code location for Databento 1-second OHLCV bars.

It buys ohlcv-1s bars month by month, aggregates them to the catalog's timeframes, validates
them with Pandera asset checks and stores them as Parquet or CSV. ``defs`` (the code
location's Definitions, from :mod:`dbento_assets.definitions`) is loaded lazily on first
access, so ``dagster asset materialize -m dbento_assets`` finds it while importing the pure
bar logic in :mod:`dbento_assets.core` never imports Dagster.
"""

from __future__ import annotations

from typing import Any

__all__ = ["defs"]


def __getattr__(name: str) -> Any:
    if name == "defs":
        try:
            from dbento_assets.definitions import defs
        except AttributeError as exc:
            # An AttributeError escaping here would read as "no attribute defs", and Dagster
            # would report "No Definitions found" instead of the real problem.
            raise ImportError(f"loading dbento_assets.definitions failed: {exc}") from exc
        return defs
    raise AttributeError(f"module 'dbento_assets' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), "defs"])
