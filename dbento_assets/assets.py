"""The asset graph: ``raw_1s_bars`` per symbol-month, then one ``bars_<tf>`` per timeframe.

``raw_1s_bars`` asks the configured source (demo, Databento API or local DBN files, see
:mod:`dbento_assets.resources`) for the partition's ohlcv-1s DBN and decodes it through the
one decoding path in :mod:`dbento_assets.core.dbn`. There is one ``bars_<tf>`` asset per
catalog timeframe (adding ``5min`` to the catalog adds ``bars_5min``); one step builds all
of them from a single read of the raw month (:func:`build_bars_assets`). Downloads run in
the Dagster pool ``databento`` so a backfill never opens more concurrent API requests than
the pool allows; with ``DBENTO_VENDOR_CHECK=true`` the same step also buys Databento's own
ohlcv-1m of the partition for the vendor cross-check of ``bars_1min``. Force a re-download
(of both) with the run tag ``dbento/force=true`` or the run config ``force: true``. Every
asset validates its frame before it is written (see :mod:`dbento_assets.checks`): the
validation rules are asset checks declared on the assets and evaluated in the same step, on
the frame in memory. A failed ERROR rule records the check results against the partition
and fails the step without yielding the output, so the IO manager never writes bad bars and
the files already on disk stay as they were. The aggregation step also refuses raw bars that
fail the blocking raw rules, or whose latest download was refused, until ``raw_1s_bars`` is
fixed. When only the checks of a ``bars_<tf>`` are selected (not the asset), they run on its
file on disk.
"""

from collections.abc import Iterator

import pandas as pd
from dagster import (
    AssetCheckKey,
    AssetCheckResult,
    AssetExecutionContext,
    AssetIn,
    AssetKey,
    AssetOut,
    AssetsDefinition,
    Config,
    Failure,
    MultiPartitionsDefinition,
    Output,
    asset,
    multi_asset,
)

from dbento_assets.checks import (
    CHECKED_ON_DISK,
    COVERAGE_KEY,
    RAW_KEY,
    REFUSED,
    SAVED,
    bars_asset_name,
    check_specs,
    dbn_coverage,
    evaluation_of,
    load_vendor_1m,
    not_saved,
    prefetch_vendor_1m,
    raw_coverage,
    raw_failures_in_instance,
    raw_gate,
    refusal,
    selected_results,
    vendor_failure_in_run,
    vendor_result,
    windows_metadata,
)
from dbento_assets.core.aggregate import aggregate_many
from dbento_assets.core.catalog import Catalog, Instrument
from dbento_assets.core.dbn import decode_month
from dbento_assets.core.source import FetchRequest, origin_of
from dbento_assets.core.storage import BarStore
from dbento_assets.core.validation import (
    RULE_VENDOR,
    RuleResult,
    run_aggregated_rules,
    run_raw_rules,
)
from dbento_assets.io_managers import RAW_ASSET
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
    """The ``raw_1s_bars`` asset for a catalog, with its checks."""

    @asset(
        name=RAW_ASSET,
        partitions_def=partitions,
        group_name=RAW_GROUP,
        pool=DOWNLOAD_POOL,
        kinds={"databento", "pandas"},
        check_specs=check_specs(RAW_KEY, partitions),
        description=(
            "Databento ohlcv-1s bars of one symbol for one UTC month, each stamped at its "
            "open; a second without a trade has no bar. Decoded from DBN, validated before "
            "it is saved."
        ),
    )
    def raw_1s_bars(
        context: AssetExecutionContext, config: RawBarsConfig, databento: DatabentoResource
    ) -> Iterator[Output | AssetCheckResult]:
        partition = str(context.partition_key)
        month, symbol = split_partition_key(partition)
        instrument = catalog.instrument(symbol)
        # Refuse a data root of the other origin before anything is fetched or paid for.
        BarStore.at(databento.data_dir).claim(origin_of(databento.source), databento.source)
        request = FetchRequest(instrument, month, force=force_requested(context, config))
        source = databento.month_source(catalog.path)
        fetched = source.fetch(request, context.log.info)
        decoded = decode_month(fetched.payloads, symbol, month, fetched.instrument_ids)
        bars = decoded.bars
        results = run_raw_rules(bars, month, instrument)
        failed = [r for r in results if r.blocking]
        if failed:
            yield from selected_results(context, RAW_KEY, results, REFUSED)
            raise refusal(not_saved(RAW_ASSET, partition, failed), failed)
        rolls = sorted({int(i) for i in bars["instrument_id"].unique()}) if len(bars) else []
        covered = dbn_coverage(fetched.payloads, month, "ohlcv-1s")
        vendor = prefetch_vendor_1m(databento, source, request, context.log.info)
        yield Output(
            bars,
            metadata={
                "dataset": instrument.dataset,
                "request_symbol": f"{instrument.request_symbol} ({instrument.stype_in})",
                "window": f"[{month.start.isoformat()}, {month.end.isoformat()})",
                "records_decoded": decoded.records_read,
                "instrument_ids": ", ".join(map(str, rolls)) or "none",
                "forced": request.force,
                COVERAGE_KEY: windows_metadata(covered),
                # The IO manager records the source itself (marking demo data synthetic).
                **{f"source_{k}": _plain(v) for k, v in fetched.metadata.items() if k != "source"},
                **vendor,
            },
        )
        yield from selected_results(context, RAW_KEY, results, SAVED)

    return raw_1s_bars


