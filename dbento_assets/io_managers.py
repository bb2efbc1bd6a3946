"""The IO manager that keeps bar frames as Parquet or CSV files under the data root.

It maps an asset and partition to its file (the file work itself is
:mod:`dbento_assets.core.storage`), writes each file with its ``FileIdentity`` (for raw also
the covered windows and the proof its blocking rules passed), clears a month's refusal note
when a good raw file is written, and records what the UI shows for each materialization.
"""

# No ``from __future__ import annotations`` here: Dagster reads the IO manager's
# ``ResourceDependency`` annotation when the class is created, and a string would hide it.
import os
from collections.abc import Callable, Mapping
from dataclasses import replace

import pandas as pd
from dagster import (
    AssetKey,
    ConfigurableIOManager,
    Failure,
    InitResourceContext,
    InputContext,
    MetadataValue,
    OutputContext,
    ResourceDependency,
    TableColumn,
    TableSchema,
)
from pydantic import Field
from upath import UPath

from dbento_assets.core.bars import COLUMNS, DTYPES
from dbento_assets.core.catalog import Instrument
from dbento_assets.core.settings import Flag, read
from dbento_assets.core.source import SYNTHETIC, origin_of
from dbento_assets.core.storage import (
    RAW_TIMEFRAME,
    REFUSED_NOTE,
    BarStore,
    FileIdentity,
    StorageError,
    UnfitFile,
    Window,
    share_system_allocator,
    windows_from_json,
)
from dbento_assets.names import timeframe_of
from dbento_assets.partitions import Partition
from dbento_assets.resources import DatabentoResource, refuse_changed_settings

IDENTITY_ATTR = "dbento_identity"  # frame.attrs key: the identity of the file it came from
# Output metadata of a month that may be partial (the current month): written into the file.
COMPLETE_KEY = "complete"
REQUEST_KEY = "request_symbol"  # output metadata: what was asked of the source for the symbol
THROUGH_KEY = "through"
COVERAGE_KEY = "covered"  # raw_1s_bars output metadata: the windows its DBN data covers
# raw_1s_bars output metadata: the proof that its blocking rules passed on these bars
RAW_RULES_KEY = "raw_rules_proof"
BUILT_FROM_KEY = "built_from_raw"  # bars output metadata: the raw bars' fingerprint
BAR_SCHEMA = TableSchema(
    columns=[TableColumn(name, str(DTYPES[name])) for name in COLUMNS],
)


def source_label(source: str) -> str:
    """How the UI names a source; demo data is unmistakably marked synthetic."""
    if origin_of(source) == SYNTHETIC:
        return "demo (SYNTHETIC data, not market data)"
    return source


