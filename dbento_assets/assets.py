"""The asset graph: ``raw_1s_bars`` per symbol-month, then one ``bars_<tf>`` per timeframe.

``raw_1s_bars`` buys or reads the month through the source in force (in the ``databento``
pool) and keeps it only when whole and passing its blocking rules; one step builds every
``bars_<tf>`` from one read of the raw month and validates each frame before it is written.
Force a re-download with the run tag ``dbento/force=true`` or the run config ``force: true``;
``dbento/force=vendor-1m`` renews only Databento's 1-minute bars of the vendor cross-check.
The steps hand each other data through the data root (the raw file's identity, notes beside
it), never through the event log.
"""

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import pandas as pd
from dagster import (
    AssetCheckKey,
    AssetCheckResult,
    AssetExecutionContext,
    AssetIn,
    AssetKey,
    AssetObservation,
    AssetOut,
    AssetsDefinition,
    Config,
    Failure,
    MultiPartitionsDefinition,
    Output,
    asset,
    multi_asset,
)

from dbento_assets.batches import backfill_policy, build_each
from dbento_assets.checks import (
    CHECKED_ON_DISK,
    REFUSED,
    SAVED,
    check_specs,
    not_saved,
    raw_gate,
    refusal,
    selected_results,
    vendor_result,
)
from dbento_assets.core.aggregate import aggregate_many, built_from
from dbento_assets.core.bars import bars_before
from dbento_assets.core.catalog import Catalog, Instrument
from dbento_assets.core.coverage import (
    IncompleteMonth,
    Window,
    intersect_windows,
    require_whole_month,
)
from dbento_assets.core.dbn import DecodedMonth, decode_month
from dbento_assets.core.dbn_cache import DBN_FILE_KEY
from dbento_assets.core.months import Month
from dbento_assets.core.preflight import preflight
from dbento_assets.core.rules import RULE_RECONCILED, RULE_VENDOR, RuleResult
from dbento_assets.core.run_rules import (
    raw_content,
    raw_proof_status,
    raw_rules_proof,
    reconcile_ahead,
    run_aggregated_rules,
    run_raw_rules,
)
from dbento_assets.core.source import (
    DownloadRefused,
    FetchedMonth,
    FetchRequest,
    Logger,
    MonthSource,
    fetch_accepted,
)
from dbento_assets.core.storage import (
    REFUSED_NOTE,
    VENDOR_NOTE,
    BarStore,
    FileIdentity,
    StorageError,
    data_root,
    identity_problem,
    windows_json,
)
from dbento_assets.core.timeframes import Timeframe, finest_first
from dbento_assets.history import latest_materialization
from dbento_assets.io_managers import (
    BUILT_FROM_KEY,
    COMPLETE_KEY,
    COVERAGE_KEY,
    IDENTITY_ATTR,
    RAW_RULES_KEY,
    REQUEST_KEY,
    THROUGH_KEY,
    BarFileIOManager,
)
from dbento_assets.names import RAW_ASSET, RAW_KEY, bars_asset_name
from dbento_assets.partitions import Partition, build_partitions
from dbento_assets.pool import machine_slot
from dbento_assets.resources import DatabentoResource, refuse_changed_settings

FORCE_TAG = "dbento/force"
FORCE_VENDOR_1M = "vendor-1m"  # the tag's value that renews only the vendor's 1m bars
# On a run that must store its month whole (the monthly schedule's): a month a source holds
# only part of fails instead of being stored partial.
WHOLE_MONTH_TAG = "dbento/whole-month"
_YES = ("true", "1", "yes")  # how a yes/no run tag may say yes
_NO = ("", "false", "0", "no")  # and no (or not set)
VENDOR_ERROR_KEY = "vendor_1m_error"  # raw_1s_bars metadata: the 1m download failed
VENDOR_COST_KEY = "vendor_1m_cost_usd"  # raw_1s_bars metadata: what the 1m download cost
# An observation of a step that paid Databento: what it paid (downloads refused included).
PAID_KEY = "databento_paid_usd"
BACKFILL_TAG = "dagster/backfill"  # the id of the backfill a run belongs to (Dagster's tag)
DOWNLOAD_POOL = "databento"
RAW_GROUP = "raw"
BARS_GROUP = "aggregated"