def build_bars_assets(catalog: Catalog, partitions: MultiPartitionsDefinition) -> AssetsDefinition:
    """The aggregated assets, one ``bars_<label>`` per timeframe, computed in one step.

    They are separate assets in the graph (each with its own file, checks and history, and
    each can be materialized alone), but one step builds all those selected from a single
    read of ``raw_1s_bars``, instead of one process reading the same month per timeframe,
    and each timeframe from the widest finer one already built (see
    :func:`~dbento_assets.core.aggregate.aggregate_many`). Each frame is validated (against
    raw too) before it is yielded; a timeframe failing a blocking rule is not yielded, the
    others are, and the step then fails naming it.
    """
    by_name = {bars_asset_name(tf): tf for tf in catalog.timeframes}

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
                    "interval. Validated against raw_1s_bars before it is saved."
                ),
            )
            for name, tf in by_name.items()
        },
        check_specs=[
            spec
            for name, tf in by_name.items()
            for spec in check_specs(AssetKey(name), partitions, tf)
        ],
        required_resource_keys={"databento", "io_manager"},
    )
    def _bars(
        context: AssetExecutionContext, raw: pd.DataFrame
    ) -> Iterator[Output | AssetCheckResult]:
        partition = str(context.partition_key)
        month, symbol = split_partition_key(partition)
        instrument = catalog.instrument(symbol)
        _refuse_unfit_raw(context, raw, partition, instrument)
        built = {key.path[-1] for key in context.selected_asset_keys}
        checked = {key.asset_key.path[-1] for key in context.selected_asset_check_keys}
        refused: list[tuple[str, list[RuleResult]]] = []
        aggregated = aggregate_many(raw, [tf for name, tf in by_name.items() if name in built])
        for name, tf in by_name.items():
            if name not in built and name not in checked:
                continue
            key = AssetKey(name)
            if name in built:
                bars = aggregated.pop(tf)
            else:  # only checks selected: check the file this asset has on disk
                io_manager = context.resources.io_manager
                bars = io_manager.store.read(io_manager.path_for(key, partition))
            results = run_aggregated_rules(bars, raw, month, tf, instrument)
            if (
                tf.seconds == 60
                and AssetCheckKey(key, RULE_VENDOR) in context.selected_asset_check_keys
            ):
                databento = context.resources.databento
                vendor = vendor_failure_in_run(
                    context.instance, partition, context.run.run_id
                ) or load_vendor_1m(databento, instrument, month, context.log.info)
                results.append(
                    vendor_result(
                        bars, vendor, raw_coverage(context.instance, partition, month), month
                    )
                )
            failed = [r for r in results if r.blocking]
            if name not in built:
                yield from selected_results(context, key, results, CHECKED_ON_DISK)
            elif failed:
                yield from selected_results(context, key, results, REFUSED)
            else:
                yield Output(bars, output_name=name)
                yield from selected_results(context, key, results, SAVED)
            if failed:
                refused.append((name, failed))
        if refused:
            heads = [
                not_saved(name, partition, failed)
                if name in built
                else f"The {name} file of {partition} on disk fails {len(failed)} blocking "
                f"check(s); materialize {name} for {partition} to rebuild it from raw_1s_bars."
                for name, failed in refused
            ]
            raise refusal(
                " ".join(heads),
                [r for _, failed in refused for r in failed],
                files_unchanged=all(name in built for name, _ in refused),
            )

    return _bars


def _refuse_unfit_raw(
    context: AssetExecutionContext, raw: pd.DataFrame, partition: str, instrument: Instrument
) -> None:
    """Fail the step before building anything from raw bars that are not fit for it.

    Two guards. The loaded raw frame must pass the blocking raw rules (cheap, and true
    whatever the instance remembers: it catches a raw file edited or copied in by hand). And
    while the latest evaluation of a blocking raw check for this partition failed after the
    latest raw materialization, the latest download was refused and raw is not fixed yet.
    """
    month, _ = split_partition_key(partition)
    from_frame = raw_gate(raw, month, instrument)
    if from_frame:
        raise refusal(
            f"The raw 1-second bars of {partition} fail blocking checks, so no bars were built "
            f"from them. Fix raw_1s_bars first (materialize it again for {partition}, with the "
            "run tag dbento/force=true if the download itself is bad).",
            from_frame,
        )
    refused = raw_failures_in_instance(context.instance, partition)
    if refused:
        lines = []
        for record in refused:
            evaluation = evaluation_of(record)
            text = getattr(evaluation, "description", None) or "failed"
            lines.append(f"- {record.key.name} (run {record.run_id}): {text}")
        raise Failure(
            description="\n".join(
                [
                    f"The latest download of raw_1s_bars for {partition} was refused by its "
                    "checks, so no bars are built until raw is fixed:",
                    *lines,
                    f"Materialize raw_1s_bars for {partition} again (with the run tag "
                    "dbento/force=true if the download itself was bad); once its checks pass, "
                    "the bars can be built.",
                ]
            ),
            metadata={"failed_raw_checks": ", ".join(r.key.name for r in refused)},
            allow_retries=False,
        )


def build_assets(catalog: Catalog) -> list[AssetsDefinition]:
    """All assets of a catalog: ``raw_1s_bars``, then one ``bars_<tf>`` per timeframe."""
    partitions = build_partitions(catalog)
    return [
        build_raw_asset(catalog, partitions),
        build_bars_assets(catalog, partitions),
    ]


def _plain(value: object) -> object:
    """Metadata values Dagster accepts as they are; anything else as text."""
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)