class BarFileIOManager(ConfigurableIOManager):
    """Stores bar frames as files under the data root of the ``databento`` resource, marked
    with its source."""

    databento: ResourceDependency[DatabentoResource]
    format: str = Field(default="parquet", description="Bar file format: parquet or csv.")
    handoff: Flag = Field(
        default=True,
        description="Hand the raw month just written to the bars step of the same process in "
        "memory instead of reading the file back (benchmarks/bench_month.py measures it).",
    )

    @property
    def data_dir(self) -> str:
        return self.databento.data_dir

    @property
    def source(self) -> str:
        return self.databento.source

    @property
    def store(self) -> BarStore:
        return BarStore.at(self.data_dir, self.format)

    def setup_for_execution(self, context: InitResourceContext) -> None:
        run = context.run
        given = ((run.run_config.get("resources") or {}).get("io_manager") or {}) if run else {}
        if given.get("config"):
            self._require_loaded_settings()
        share_system_allocator()

    def _require_loaded_settings(self) -> None:
        """Fail the run when an io_manager config from the launchpad changed a setting. Such a
        config replaces every setting, the ones it leaves out by their defaults: with
        DBENTO_FORMAT=csv, ``handoff: false`` alone would store Parquet. The launchpad's own
        default config gives the loaded values, which pass."""
        # What the code location loaded in this process, from the same environment.
        loaded = io_manager_from_env(self.databento)
        pairs: list[tuple[str, object, object]] = [
            ("format", self.store.fmt, loaded.store.fmt),
            ("handoff", self.handoff, loaded.handoff),
        ]
        refuse_changed_settings("io_manager", pairs, "DBENTO_FORMAT and DBENTO_HANDOFF")

    def path_for(self, asset_key: AssetKey, partition: Partition) -> UPath:
        """The file of one asset partition."""
        timeframe = timeframe_of(asset_key.path[-1])
        if timeframe is None:
            return self.store.raw_path(partition.symbol, partition.month)
        return self.store.aggregated_path(partition.symbol, partition.month, timeframe)

    def identity_for(
        self,
        asset_key: AssetKey,
        partition: Partition,
        dataset: str = "",
        *,
        request: str = "",
        complete: bool = True,
        through: str = "",
        covered: tuple[Window, ...] = (),
        raw_rules: str = "",
        built_from: str = "",
    ) -> FileIdentity:
        """What the file of one asset partition must hold (``dataset``/``request``: the
        instrument's, see :class:`~dbento_assets.core.catalog.Instrument`;
        ``complete``/``through``: a month that has not closed yet, stored partial;
        ``covered``: the windows its DBN covered; ``raw_rules``: the proof that the blocking
        raw rules passed on its bars)."""
        timeframe = timeframe_of(asset_key.path[-1])
        return FileIdentity(
            partition.symbol,
            partition.month,
            origin_of(self.source),
            RAW_TIMEFRAME if timeframe is None else timeframe.label,
            dataset,
            request=request,
            complete=complete,
            through="" if complete else through,
            covered=covered,
            raw_rules=raw_rules if timeframe is None else "",
            built_from="" if timeframe is None else built_from,
        )

    def stored_identity(
        self,
        asset_key: AssetKey,
        partition: Partition,
        instrument: Instrument,
        *,
        any_origin: bool = False,
    ) -> FileIdentity | None:
        """The identity of the file of ``asset_key``'s ``partition`` when that file is there
        and says it is that asset partition's, of ``instrument`` as the catalog asks for it
        now; else None (its footer or sidecar only: the bars are not read). ``any_origin``:
        demo or market data alike, as a listing shows whatever the folder holds (a data
        folder holds one kind only), whichever source is in force."""
        found = self.store.identity_of(self.path_for(asset_key, partition))
        if found is None:
            return None
        expected = self.identity_for(
            asset_key, partition, instrument.dataset, request=instrument.request
        )
        if any_origin:
            expected = replace(expected, origin=found.origin)
        return found if expected.names_the_same_file(found) else None

    def handle_output(self, context: OutputContext, obj: pd.DataFrame) -> None:
        partition = Partition.from_key(context.asset_partition_key)
        meta = {k: getattr(v, "value", v) for k, v in context.output_metadata.items()}
        written = self.write(context.asset_key, partition, obj, meta, context.log.info)
        context.add_output_metadata(written)

    def write(
        self,
        asset_key: AssetKey,
        partition: Partition,
        obj: pd.DataFrame,
        meta: Mapping[str, object],
        log: Callable[[str], object],
    ) -> dict[str, object]:
        """Write one asset partition's file, with the identity its output metadata ``meta``
        gives; returns the metadata to record with its materialization."""
        store = self.store
        path = self.path_for(asset_key, partition)
        identity = self.identity_for(
            asset_key,
            partition,
            str(meta.get("dataset") or ""),
            request=str(meta.get(REQUEST_KEY) or ""),
            complete=meta.get(COMPLETE_KEY) is not False,
            through=str(meta.get(THROUGH_KEY) or ""),
            covered=windows_from_json(meta.get(COVERAGE_KEY) or []),
            raw_rules=str(meta.get(RAW_RULES_KEY) or ""),
            built_from=str(meta.get(BUILT_FROM_KEY) or ""),
        )
        for stale in store.remove_stale_temps([path]):
            log(f"Removed {stale}, left by a write that was killed")
        size = store.write_claimed(obj, path, identity, self.source)
        if timeframe_of(asset_key.path[-1]) is None:
            # A good raw month is stored: an earlier refused download no longer holds it back.
            store.clear_note(partition.symbol, partition.month, REFUSED_NOTE)
            obj.attrs[IDENTITY_ATTR] = identity
            if self.handoff:
                _HANDOFF.keep(path, obj)
        return bar_file_metadata(obj, path, size, self.source)

    def load_input(self, context: InputContext) -> pd.DataFrame | None:
        if len(context.asset_partition_keys) != 1:
            # A step over a range of partitions reads each month when it comes to it
            # (:meth:`load`), so one month at a time is in memory.
            return None
        return self.load(context.asset_key, Partition.from_key(context.asset_partition_key))

    def load(self, asset_key: AssetKey, partition: Partition) -> pd.DataFrame:
        """One asset partition's frame, its file's identity in its attrs."""
        path = self.path_for(asset_key, partition)
        handed = _HANDOFF.take(path)
        if handed is not None:
            return handed
        try:
            frame, identity = self.store.read_with_identity(path)
        except UnfitFile as exc:
            name = asset_key.to_user_string()
            raise Failure(
                description=(
                    f"The {name} file {exc}, so nothing was built from it and no file was "
                    f"changed; materialize {name} for {partition} to write it again."
                ),
                allow_retries=False,
            ) from exc
        frame.attrs[IDENTITY_ATTR] = identity
        return frame

    def teardown_after_execution(self, context: InitResourceContext) -> None:
        # A run that wrote raw_1s_bars without aggregating it must not leave its month in
        # memory for the rest of the process (a backfill runs many partitions in one).
        _HANDOFF.clear()


def io_manager_from_env(databento: DatabentoResource) -> BarFileIOManager:
    """The IO manager as the environment configures it, storing under ``databento``'s root."""
    return read(BarFileIOManager, error=StorageError, databento=databento)


class _Handoff:
    """The raw month just written by this process, for the next step of the same run.

    With the in-process executor the aggregation step runs in the process that has just
    written ``raw_1s_bars``; it takes the frame from here instead of reading the file back.
    The frame is handed over only while the file on disk is exactly the one written (same
    inode, size and modification time), so a file replaced or rewritten since is read
    afresh; only local files qualify, and only one month is kept: taking it empties the
    handoff, and so does the end of the run, so no month outlives its run.
    """

    def __init__(self) -> None:
        self._entry: tuple[str, tuple[int, int, int], pd.DataFrame] | None = None

    @staticmethod
    def _signature(path: UPath) -> tuple[int, int, int] | None:
        if path.protocol not in ("", "file", "local"):
            return None
        try:
            stat = os.stat(path.path)
        except OSError:
            return None
        return (stat.st_ino, stat.st_size, stat.st_mtime_ns)

    def keep(self, path: UPath, frame: pd.DataFrame) -> None:
        signature = self._signature(path)
        self._entry = None if signature is None else (str(path), signature, frame)

    def take(self, path: UPath) -> pd.DataFrame | None:
        entry, self._entry = self._entry, None
        if entry is None or entry[0] != str(path) or entry[1] != self._signature(path):
            return None
        return entry[2]

    def clear(self) -> None:
        self._entry = None


_HANDOFF = _Handoff()


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