class RawBarsConfig(Config):
    """Run config of ``raw_1s_bars``."""

    force: bool = False
    """Download again even if the month is in the DBN cache (costs money)."""


@dataclass(frozen=True)
class Forced:
    """What a run buys again: the month's 1-second data, Databento's 1-minute bars."""

    bars_1s: bool
    vendor_1m: bool


def force_requested(context: AssetExecutionContext, config: RawBarsConfig) -> Forced:
    """Force from run config or from the ``dbento/force`` run tag (as the UI sets it); a tag
    value it does not know fails the run before anything is bought (a typo must not pass
    for a force, nor a force for a typo)."""
    tag = run_tag(
        context,
        FORCE_TAG,
        (*_YES, *_NO, FORCE_VENDOR_1M),
        f". Use {FORCE_TAG}=true to buy the month again (its 1-second data, and Databento's "
        f"1-minute bars when DBENTO_VENDOR_CHECK is on), or {FORCE_TAG}={FORCE_VENDOR_1M} to "
        "buy only the 1-minute bars again; without the tag, months already downloaded are not "
        "bought again.",
    )
    whole = config.force or tag in _YES
    return Forced(bars_1s=whole, vendor_1m=whole or tag == FORCE_VENDOR_1M)


def run_tag(context: AssetExecutionContext, name: str, known: tuple[str, ...], remedy: str) -> str:
    """The run tag ``name``'s value (lower case, "" when not set). A value not ``known``
    fails the run before anything is bought, its sentence ended by ``remedy``: a typo must
    pass neither for yes nor for no."""
    value = context.run.tags.get(name, "").strip().lower()
    if value not in known:
        raise Failure(
            description=f"The run tag {name}={value!r} is not understood, so nothing was "
            f"downloaded{remedy}",
            allow_retries=False,
        )
    return value


