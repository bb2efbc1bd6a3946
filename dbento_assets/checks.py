"""The validation rules as Dagster asset checks, evaluated inside the assets that make the data.

Every rule of :mod:`dbento_assets.core.validation` is its own asset check, an
``AssetCheckSpec`` declared on ``raw_1s_bars`` or on a ``bars_<tf>`` and partitioned like its
asset, so the UI shows its status per symbol-month; ERROR rules are ``blocking``, the
calendar-completeness rule is a non-blocking WARN. The checks run *inside* the asset, on the
frame in memory and before it reaches the IO manager (a blocking check only stops downstream
steps, while the asset's own file would already be written): when an ERROR rule fails the
asset yields every check result, so they are stored against the partition, then fails the
step with :func:`refusal` without yielding the output, so the bad frame is never written and
the files on disk stay as they were. Each result carries the violation count, the first
violating rows as a Markdown table and a one-line description (:func:`check_result`). Before
building bars, :func:`raw_gate` re-runs the blocking raw rules on the raw frame loaded (the
guarantee, whatever the instance remembers) and :func:`raw_failures_in_instance` finds a
blocking raw check whose latest evaluation for the partition failed after the latest raw
materialization (a refused download: raw is fixed once ``raw_1s_bars`` materializes again with
its checks passing). The vendor cross-check compares ``bars_1min`` with Databento's own
ohlcv-1m of the same instrument-month (:func:`load_vendor_1m`): ohlcv-1m files in the
``DBENTO_DBN_DIR`` folder with ``DBENTO_SOURCE=dbn``, or with ``DBENTO_SOURCE=databento`` and
the resource's ``vendor_check`` on (``DBENTO_VENDOR_CHECK=true``), Databento's ohlcv-1m bought
by ``raw_1s_bars`` in the download pool (:func:`prefetch_vendor_1m`) and cached next to the
1-second file. Only minutes both the 1s data and the 1m data fully cover are compared
(:func:`~dbento_assets.core.coverage.dbn_coverage` reads the DBN headers; a request cut short
by its ``limit`` covers up to its last record). With nothing to compare it is never a green
pass: when the user asked for the comparison (``DBENTO_VENDOR_CHECK=true``) and the 1-minute
bars could not be had, it is a failed WARN (yellow in the UI, never blocking: Dagster blocks
only on a failed ERROR) whose description says why; when nobody asked (demo data, the
setting off, a DBN folder without ohlcv-1m files) no result is yielded, so Dagster shows the
check as skipped, and the step's log says why.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import pandas as pd
from dagster import (
    AssetCheckKey,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    AssetRecordsFilter,
    DagsterInstance,
    Failure,
    MetadataValue,
    PartitionsDefinition,
    PreviewWarning,
)
from dagster._core.event_api import PartitionKeyFilter
from dagster._core.storage.asset_check_execution_record import (
    AssetCheckExecutionRecord,
    AssetCheckExecutionRecordStatus,
)

from dbento_assets.core import validation as v
from dbento_assets.core.catalog import Catalog, Instrument
from dbento_assets.core.coverage import (
    VendorMonth,
    Window,
    dbn_coverage,
    intersect_windows,
    merge_windows,
    whole_minutes,
)
from dbento_assets.core.databento_api import VENDOR_SCHEMA, DatabentoSource
from dbento_assets.core.dbn import DbnError, decode_month
from dbento_assets.core.dbn_files import DbnFilesSource
from dbento_assets.core.months import Month
from dbento_assets.core.source import (
    DownloadRefused,
    FetchedMonth,
    FetchRequest,
    Logger,
    MonthSource,
    SourceError,
)
from dbento_assets.core.timeframes import Timeframe
from dbento_assets.io_managers import BARS_PREFIX, RAW_ASSET
from dbento_assets.resources import DatabentoResource

RAW_KEY = AssetKey(RAW_ASSET)
COVERAGE_KEY = "covered"  # raw_1s_bars metadata: the windows its DBN data covers
VENDOR_ERROR_KEY = "vendor_1m_error"  # raw_1s_bars metadata: the 1m download failed
SAVED = "saved"
REFUSED = "refused: not saved, the file on disk (if any) is unchanged"
CHECKED_ON_DISK = "checked the file on disk"
COMPLETED = frozenset(
    {AssetCheckExecutionRecordStatus.SUCCEEDED, AssetCheckExecutionRecordStatus.FAILED}
)


# --------------------------------------------------------------------------- check specs


def bars_asset_name(timeframe: Timeframe) -> str:
    """``bars_15s``, ``bars_1min``, ...: the asset of a timeframe."""
    return f"{BARS_PREFIX}{timeframe.label}"


def check_names(timeframe: Timeframe | None = None) -> tuple[str, ...]:
    """The checks of ``raw_1s_bars`` (no timeframe) or of ``bars_<timeframe>``, in order."""
    if timeframe is None:
        return v.RAW_RULES
    vendor = (v.RULE_VENDOR,) if timeframe.seconds == 60 else ()
    return (*v.AGGREGATED_RULES, *vendor)


def check_specs(
    asset_key: AssetKey, partitions: PartitionsDefinition, timeframe: Timeframe | None = None
) -> list[AssetCheckSpec]:
    """One partitioned spec per rule; ERROR rules block, the WARN rule does not."""
    specs = []
    with warnings.catch_warnings():
        # A partitioned check spec is a preview feature in Dagster 1.13: without it a check
        # result is not attributed to its partition.
        warnings.simplefilter("ignore", PreviewWarning)
        for name in check_names(timeframe):
            severity = v.RULE_SEVERITY[name]
            specs.append(
                AssetCheckSpec(
                    name,
                    asset=asset_key,
                    description=f"{v.RULE_TITLES[name]} ({severity}"
                    + (", blocks the data)" if severity == v.ERROR else ", informs only)"),
                    blocking=severity == v.ERROR,
                    partitions_def=partitions,
                    metadata={"severity": severity},
                )
            )
    return specs


def all_check_keys(catalog: Catalog) -> list[AssetCheckKey]:
    """Every check of a catalog's assets: raw first, then each timeframe's."""
    keys = [AssetCheckKey(RAW_KEY, name) for name in check_names()]
    for tf in catalog.timeframes:
        asset = AssetKey(bars_asset_name(tf))
        keys += [AssetCheckKey(asset, name) for name in check_names(tf)]
    return keys


# --------------------------------------------------------------------------- results


def check_result(asset_key: AssetKey, result: v.RuleResult, outcome: str) -> AssetCheckResult:
    """A rule's result as Dagster records it: count, description, sample table, facts."""
    metadata: dict[str, Any] = {
        "violations": result.violations,
        "severity": result.severity,
        "outcome": outcome,
    }
    table = result.sample_markdown()
    if table:
        metadata["first_violations"] = MetadataValue.md(table)
    for key, value in result.extra.items():
        if value is not None and key not in metadata:
            metadata[key] = _metadata_value(value)
    return AssetCheckResult(
        asset_key=asset_key,
        check_name=result.rule,
        passed=result.passed,
        severity=(
            AssetCheckSeverity.ERROR if result.severity == v.ERROR else AssetCheckSeverity.WARN
        ),
        description=result.description,
        metadata=metadata,
    )


