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
the resource's ``vendor_check`` on, a download by the API source's ``fetch_vendor_1m``. Only
minutes both the 1s data and the 1m data fully cover are compared (:func:`dbn_coverage` reads
the DBN headers; a request cut short by its ``limit`` covers up to its last record); with
nothing to compare the check passes and its metadata says ``skipped`` and why.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
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
from dbento_assets.core.bars import empty_bars, sort_bars
from dbento_assets.core.catalog import Catalog, Instrument
from dbento_assets.core.dbn import DbnError, DbnPayload, decode_month, open_store, read_records
from dbento_assets.core.dbn_files import DbnFilesSource
from dbento_assets.core.months import Month
from dbento_assets.core.source import FetchRequest, Logger, SourceError
from dbento_assets.core.timeframes import Timeframe
from dbento_assets.io_managers import BARS_PREFIX, RAW_ASSET
from dbento_assets.resources import DatabentoResource

RAW_KEY = AssetKey(RAW_ASSET)
COVERAGE_KEY = "covered"  # raw_1s_bars metadata: the windows its DBN data covers
VENDOR_SCHEMA = "ohlcv-1m"
MINUTE_NS = v.MINUTE_NS
SAVED = "saved"
REFUSED = "refused: not saved, the file on disk (if any) is unchanged"
CHECKED_ON_DISK = "checked the file on disk"
COMPLETED = frozenset(
    {AssetCheckExecutionRecordStatus.SUCCEEDED, AssetCheckExecutionRecordStatus.FAILED}
)
_UNDEFINED_END = 2**63 - 1

Window = tuple[int, int]  # [start_ns, end_ns) in UTC nanoseconds


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


def dbn_coverage(payloads: Iterable[DbnPayload], month: Month, schema: str) -> list[Window]:
    """The windows of ``month`` that DBN payloads cover, from their metadata headers.

    A payload covers ``[start, end)`` of its request, clipped to the month. A request cut
    short by its ``limit`` (it holds ``limit`` records) covers only up to its last record,
    exclusive; only then are its records read. Windows are merged.
    """
    windows = []
    for payload in payloads:
        try:
            meta = open_store(payload, schema).metadata
        except DbnError:
            continue  # decoding has already judged the payload; coverage stays conservative
        start = max(int(meta.start), month.start_ns)
        end_value = None if meta.end is None else int(meta.end)
        end = (
            month.end_ns
            if end_value is None or end_value <= 0 or end_value >= _UNDEFINED_END
            else min(end_value, month.end_ns)
        )
        if meta.limit:
            records, _ = read_records(payload, schema)
            if len(records) >= int(meta.limit) and len(records):
                end = min(end, int(records["ts_event"].max()))
        if start < end:
            windows.append((start, end))
    return merge_windows(windows)


def merge_windows(windows: Iterable[Window]) -> list[Window]:
    """Sorted, non-overlapping windows (touching windows joined)."""
    merged: list[Window] = []
    for start, end in sorted(windows):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def intersect_windows(a: Sequence[Window], b: Sequence[Window]) -> list[Window]:
    """The windows covered by both ``a`` and ``b``."""
    out = [(max(s1, s2), min(e1, e2)) for s1, e1 in a for s2, e2 in b]
    return merge_windows(w for w in out if w[0] < w[1])