def build_raw_asset(catalog: Catalog, partitions: MultiPartitionsDefinition) -> AssetsDefinition:
    """The ``raw_1s_bars`` asset for a catalog, with its checks."""
    # Databento's 1-minute bars are bought only for a cross-check that will compare them.
    compared = any(tf.seconds == 60 for tf in catalog.timeframes)

    def build_month(
        context: AssetExecutionContext, config: RawBarsConfig, databento: DatabentoResource
    ) -> Iterator[Output | AssetCheckResult]:
        partition = Partition.from_key(context.partition_key)
        month, symbol = partition.month, partition.symbol
        instrument = catalog.instrument(symbol)
        # Every setting is checked (the data root's origin included) before anything is paid.
        source = check_settings(context, databento, catalog, partition)
        store = bar_store(context, databento)
        forced = force_requested(context, config)
        if forced.vendor_1m and not forced.bars_1s and not (source.vendor_requested and compared):
            why = (
                "the vendor cross-check is off (DBENTO_VENDOR_CHECK=true turns it on)"
                if compared
                else "the catalog has no 1min timeframe for the cross-check to compare"
            )
            raise Failure(
                description=f"The run tag {FORCE_TAG}={FORCE_VENDOR_1M} asks to buy "
                f"Databento's 1-minute bars again, but {why}, so nothing was downloaded.",
                allow_retries=False,
            )
        remedy = ": use true (the month whole, or nothing) or false."
        whole = run_tag(context, WHOLE_MONTH_TAG, (*_YES, *_NO), remedy) in _YES
        request = FetchRequest(
            instrument,
            month,
            force=forced.bars_1s,
            whole=whole,
            bought_before=_bought_before(context),
            lineage=context.run.root_run_id or context.run.run_id,
        )

        def accept(fetched: FetchedMonth) -> tuple[DecodedMonth, list[RuleResult], list[Window]]:
            # Runs on a download before it enters the DBN cache (or on a cached file before
            # it is used): a month that is not whole, or fails a blocking rule, is refused,
            # never cached or stored.
            decoded = decode_month(fetched.payloads, symbol, month, fetched.instrument_ids)
            try:
                covered = require_whole_month(fetched, decoded, instrument, month, source.name)
            except IncompleteMonth as exc:
                raise DownloadRefused(str(exc), rules=["complete_month"]) from None
            # Its file is encoded while the rules judge it (written only if they pass).
            store.encode_ahead(decoded.bars)
            # A month that has not closed yet is judged complete up to what it covers.
            results = run_raw_rules(decoded.bars, month, instrument, asof=_through(fetched))
            failed = [r for r in results if r.blocking]
            if failed:
                raise DownloadRefused(
                    not_saved(RAW_ASSET, str(partition), failed),
                    rules=[r.rule for r in failed],
                    results=results,
                )
            return decoded, results, covered

        paid_before = source.paid_usd
        try:
            try:
                fetched, (decoded, results, covered) = fetch_accepted(
                    source, request, context.log.info, accept
                )
            except DownloadRefused as exc:
                if exc.results is None:  # refused by the file check: no rule results to show
                    raise
                yield from selected_results(context, RAW_KEY, exc.results, REFUSED)
                failed = [r for r in exc.results if r.blocking]
                # Beside the raw file, so the bars step refuses to build on it until raw is fixed.
                store.write_note(
                    symbol,
                    month,
                    REFUSED_NOTE,
                    {
                        "run_id": context.run.run_id,
                        "refused_at": pd.Timestamp.now(tz="UTC").isoformat(),
                        "checks": [{"name": r.rule, "description": r.description} for r in failed],
                    },
                )
                raise refusal(str(exc), failed) from None
            if whole and not fetched.complete:  # a source without a price: checked once read
                raise Failure(
                    description=f"{partition}: the source holds {month} only up to "
                    f"{_through(fetched)}, and this run asks for the whole month (as the monthly "
                    "schedule does), so nothing was written. Re-execute it once the source holds "
                    "the whole month.",
                    allow_retries=False,
                )
            bars = decoded.bars
            rolls = sorted({int(i) for i in bars["instrument_id"].unique()}) if len(bars) else []
            # A force of the 1-minute bars alone renews them whole, pieces bought while the month
            # was open included; a force of the month keeps those and buys their new part.
            vendor_request = replace(
                request,
                force=forced.vendor_1m,
                renew_pieces=forced.vendor_1m and not forced.bars_1s,
            )
            vendor = _prefetch_vendor_1m(source, vendor_request, context.log.info, compared)
            if VENDOR_ERROR_KEY in vendor:
                # For the bars step of this run, which then does not pay for a second round of
                # retries (a later run's bars step tries again).
                note = {"run_id": context.run.run_id, "error": vendor[VENDOR_ERROR_KEY]}
                store.write_note(symbol, month, VENDOR_NOTE, note)
            else:
                store.clear_note(symbol, month, VENDOR_NOTE)
        finally:
            # Recorded before the file is written: money paid stays counted when the write
            # fails (a full disk), the month is refused or the run is stopped.
            record_paid(context, RAW_KEY, partition, source.paid_usd - paid_before)
        yield Output(
            bars,
            metadata={
                "dataset": instrument.dataset,
                REQUEST_KEY: instrument.request,
                "window": f"[{month.start.isoformat()}, {month.end.isoformat()})",
                "records_decoded": decoded.records_read,
                "instrument_ids": ", ".join(map(str, rolls)) or "none",
                "forced": request.force,
                "vendor_1m_forced": vendor_request.force and source.vendor_requested and compared,
                **partial_metadata(fetched.complete, _through(fetched) or month.end),
                COVERAGE_KEY: windows_json(covered),
                # Its blocking rules passed on exactly these bars (accept refuses otherwise):
                # written into the file, so the bars step does not run them again.
                RAW_RULES_KEY: raw_rules_proof(bars, month),
                # The IO manager records the source itself (marking demo data synthetic).
                **{f"source_{k}": _plain(v) for k, v in fetched.metadata.items() if k != "source"},
                **vendor,
            },
        )
        yield from selected_results(context, RAW_KEY, results, SAVED)

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
        # Dagster's own claim of the pool's slot can let two steps through at once.
        with machine_slot(context.instance, DOWNLOAD_POOL, context.log.info):
            yield from build_month(context, config, databento)

    return raw_1s_bars