def selected_results(
    context: AssetExecutionContext,
    asset_key: AssetKey,
    results: Iterable[v.RuleResult],
    outcome: str,
) -> Iterator[AssetCheckResult]:
    """The check results of the checks selected in this run (all rules run regardless)."""
    selected = context.selected_asset_check_keys
    for result in results:
        if AssetCheckKey(asset_key, result.rule) in selected:
            yield check_result(asset_key, result, outcome)


def refusal(head: str, failed: Sequence[v.RuleResult], *, files_unchanged: bool = True) -> Failure:
    """The step failure for data failing blocking rules: ``head``, then one line per failed
    rule in plain words, then (when ``files_unchanged``) that the files on disk were kept."""
    lines = [f"- {r.title}: {r.description}" for r in failed]
    tail = "The files already on disk for this partition were left unchanged. " * files_unchanged
    text = "\n".join(
        [
            head,
            *lines,
            tail + "The first violating rows are in each check's metadata and in the report "
            "(python -m dbento_assets.report).",
        ]
    )
    return Failure(
        description=text,
        metadata={
            "failed_checks": ", ".join(r.rule for r in failed),
            "violations": sum(r.violations for r in failed),
        },
        allow_retries=False,
    )


def not_saved(asset: str, partition: str, failed: Sequence[v.RuleResult]) -> str:
    """``bars_1min for 2024-01-01|ES was NOT saved: 1 blocking check failed.``"""
    n = len(failed)
    return f"{asset} for {partition} was NOT saved: {n} blocking check{'s' * (n != 1)} failed."


