"""Asset names: ``raw_1s_bars`` and one ``bars_<tf>`` per catalog timeframe (and the monthly
job's name).

The one module that builds an asset name from a timeframe or reads the timeframe back from a
name; every other module asks here.
"""

from __future__ import annotations

from dagster import AssetKey

from dbento_assets.core.timeframes import Timeframe, parse_timeframe

RAW_ASSET = "raw_1s_bars"
RAW_KEY = AssetKey(RAW_ASSET)
BARS_PREFIX = "bars_"
CATALOG_METADATA_KEY = "dbento/catalog"  # the Definitions' metadata: its catalog file
MONTHLY_JOB = "monthly_bars_job"  # the job of the monthly schedule: raw and bars of a month


def bars_asset_name(timeframe: Timeframe) -> str:
    """``bars_15s``, ``bars_1min``, ...: the asset of a timeframe."""
    return f"{BARS_PREFIX}{timeframe.label}"


def timeframe_of(asset_name: str) -> Timeframe | None:
    """The timeframe of a ``bars_<tf>`` asset, None for ``raw_1s_bars``; a ValueError for a
    name that is neither."""
    if asset_name == RAW_ASSET:
        return None
    if asset_name.startswith(BARS_PREFIX):
        return parse_timeframe(asset_name.removeprefix(BARS_PREFIX))
    raise ValueError(f"{asset_name!r} is not an asset of this project")