def _bought_before(context: AssetExecutionContext) -> tuple[str, ...]:
    """The DBN files this partition's latest raw file was decoded from (and the vendor's
    1-minute bars bought with it), as its run recorded them: after the data folder changed
    (another working directory, DBENTO_DATA_DIR or DBENTO_CACHE_DIR), the download cache uses
    those files, verified, instead of buying the month again."""
    record = latest_materialization(context.instance, RAW_KEY, context.partition_key)
    if record is None or record.asset_materialization is None:
        return ()
    metadata = record.asset_materialization.metadata
    keys = (f"source_{DBN_FILE_KEY}", f"vendor_1m_{DBN_FILE_KEY}")
    return tuple(str(metadata[k].value) for k in keys if metadata.get(k) is not None)


def check_settings(
    context: AssetExecutionContext,
    databento: DatabentoResource,
    catalog: Catalog,
    partition: Partition,
) -> MonthSource:
    """Every setting the partition needs, checked before its source is asked for anything
    (see :func:`~dbento_assets.core.preflight.preflight`): a bad one fails the step before
    any request, with one sentence saying what to fix. Returns the source, built once."""
    month, symbol = partition.month, partition.symbol
    io_manager = context.resources.io_manager
    files = io_manager if isinstance(io_manager, BarFileIOManager) else None
    require_loaded_settings(context, databento)
    # Building the source checks its own settings (name, API key, DBN folder, retries).
    source = databento.month_source(catalog.path)
    cache = source.cache_folder(symbol, month)
    checked = preflight(
        data_dir=files.data_dir if files else databento.data_dir,
        fmt=files.format if files else "parquet",
        source_name=databento.source,
        catalog=catalog,
        symbol=symbol,
        month=month,
        cache_folder=cache,
    )
    for stale in checked.removed_temps:
        context.log.info(f"Removed {stale}, left by a write that was killed")
    return source


def require_loaded_settings(context: AssetExecutionContext, databento: DatabentoResource) -> None:
    """Fail the step, before anything is fetched or written, when the run's ``databento``
    resource differs from the one the code location loaded (which the IO manager holds).

    A ``databento`` config given in the launchpad replaces every setting, the ones it leaves
    out falling back to their defaults rather than to ``dbento.env``'s: a gateway, a cost
    cap or the vendor check would change unseen, and with another source or data root the
    IO manager, which marks the files with its own source, would store demo bars as real
    market data, or in another folder than asked.
    """
    refuse_a_typed_key(context)
    files = context.resources.io_manager
    if not isinstance(files, BarFileIOManager):
        return
    loaded = files.databento
    names = [name for name in type(databento).model_fields if name != "api_key"]
    refuse_changed_settings(
        "databento",
        [(name, _setting(databento, name), _setting(loaded, name)) for name in names],
        "DBENTO_<SETTING>",
        f" (the io_manager stores files as source {loaded.source} under {loaded.data_dir})",
    )


def _setting(databento: DatabentoResource, name: str) -> object:
    value = getattr(databento, name)
    return _root_text(value) if name == "data_dir" else value


def refuse_a_typed_key(context: AssetExecutionContext) -> None:
    """Fail the step, before anything is fetched, when the run's configuration holds the API
    key as text (typed in the launchpad, or passed with ``--config``). Dagster stores a run's
    configuration for anyone with the UI to read; only ``{env: DATABENTO_API_KEY}`` keeps
    the key out of it."""
    resources = context.run.run_config.get("resources") or {}
    config = (resources.get("databento") or {}).get("config") or {}
    if not isinstance(config.get("api_key"), str):
        return
    raise Failure(
        description=(
            "This run's configuration holds a Databento API key typed as text (resources: "
            "databento: config: api_key), so nothing was fetched or written. Dagster keeps "
            "a run's configuration in its storage, where anyone with the UI can read it: "
            "remove api_key from the launchpad (the key comes from DATABENTO_API_KEY in "
            "dbento.env), and replace the key in your Databento account, since this run "
            "has stored it."
        ),
        allow_retries=False,
    )


def _root_text(location: str) -> str:
    try:
        return str(data_root(location))
    except StorageError:  # an empty data_dir: the settings check names it
        return location


def bar_store(context: AssetExecutionContext, databento: DatabentoResource) -> BarStore:
    """The data root the step's files (and the notes beside them) live in."""
    io_manager = context.resources.io_manager
    if isinstance(io_manager, BarFileIOManager):
        return io_manager.store
    return BarStore.at(databento.data_dir)