def _metadata_value(value: Any) -> Any:
    """Plain values as they are, a list of plain values as text, anything else as JSON."""
    if isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple) and all(
        isinstance(item, bool | int | float | str) for item in value
    ):
        return ", ".join(str(item) for item in value) or "none"
    return MetadataValue.json(value)


# --------------------------------------------------------------------------- raw gate


def raw_gate(raw: pd.DataFrame, month: Month, instrument: Instrument) -> list[v.RuleResult]:
    """The blocking raw rules that the raw frame fails (empty when it is fit to aggregate)."""
    results = v.run_raw_rules(raw, month, instrument, rules=v.RAW_BLOCKING_RULES)
    return [r for r in results if r.blocking]


def latest_raw_materialization(instance: DagsterInstance, partition: str) -> Any:
    """The newest materialization record of ``raw_1s_bars`` for one partition, or None."""
    records = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=RAW_KEY, asset_partitions=[partition]), limit=1
    ).records
    return records[0] if records else None


def latest_evaluation(
    instance: DagsterInstance, key: AssetCheckKey, partition: str
) -> AssetCheckExecutionRecord | None:
    """The newest completed (passed or failed) evaluation of a check for one partition."""
    history = instance.event_log_storage.get_asset_check_execution_history(
        key, limit=1, status=set(COMPLETED), partition_filter=PartitionKeyFilter(key=partition)
    )
    return history[0] if history else None


def raw_failures_in_instance(
    instance: DagsterInstance, partition: str
) -> list[AssetCheckExecutionRecord]:
    """Blocking raw checks whose latest evaluation for ``partition`` failed after the latest
    raw materialization (a refused download not yet followed by a good one)."""
    materialized = latest_raw_materialization(instance, partition)
    since = materialized.timestamp if materialized is not None else None
    failed = []
    for name in v.RAW_BLOCKING_RULES:
        record = latest_evaluation(instance, AssetCheckKey(RAW_KEY, name), partition)
        if (
            record is not None
            and record.status == AssetCheckExecutionRecordStatus.FAILED
            and record.event is not None
            and (since is None or record.event.timestamp > since)
        ):
            failed.append(record)
    return failed


def evaluation_of(record: AssetCheckExecutionRecord) -> Any:
    """The AssetCheckEvaluation stored in a completed execution record."""
    event = record.event.dagster_event if record.event is not None else None
    return event.event_specific_data if event is not None else None


# --------------------------------------------------------------------------- coverage


def windows_metadata(windows: Sequence[Window]) -> list[dict[str, str]]:
    """Windows as JSON-friendly ``{"start": iso, "end": iso}`` items (UTC)."""
    return [
        {
            "start": pd.Timestamp(s, tz="UTC").isoformat(),
            "end": pd.Timestamp(e, tz="UTC").isoformat(),
        }
        for s, e in windows
    ]


def windows_from_metadata(value: Any) -> list[Window] | None:
    """Windows recorded by :func:`windows_metadata` (None if the value is not such a list)."""
    data = getattr(value, "data", value)
    if not isinstance(data, list):
        return None
    try:
        return merge_windows(
            (pd.Timestamp(item["start"]).value, pd.Timestamp(item["end"]).value) for item in data
        )
    except (KeyError, TypeError, ValueError):
        return None


