"""The asset graph: ``raw_1s_bars`` per symbol-month, then one ``bars_<tf>`` per timeframe.

``raw_1s_bars`` asks the configured source (demo, Databento API or local DBN files, see
:mod:`dbento_assets.resources`) for the partition's ohlcv-1s DBN and decodes it through the
one decoding path in :mod:`dbento_assets.core.dbn`. There is one ``bars_<tf>`` asset per
catalog timeframe (adding ``5min`` to the catalog adds ``bars_5min``); one step builds all
of them from a single read of the raw month (:func:`build_bars_assets`). Downloads run in
the Dagster pool ``databento`` so a backfill never opens more concurrent API requests than
the pool allows. Force a re-download with the run tag
``dbento/force=true`` or the run config ``force: true``.
"""

from collections.abc import Iterator

import pandas as pd
from dagster import (
    AssetExecutionContext,
    AssetIn,
    AssetOut,
    AssetsDefinition,
    Config,
    MultiPartitionsDefinition,
    Output,
    asset,
    multi_asset,
)

from dbento_assets.core.aggregate import aggregate_bars
from dbento_assets.core.catalog import Catalog
from dbento_assets.core.dbn import decode_month
from dbento_assets.core.source import FetchRequest, origin_of
from dbento_assets.core.storage import BarStore
from dbento_assets.core.timeframes import Timeframe
from dbento_assets.io_managers import BARS_PREFIX, RAW_ASSET
from dbento_assets.partitions import build_partitions, split_partition_key
from dbento_assets.resources import DatabentoResource

FORCE_TAG = "dbento/force"
DOWNLOAD_POOL = "databento"
RAW_GROUP = "raw"
BARS_GROUP = "aggregated"


class RawBarsConfig(Config):
    """Run config of ``raw_1s_bars``."""

    force: bool = False
    """Download again even if the month is in the DBN cache (costs money)."""


def force_requested(context: AssetExecutionContext, config: RawBarsConfig) -> bool:
    """Force from run config or from the ``dbento/force`` run tag (as the UI sets it)."""
    tag = context.run.tags.get(FORCE_TAG, "").strip().lower()
    return config.force or tag in ("true", "1", "yes")


def build_raw_asset(catalog: Catalog, partitions: MultiPartitionsDefinition) -> AssetsDefinition:
    """The ``raw_1s_bars`` asset for a catalog."""

    @asset(
        name=RAW_ASSET,
        partitions_def=partitions,
        group_name=RAW_GROUP,
        pool=DOWNLOAD_POOL,
        kinds={"databento", "pandas"},
        description=(
            "Databento ohlcv-1s bars of one symbol for one UTC month, each stamped at its "
            "open; a second without a trade has no bar. Decoded from DBN."
        ),
    )
    def raw_1s_bars(
        context: AssetExecutionContext, config: RawBarsConfig, databento: DatabentoResource
    ) -> pd.DataFrame:
        month, symbol = split_partition_key(context.partition_key)
        instrument = catalog.instrument(symbol)
        # Refuse a data root of the other origin before anything is fetched or paid for.
        BarStore.at(databento.data_dir).claim(origin_of(databento.source), databento.source)
        request = FetchRequest(instrument, month, force=force_requested(context, config))
        fetched = databento.month_source().fetch(request, context.log.info)
        decoded = decode_month(fetched.payloads, symbol, month, fetched.instrument_ids)
        bars = decoded.bars
        rolls = sorted({int(i) for i in bars["instrument_id"].unique()}) if len(bars) else []
        context.add_output_metadata(
            {
                "dataset": instrument.dataset,
                "request_symbol": f"{instrument.request_symbol} ({instrument.stype_in})",
                "window": f"[{month.start.isoformat()}, {month.end.isoformat()})",
                "records_decoded": decoded.records_read,
                "instrument_ids": ", ".join(map(str, rolls)) or "none",
                "forced": request.force,
                **{f"source_{k}": _plain(v) for k, v in fetched.metadata.items()},
            }
        )
        return bars

    return raw_1s_bars


def build_bars_assets(
    timeframes: list[Timeframe], partitions: MultiPartitionsDefinition
) -> AssetsDefinition:
    """The aggregated assets, one ``bars_<label>`` per timeframe, computed in one step.

    They are separate assets in the graph (each with its own file, checks and history, and
    each can be materialized alone), but one step builds all those selected from a single
    read of ``raw_1s_bars``, instead of one process reading the same month per timeframe.
    """
    by_name = {f"{BARS_PREFIX}{tf.label}": tf for tf in timeframes}

    @multi_asset(
        name="aggregate_bars",
        partitions_def=partitions,
        can_subset=True,
        ins={"raw": AssetIn(RAW_ASSET)},
        outs={
            name: AssetOut(
                group_name=BARS_GROUP,
                kinds={"pandas"},
                is_required=False,
                description=(
                    f"{tf.label} OHLCV bars aggregated from raw_1s_bars: UTC epoch-aligned, "
                    "labelled at the bar open, one instrument per bar, no bar for an empty "
                    "interval."
                ),
            )
            for name, tf in by_name.items()
        },
    )
    def _bars(context: AssetExecutionContext, raw: pd.DataFrame) -> Iterator[Output]:
        for key in context.selected_asset_keys:
            name = key.path[-1]
            yield Output(aggregate_bars(raw, by_name[name]), output_name=name)

    return _bars


def build_assets(catalog: Catalog) -> list[AssetsDefinition]:
    """All assets of a catalog: ``raw_1s_bars``, then one ``bars_<tf>`` per timeframe."""
    partitions = build_partitions(catalog)
    return [
        build_raw_asset(catalog, partitions),
        build_bars_assets(catalog.timeframes, partitions),
    ]


def _plain(value: object) -> object:
    """Metadata values Dagster accepts as they are; anything else as text."""
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)