def build_bars_assets(
    catalog: Catalog, partitions: MultiPartitionsDefinition, *, vendor: bool = True
) -> AssetsDefinition:
    """The aggregated assets, one ``bars_<label>`` per timeframe, computed in one step.

    They are separate assets in the graph (each with its own file, checks and history, and
    each can be materialized alone), but one step builds all those selected from a single
    read of ``raw_1s_bars``, instead of one process reading the same month per timeframe,
    and each timeframe from the widest finer one already built (see
    :func:`~dbento_assets.core.aggregate.aggregate_many`). Each frame is validated (against
    raw too) before it is yielded; a timeframe failing a blocking rule is not yielded, the
    others are, and the step then fails naming it.
    """
    # Finest first, whatever the catalog's order: each timeframe is then judged after the
    # finer one it is built and reconciled from.
    by_name = {bars_asset_name(tf): tf for tf in finest_first(catalog.timeframes)}

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
            for spec in check_specs(AssetKey(name), partitions, tf, vendor=vendor)
        ],
        required_resource_keys={"databento", "io_manager"},
        backfill_policy=backfill_policy(),
    )
    def _bars(
        context: AssetExecutionContext, raw: pd.DataFrame | None
    ) -> Iterator[Output | AssetCheckResult]:
        if context.has_partition_key and raw is not None:
            yield from _build(context, Partition.from_key(context.partition_key), raw)
        else:  # a batched backfill's run: several partitions, each recorded as its own
            build_each(context, context.resources.io_manager, RAW_KEY, _build, raw)

    def _build(
        context: AssetExecutionContext, partition: Partition, raw: pd.DataFrame
    ) -> Iterator[Output | AssetCheckResult]:
        month = partition.month
        instrument = catalog.instrument(partition.symbol)
        require_loaded_settings(context, context.resources.databento)
        store = bar_store(context, context.resources.databento)
        _refuse_unfit_raw(context, raw, partition, instrument, store)
        built = {key.path[-1] for key in context.selected_asset_keys}
        checked = {key.asset_key.path[-1] for key in context.selected_asset_check_keys}
        refused: list[tuple[str, list[RuleResult]]] = []
        selected = [tf for name, tf in by_name.items() if name in built]
        plan = built_from(selected)
        through_ns = _partial_end(raw)
        # A whole month only (a partial month's bars and raw are cut first): what
        # reconciliation recomputes from raw is begun beside the aggregation, each file is
        # encoded while the rules judge it, and what it recomputes from finer bars is begun
        # while the finest timeframe is judged (after the encodings: each write comes right
        # after its rules; the other order measured no faster).
        if through_ns is None:
            reconcile_ahead(raw, plan)
        aggregated = aggregate_many(raw, selected)
        if through_ns is None:
            for bars in aggregated.values():
                store.encode_ahead(bars)
            reconcile_ahead(raw, plan, aggregated)
        # Built bars proven equal to raw's, kept while a coarser timeframe built from them
        # is reconciled against them (a fraction of raw's rows, same proof).
        proven: dict[Timeframe, pd.DataFrame] = {}
        for name, tf in by_name.items():
            if name not in built and name not in checked:
                continue
            key = AssetKey(name)
            # A month stored partial ends mid-interval: a bar still open at its end would be
            # stored with part of its trades, so each timeframe ends on its own boundary.
            cut = None if through_ns is None else through_ns - through_ns % tf.nanos
            finer = None
            outcome = CHECKED_ON_DISK
            if name in built:
                bars = bars_before(aggregated.pop(tf), cut)
                finer = proven.get(plan[tf]) if plan[tf] is not None else None
                finer = None if finer is None else bars_before(finer, cut)
            else:  # only checks selected: check the file this asset has on disk
                bars, stored = _bars_on_disk(context, key, partition, instrument)
                # A file stored before raw was topped up is right for what it covers: it
                # is checked on that, and said to be behind, not failed for the days since.
                covers = _end_of(stored)
                if covers is not None and (cut is None or covers < cut):
                    outcome = _behind(name, partition, covers, cut)
                    context.log.warning(outcome)
                    cut = covers
            results = run_aggregated_rules(
                bars,
                bars_before(raw, cut),
                month,
                tf,
                built_from=finer,
                negative_prices=instrument.negative_prices,
            )
            if name in built and tf in plan.values() and _reconciled(results):
                proven[tf] = bars
            if (
                tf.seconds == 60
                and AssetCheckKey(key, RULE_VENDOR) in context.selected_asset_check_keys
            ):
                failure = _vendor_failure_in_run(context, store, partition)
                vendor, requested, paid = (
                    (failure, True, 0.0)
                    if failure
                    else context.resources.databento.vendor_month(
                        instrument, month, context.log.info
                    )
                )
                # Bought here, not with the month (a build of the bars alone).
                record_paid(context, key, partition, paid)
                compared = vendor_result(
                    bars,
                    vendor,
                    # What raw covers, up to where these bars end (a file behind raw).
                    intersect_windows(
                        _raw_coverage(raw, month),
                        [(month.start_ns, month.end_ns if cut is None else cut)],
                    ),
                    month,
                    requested=requested,
                    log=context.log.info,
                )
                if compared is not None:  # None: nothing to compare, left unevaluated
                    results.append(compared)
            failed = [r for r in results if r.blocking]
            if name not in built:
                yield from selected_results(context, key, results, outcome)
            elif failed:
                yield from selected_results(context, key, results, REFUSED)
            else:
                whole = through_ns is None
                yield Output(
                    bars,
                    output_name=name,
                    metadata={
                        "dataset": instrument.dataset,
                        REQUEST_KEY: instrument.request,
                        # Which raw bars: a raw month rebuilt alone since leaves it behind.
                        BUILT_FROM_KEY: _raw_content_of(raw),
                        **partial_metadata(
                            whole, month.end if whole else pd.Timestamp(cut, tz="UTC")
                        ),
                    },
                )
                yield from selected_results(context, key, results, SAVED)
            if failed:
                refused.append((name, failed))
        if refused:
            heads = [
                not_saved(name, str(partition), failed)
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


def _reconciled(results: list[RuleResult]) -> bool:
    return any(r.rule == RULE_RECONCILED and r.passed for r in results)


def _behind(name: str, partition: Partition, covers: int, raw_covers: int | None) -> str:
    """The outcome of checks run on a bars file that covers less than raw does now."""
    raw_end = "the whole month" if raw_covers is None else f"up to {_utc(raw_covers)}"
    return (
        f"{CHECKED_ON_DISK} on what it covers, up to {_utc(covers)}; raw_1s_bars now covers "
        f"{raw_end}: materialize {name} for {partition} to bring it up to date"
    )


def _utc(ns: int) -> str:
    return pd.Timestamp(ns, tz="UTC").isoformat()


def _bars_on_disk(
    context: AssetExecutionContext, key: AssetKey, partition: Partition, instrument: Instrument
) -> tuple[pd.DataFrame, FileIdentity | None]:
    """The file of ``key`` for ``partition`` and its identity, refused in one sentence when
    it is not that asset's (another symbol, month, origin or timeframe)."""
    io_manager = context.resources.io_manager
    path = io_manager.path_for(key, partition)
    try:
        bars, found = io_manager.store.read_with_identity(path)
    except StorageError as exc:  # missing, unreadable, or a CSV no longer its sidecar's
        raise Failure(
            description=f"The {key.to_user_string()} file of {partition} was not checked: "
            f"{exc}. Materialize {key.to_user_string()} for {partition} to rebuild it.",
            allow_retries=False,
        ) from None
    expected = io_manager.identity_for(
        key, partition, instrument.dataset, request=instrument.request
    )
    holds = identity_problem(expected, found, bars)
    if holds is not None:
        raise Failure(
            description=(
                f"The {key.to_user_string()} file {path} holds {holds}, not the "
                f"{expected.describe()} that {partition} needs, so it was not checked; "
                f"materialize {key.to_user_string()} for {partition} to rebuild it."
            ),
            allow_retries=False,
        )
    return bars, found


def _refuse_unfit_raw(
    context: AssetExecutionContext,
    raw: pd.DataFrame,
    partition: Partition,
    instrument: Instrument,
    store: BarStore,
) -> None:
    """Fail the step before building anything from raw bars that are not fit for it.

    Four guards. The raw file must be this partition's: its identity (symbol, month,
    origin, dataset; see :func:`~dbento_assets.core.storage.identity_problem`) and its bars
    (one symbol, inside the month), else the step fails with one sentence naming the file
    and what it holds. It must carry its identity, with the bars it was written with (its
    completeness, passed on to the bars, is known from it alone). The loaded raw frame must
    pass the blocking raw rules: they are run again unless the file's identity proves they
    passed on exactly these bars (see :func:`~dbento_assets.core.run_rules.raw_rules_proof`).
    And while the month's refusal
    note lies beside the raw file, its latest download was refused and raw is not fixed yet
    (writing a good raw file clears the note).
    """
    month, symbol = partition.month, partition.symbol
    io_manager = context.resources.io_manager
    source = io_manager.source if isinstance(io_manager, BarFileIOManager) else None
    if source is not None:
        expected = io_manager.identity_for(
            RAW_KEY, partition, instrument.dataset, request=instrument.request
        )
        found = raw.attrs.get(IDENTITY_ATTR)
        holds = identity_problem(expected, found, raw)
        if holds is not None:
            path = io_manager.path_for(RAW_KEY, partition)
            raise Failure(
                description=(
                    f"The raw file {path} holds {holds}, not the {expected.describe()} that "
                    f"{partition} needs, so no bars were built and no file was changed; "
                    f"materialize raw_1s_bars for {partition} to replace it."
                ),
                allow_retries=False,
            )
    found = raw.attrs.get(IDENTITY_ATTR)
    status = raw_proof_status(raw, found if isinstance(found, FileIdentity) else None, month)
    if source is not None and (status == "changed" or not isinstance(found, FileIdentity)):
        # Its identity says whether the month is whole or partial and up to when, which the
        # bars' files then say too: without it, or with bars edited under it, that is unknown.
        what = (
            "was changed after it was written (its bars no longer match the fingerprint "
            "recorded in it)"
            if status == "changed"
            else "carries no identity (written by hand, by another tool, or by an earlier "
            "version; for CSV, its .json note is missing)"
        )
        raise Failure(
            description=(
                f"The raw file {io_manager.path_for(RAW_KEY, partition)} {what}, so whether "
                f"it holds the whole of {partition} cannot be known; no bars were built and no "
                f"file was changed. Materialize raw_1s_bars for {partition} again to rewrite "
                "it from its source (from Databento: out of the DBN cache, without buying the "
                "month again, while the cache holds it)."
            ),
            allow_retries=False,
        )
    from_frame = [] if status == "proven" else raw_gate(raw, month, instrument)
    if from_frame:
        raise refusal(
            f"The raw 1-second bars of {partition} fail blocking checks, so no bars were built "
            f"from them. Fix raw_1s_bars first (materialize it again for {partition}, with the "
            "run tag dbento/force=true if the download itself is bad).",
            from_frame,
        )
    note = store.read_note(symbol, month, REFUSED_NOTE)
    if note is not None:
        refused = [c for c in note.get("checks", []) if isinstance(c, dict)]
        run_id = note.get("run_id", "?")
        lines = [
            f"- {c.get('name', '?')} (run {run_id}): {c.get('description') or 'failed'}"
            for c in refused
        ]
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
            metadata={"failed_raw_checks": ", ".join(str(c.get("name")) for c in refused)},
            allow_retries=False,
        )