def raw_coverage(instance: DagsterInstance, partition: str, month: Month) -> list[Window]:
    """What the latest ``raw_1s_bars`` of the partition covers, from its metadata.

    A materialization without that metadata (made before it was recorded) counts as covering
    the whole month.
    """
    whole = [(month.start_ns, month.end_ns)]
    record = latest_raw_materialization(instance, partition)
    if record is None or record.asset_materialization is None:
        return whole
    found = windows_from_metadata(record.asset_materialization.metadata.get(COVERAGE_KEY))
    return whole if found is None else found


# --------------------------------------------------------------------------- vendor 1m


def vendor_accept(instrument: Instrument, month: Month) -> Callable[[FetchedMonth], VendorMonth]:
    """The ``accept`` of a vendor 1m download: it must decode and its bars must be consistent
    (high/low), or it is refused, quarantined and remembered (not bought again without force).
    Returns what the cross-check compares with, so the file is decoded once per step."""

    def accept(fetched: FetchedMonth) -> VendorMonth:
        bars = decode_month(
            fetched.payloads, instrument.symbol, month, fetched.instrument_ids, VENDOR_SCHEMA
        ).bars
        ohlc = v.check_ohlc(bars)
        if not ohlc.passed:
            raise DownloadRefused(
                f"Databento's {VENDOR_SCHEMA} bars of {instrument.symbol} {month} fail the "
                f"rule {ohlc.rule} ({ohlc.description}).",
                rules=[ohlc.rule],
            )
        covered = dbn_coverage(fetched.payloads, month, VENDOR_SCHEMA)
        return VendorMonth(bars, covered, f"Databento API ({VENDOR_SCHEMA})")

    return accept


def prefetch_vendor_1m(
    databento: DatabentoResource, source: MonthSource, request: FetchRequest, log: Logger
) -> dict[str, Any]:
    """Buy Databento's ohlcv-1m of the partition in the download step, when it is wanted.

    Only with the API source and the resource's ``vendor_check`` on (``DBENTO_VENDOR_CHECK``):
    ``raw_1s_bars`` runs in the ``databento`` pool, so the paid 1-minute request shares the
    pool's limit with the 1-second one, and a forced download (``request.force``) renews both.
    The file lands in the DBN cache next to the 1-second one, where ``bars_1min``'s check
    finds it. A failed or refused download never fails the data: it is logged and returned
    as ``vendor_1m_error`` (the check of this run then says why it compared nothing); a
    refused one is remembered by the cache and not bought again without force. Returns the
    metadata to add to the raw materialization (empty when nothing was asked).
    """
    if not databento.vendor_check or not isinstance(source, DatabentoSource):
        return {}
    try:
        fetched, _ = source.fetch_accepted(
            request, log, vendor_accept(request.instrument, request.month), VENDOR_SCHEMA
        )
    except (SourceError, DbnError, OSError) as exc:
        log(f"Databento's 1-minute bars (for the vendor cross-check) were not downloaded: {exc}")
        return {VENDOR_ERROR_KEY: str(exc)}
    found = fetched.metadata
    return {
        f"vendor_1m_{key}": found[key]
        for key in ("dbn_cache", "dbn_file", "cost_usd", "record_count")
        if found.get(key) is not None
    }


def vendor_failure_in_run(instance: DagsterInstance, partition: str, run_id: str) -> str | None:
    """Why the cross-check has no vendor bars, when ``raw_1s_bars`` of this very run failed
    to download them (so the aggregation step does not pay for a second round of retries)."""
    record = latest_raw_materialization(instance, partition)
    if record is None or record.run_id != run_id or record.asset_materialization is None:
        return None
    value = record.asset_materialization.metadata.get(VENDOR_ERROR_KEY)
    text = getattr(value, "value", value)
    if not text:
        return None
    return f"downloading Databento's 1-minute bars failed in raw_1s_bars of this run ({text})"


