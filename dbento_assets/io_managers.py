"""The IO manager that keeps bar frames as Parquet or CSV files under the data root.

``raw_1s_bars`` goes to ``<root>/raw_1s/<SYM>/<SYM>_<YYYY>_<MM>.<fmt>`` and each
``bars_<tf>`` to ``<root>/aggregated/<tf>/<SYM>_<YYYY>_<MM>_<tf>.<fmt>``. All file work
(atomic writes, formats, the one-origin-per-root rule) lives in
:mod:`dbento_assets.core.storage`; this module maps asset keys and partitions to paths and
records what the UI shows for every materialization: rows, first and last bar, path, size,
source (synthetic demo data is marked as such) and the column schema.
"""

from __future__ import annotations

import os

import pandas as pd
from dagster import (
    AssetKey,
    ConfigurableIOManager,
    InputContext,
    MetadataValue,
    OutputContext,
    TableColumn,
    TableSchema,
)
from upath import UPath

from dbento_assets.core.bars import COLUMNS, DTYPES
from dbento_assets.core.source import SYNTHETIC, origin_of
from dbento_assets.core.storage import BarStore
from dbento_assets.core.timeframes import parse_timeframe
from dbento_assets.partitions import split_partition_key

RAW_ASSET = "raw_1s_bars"
BARS_PREFIX = "bars_"
BAR_SCHEMA = TableSchema(
    columns=[TableColumn(name, str(DTYPES[name])) for name in COLUMNS],
)


def source_label(source: str) -> str:
    """How the UI names a source; demo data is unmistakably marked synthetic."""
    if origin_of(source) == SYNTHETIC:
        return "demo (SYNTHETIC data, not market data)"
    return source


class BarFileIOManager(ConfigurableIOManager):
    """Stores bar frames as files under ``data_dir`` (a folder or fsspec URL)."""

    data_dir: str = "./data"
    fmt: str = "parquet"
    source: str = "databento"

    @property
    def store(self) -> BarStore:
        return BarStore.at(self.data_dir, self.fmt)

    def path_for(self, asset_key: AssetKey, partition: str) -> UPath:
        """The file of one asset partition."""
        month, symbol = split_partition_key(partition)
        name = asset_key.path[-1]
        if name == RAW_ASSET:
            return self.store.raw_path(symbol, month)
        if name.startswith(BARS_PREFIX):
            timeframe = parse_timeframe(name.removeprefix(BARS_PREFIX))
            return self.store.aggregated_path(symbol, month, timeframe)
        raise ValueError(f"BarFileIOManager does not store asset {asset_key.to_user_string()}")

    def handle_output(self, context: OutputContext, obj: pd.DataFrame) -> None:
        store = self.store
        store.claim(origin_of(self.source), self.source)
        path = self.path_for(context.asset_key, context.asset_partition_key)
        size = store.write(obj, path)
        context.add_output_metadata(bar_file_metadata(obj, path, size, self.source))

    def load_input(self, context: InputContext) -> pd.DataFrame:
        return self.store.read(self.path_for(context.asset_key, context.asset_partition_key))


def bar_file_metadata(
    frame: pd.DataFrame, path: UPath, size: int, source: str
) -> dict[str, object]:
    """The metadata recorded with every bar file."""
    first = frame["ts_event"].iloc[0].isoformat() if len(frame) else "none"
    last = frame["ts_event"].iloc[-1].isoformat() if len(frame) else "none"
    location = os.fspath(path.path) if path.protocol in ("", "file", "local") else str(path)
    return {
        "dagster/row_count": len(frame),
        "dagster/column_schema": BAR_SCHEMA,
        "first_bar": first,
        "last_bar": last,
        "path": MetadataValue.path(location),
        "size_bytes": size,
        "source": source_label(source),
    }