def build_assets(catalog: Catalog, *, vendor: bool = True) -> list[AssetsDefinition]:
    """All assets of a catalog: ``raw_1s_bars``, then one ``bars_<tf>`` per timeframe
    (``bars_1min`` with the vendor cross-check when ``vendor``, see
    :meth:`~dbento_assets.resources.DatabentoResource.declares_vendor_check`)."""
    partitions = build_partitions(catalog)
    return [
        build_raw_asset(catalog, partitions),
        build_bars_assets(catalog, partitions, vendor=vendor),
    ]


def partial_metadata(complete: bool, through: pd.Timestamp) -> dict[str, object]:
    """What a month's materialization says about its completeness: ``complete`` (False for
    the current month, which grows) and ``through``, the end of what it covers (exclusive)."""
    return {COMPLETE_KEY: complete, THROUGH_KEY: through.isoformat()}


def _through(fetched: FetchedMonth) -> pd.Timestamp | None:
    return None if fetched.through_ns is None else pd.Timestamp(fetched.through_ns, tz="UTC")


def _raw_coverage(raw: pd.DataFrame, month: Month) -> list[Window]:
    """The windows the raw month's DBN data covered, from its file's identity (a file of
    older code without them covered the whole month)."""
    identity = raw.attrs.get(IDENTITY_ATTR)
    if not isinstance(identity, FileIdentity):
        return [(month.start_ns, month.end_ns)]
    return identity.coverage