def whole_minutes(windows: Sequence[Window]) -> pd.DatetimeIndex:
    """The minutes lying entirely inside the windows, as UTC bar opens."""
    parts = [
        np.arange(-(-start // MINUTE_NS) * MINUTE_NS, (end // MINUTE_NS) * MINUTE_NS, MINUTE_NS)
        for start, end in windows
    ]
    ns = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
    return pd.DatetimeIndex(pd.to_datetime(ns, unit="ns", utc=True))


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


@dataclass
class VendorMonth:
    """Databento's own 1-minute bars of one instrument-month, and what they cover."""

    bars: pd.DataFrame
    covered: list[Window]
    origin: str


def _mapped_spans(mapped: list[tuple[Any, Any, str]], month: Month) -> list[tuple[int, int, int]]:
    """A file's symbology intervals for our symbol as (instrument_id, start_ns, end_ns)."""
    spans = []
    for start, end, symbol in mapped:
        try:
            iid = int(symbol)
        except ValueError:
            continue  # an empty or non-numeric mapping: nothing of ours in that range
        lo = max(pd.Timestamp(start, tz="UTC").value, month.start_ns)
        hi = min(pd.Timestamp(end, tz="UTC").value, month.end_ns)
        if lo < hi:
            spans.append((iid, lo, hi))
    return spans


def vendor_1m_from_dbn_dir(
    dbn_dir: str | Path, instrument: Instrument, month: Month
) -> VendorMonth | None:
    """Databento's ohlcv-1m of the instrument-month from a folder of DBN files, or None.

    Files are chosen from their headers as the DBN-files source chooses its 1s files (same
    dataset and ``stype_in``, the request symbol mapped on a date of the month), and their
    records are kept only where the symbology maps the request symbol to their
    instrument_id on that date, so a file mapping ``ES.v.0`` and ``ES.v.1`` never mixes
    contracts. Coverage is clipped to the mapped dates.
    """
    source = DbnFilesSource(dbn_dir)
    chosen = []
    for info in source.scan():
        if info.dataset != instrument.dataset or info.schema != VENDOR_SCHEMA:
            continue
        if not info.overlaps(month):
            continue
        if info.stype_in is not None and info.stype_in != instrument.stype_in:
            continue
        spans = _mapped_spans(info.mappings.get(instrument.request_symbol, []), month)
        if spans:
            chosen.append((info, spans))
    if not chosen:
        return None
    frames, covered = [], []
    for info, spans in chosen:
        ids = sorted({iid for iid, _, _ in spans})
        bars = decode_month([info.path], instrument.symbol, month, ids, schema=VENDOR_SCHEMA).bars
        ts = bars["ts_event"].array.as_unit("ns").asi8
        iid = bars["instrument_id"].to_numpy()
        keep = np.zeros(len(bars), dtype=bool)
        for instrument_id, lo, hi in spans:  # a few intervals, not rows
            keep |= (iid == instrument_id) & (ts >= lo) & (ts < hi)
        frames.append(bars[keep])
        mapped = merge_windows((lo, hi) for _, lo, hi in spans)
        covered += intersect_windows(dbn_coverage([info.path], month, VENDOR_SCHEMA), mapped)
    frames = [f for f in frames if len(f)]
    bars = sort_bars(pd.concat(frames, ignore_index=True)) if frames else empty_bars()
    names = ", ".join(_relative(info.path, source.dbn_dir) for info, _ in chosen)
    return VendorMonth(bars, merge_windows(covered), f"DBN files in {source.dbn_dir}: {names}")


def load_vendor_1m(
    databento: DatabentoResource, instrument: Instrument, month: Month, log: Logger
) -> VendorMonth | str:
    """Databento's own 1m bars for the partition, or the reason there are none to compare.

    Source ``dbn``: ohlcv-1m files in its folder. Source ``databento``: only when the
    resource's ``vendor_check`` is on, via the API source's ``fetch_vendor_1m(request, log) ->
    FetchedMonth``. Source ``demo``: synthetic data, nothing to compare. A failed lookup or
    download is a reason too (the check is skipped, it does not pass or fail the data).
    """
    name = (databento.source or "").strip().lower()
    try:
        if name == "dbn":
            found = vendor_1m_from_dbn_dir(databento.dbn_dir or "", instrument, month)
            if found is None:
                return (
                    f"no {VENDOR_SCHEMA} DBN file for {instrument.symbol} "
                    f"({instrument.request_symbol}, {instrument.dataset}) in {month} in "
                    f"{databento.dbn_dir}"
                )
            return found
        if name == "databento":
            if not getattr(databento, "vendor_check", False):
                return (
                    "the optional download of Databento's 1-minute bars is off "
                    "(DBENTO_VENDOR_CHECK=true turns it on)"
                )
            api = databento.api_source()
            fetch = getattr(api, "fetch_vendor_1m", None)
            if fetch is None:
                return "this version of the Databento source cannot download 1-minute bars"
            fetched = fetch(FetchRequest(instrument, month), log)
            bars = decode_month(
                fetched.payloads,
                instrument.symbol,
                month,
                fetched.instrument_ids,
                schema=VENDOR_SCHEMA,
            ).bars
            covered = dbn_coverage(fetched.payloads, month, VENDOR_SCHEMA)
            return VendorMonth(bars, covered, f"Databento API ({VENDOR_SCHEMA})")
    except (SourceError, DbnError) as exc:
        return f"Databento's 1-minute bars could not be read ({exc})"
    return "the demo source is synthetic, there are no Databento bars to compare with"


def vendor_result(
    bars_1min: pd.DataFrame, vendor: VendorMonth | str, raw_covered: Sequence[Window], month: Month
) -> v.RuleResult:
    """The vendor cross-check on the minutes both the 1s data and the 1m data fully cover."""
    if isinstance(vendor, str):
        return v.vendor_skipped(vendor)
    common = intersect_windows(raw_covered, vendor.covered)
    minutes = whole_minutes(common)
    if len(minutes) == 0:
        return v.vendor_skipped(
            f"the 1-second bars and Databento's 1-minute bars ({vendor.origin}) share no "
            "whole minute"
        )
    whole_month = common == [(month.start_ns, month.end_ns)]
    result = v.check_vendor(
        bars_1min, vendor.bars, covered_minutes=None if whole_month else minutes, month=month
    )
    result.extra["vendor_source"] = vendor.origin
    result.extra["compared_windows"] = windows_metadata(common)
    return result


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)