def load_vendor_1m(
    databento: DatabentoResource, instrument: Instrument, month: Month, log: Logger
) -> VendorMonth | str:
    """Databento's own 1m bars for the partition, or the reason there are none to compare.

    Source ``dbn``: ohlcv-1m files in its folder (:meth:`DbnFilesSource.vendor_1m`). Source
    ``databento``: only when the resource's ``vendor_check`` is on, via the API source's
    :meth:`~dbento_assets.core.databento_api.DatabentoSource.fetch_vendor_1m`: normally a
    cache hit, as ``raw_1s_bars`` downloaded the file (:func:`prefetch_vendor_1m`); a
    download when raw was materialized before the setting was on; a refused download is
    not bought again (the cache remembers it) unless raw is forced. Source ``demo``: synthetic
    data, nothing to compare. A failed lookup or download is a reason too (the check is a
    WARN saying it compared nothing; it neither passes nor blocks the data).
    """
    name = (databento.source or "").strip().lower()
    try:
        if name == "dbn":
            folder = (databento.dbn_dir or "").strip()
            found = DbnFilesSource(folder).vendor_1m(instrument, month) if folder else None
            if found is None:
                return (
                    f"no {VENDOR_SCHEMA} DBN file for {instrument.symbol} "
                    f"({instrument.request_symbol}, {instrument.dataset}) in {month} in "
                    f"{databento.dbn_dir}"
                )
            return found
        if name == "databento":
            if not databento.vendor_check:
                return (
                    "the optional download of Databento's 1-minute bars is off "
                    "(DBENTO_VENDOR_CHECK=true turns it on)"
                )
            _, found = databento.api_source().fetch_accepted(
                FetchRequest(instrument, month),
                log,
                vendor_accept(instrument, month),
                VENDOR_SCHEMA,
            )
            return found
    except (SourceError, DbnError, OSError) as exc:
        return f"Databento's 1-minute bars could not be read ({exc})"
    return "the demo source is synthetic, there are no Databento bars to compare with"


def vendor_requested(databento: DatabentoResource) -> bool:
    """Whether the user asked for the vendor comparison (``DBENTO_VENDOR_CHECK=true`` with the
    API source): then a comparison that could not happen is a warning, not a silence."""
    return databento.vendor_check and (databento.source or "").strip().lower() == "databento"


def vendor_result(
    bars_1min: pd.DataFrame,
    vendor: VendorMonth | str,
    raw_covered: Sequence[Window],
    month: Month,
    *,
    requested: bool,
    log: Logger,
) -> v.RuleResult | None:
    """The vendor cross-check on the minutes both the 1s data and the 1m data fully cover.

    With nothing to compare it is never a green pass. If the user asked for the comparison
    (``requested``) it is a non-blocking WARN saying why (a failed or refused 1m download);
    otherwise (demo data, ``DBENTO_VENDOR_CHECK`` off, a DBN folder without ohlcv-1m files)
    None: the step yields no result, so Dagster shows the check as skipped (not executed), and
    the reason goes to the step's log.
    """
    if isinstance(vendor, str):
        result = v.vendor_skipped(vendor)
    else:
        common = intersect_windows(raw_covered, vendor.covered)
        minutes = whole_minutes(common)
        if len(minutes) == 0:
            result = v.vendor_skipped(
                f"the 1-second bars and Databento's 1-minute bars ({vendor.origin}) share no "
                "whole minute"
            )
        else:
            whole_month = common == [(month.start_ns, month.end_ns)]
            result = v.check_vendor(
                bars_1min,
                vendor.bars,
                covered_minutes=None if whole_month else minutes,
                month=month,
            )
            result.extra["vendor_source"] = vendor.origin
            result.extra["compared_windows"] = windows_metadata(common)
            return result
    if not requested:
        log(f"{v.RULE_VENDOR} not evaluated: {result.extra['skipped_because']}")
        return None
    return result