def _vendor_failure_in_run(
    context: AssetExecutionContext, store: BarStore, partition: Partition
) -> str | None:
    """Why the cross-check has no vendor bars, when ``raw_1s_bars`` of this very run (or of
    this backfill, whose batched bars runs are not its downloads' runs) failed to download
    them: the aggregation step then does not pay for a second round of retries."""
    note = store.read_note(partition.symbol, partition.month, VENDOR_NOTE)
    if note is None or not note.get("error"):
        return None
    if note.get("run_id") == context.run.run_id:
        why = note["error"]
        return f"downloading Databento's 1-minute bars failed in raw_1s_bars of this run ({why})"
    backfill = context.run.tags.get(BACKFILL_TAG)
    raw_run = context.instance.get_run_by_id(str(note.get("run_id")))
    if backfill and raw_run is not None and raw_run.tags.get(BACKFILL_TAG) == backfill:
        return (
            "downloading Databento's 1-minute bars failed in raw_1s_bars of this backfill "
            f"(run {raw_run.run_id}: {note['error']})"
        )
    return None


def _partial_end(raw: pd.DataFrame) -> int | None:
    """Where a raw month stored partial ends (UTC nanoseconds, exclusive); None when whole."""
    identity = raw.attrs.get(IDENTITY_ATTR)
    return _end_of(identity if isinstance(identity, FileIdentity) else None)


def _raw_content_of(raw: pd.DataFrame) -> str:
    """The fingerprint of the raw bars, as their file's identity proves it ("" unknown)."""
    identity = raw.attrs.get(IDENTITY_ATTR)
    return raw_content(identity.raw_rules) if isinstance(identity, FileIdentity) else ""


def _end_of(identity: FileIdentity | None) -> int | None:
    """Where the month of a file stored partial ends (UTC nanoseconds, exclusive); None when
    it is whole or says nothing."""
    if identity is None or identity.complete:
        return None
    return int(pd.Timestamp(identity.through_text).value)


def _plain(value: object) -> object:
    """Metadata values Dagster accepts as they are; anything else as text."""
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def record_paid(
    context: AssetExecutionContext, key: AssetKey, partition: Partition, paid: float
) -> None:
    """Record what a step paid Databento for a partition (nothing when it paid nothing): the
    build's summary adds these up, so each dollar is counted once, where it was spent."""
    if paid:
        context.log_event(
            AssetObservation(
                asset_key=key,
                partition=partition.key,
                description=f"Paid Databento ${paid:,.4f} (downloads refused included)",
                metadata={PAID_KEY: paid},
            )
        )


def _prefetch_vendor_1m(
    source: MonthSource, request: FetchRequest, log: Logger, compared: bool
) -> dict[str, Any]:
    """Buy Databento's ohlcv-1m of the partition in the download step, when it is wanted.

    ``raw_1s_bars`` runs in the ``databento`` pool, so the paid 1-minute request shares the
    pool's limit with the 1-second one, and ``request.force`` renews the 1-minute bars;
    ``bars_1min``'s check then finds the file in the cache. A failure never fails the data:
    it is returned as ``vendor_1m_error`` (the check of this run then says why it compared
    nothing). Returns the metadata to add to the raw materialization (empty when not asked,
    or when the catalog has no 1min timeframe to compare: not ``compared``).
    """
    if not source.vendor_requested:
        return {}
    if not compared:
        log(
            "DBENTO_VENDOR_CHECK is on, but the catalog has no 1min timeframe to compare with "
            'Databento\'s 1-minute bars, so they were not bought; add "1min" to timeframes '
            "to use the cross-check"
        )
        return {}
    found = source.vendor_bars(request, log)
    if isinstance(found, str):
        log(f"Databento's 1-minute bars (for the vendor cross-check) were not downloaded: {found}")
        return {VENDOR_ERROR_KEY: found}
    return {
        f"vendor_1m_{key}": found.metadata[key]
        for key in ("dbn_cache", DBN_FILE_KEY, "cost_usd", "record_count")
        if found.metadata.get(key) is not None
    }
