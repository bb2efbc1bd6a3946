"""The validation rules as Dagster asset checks, evaluated inside the steps that make the data.

Each rule of :mod:`dbento_assets.core.rules` is an ``AssetCheckSpec`` partitioned like its
asset (ERROR rules blocking, calendar completeness a WARN). A step yields every result, and
when an ERROR rule fails it fails with :func:`refusal` without yielding the frame, so a bad
frame is never written. The vendor cross-check is declared only where it can compare
(``DatabentoResource.declares_vendor_check``), and is never a green pass when nothing was
compared: a failed WARN when the user asked for it, left unevaluated (and logged) otherwise.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import pandas as pd
from dagster import (
    AssetCheckKey,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    Failure,
    MetadataValue,
    PartitionsDefinition,
    PreviewWarning,
)

from dbento_assets.core import rules as v
from dbento_assets.core.catalog import Catalog, Instrument
from dbento_assets.core.comparison import check_vendor, vendor_skipped
from dbento_assets.core.coverage import (
    VendorMonth,
    Window,
    intersect_windows,
    whole_minutes,
)
from dbento_assets.core.months import Month
from dbento_assets.core.run_rules import run_raw_rules
from dbento_assets.core.source import (
    Logger,
)
from dbento_assets.core.storage import windows_json
from dbento_assets.core.timeframes import Timeframe
from dbento_assets.names import RAW_KEY, bars_asset_name

SAVED = "saved"
REFUSED = "refused: not saved, the file on disk (if any) is unchanged"
CHECKED_ON_DISK = "checked the file on disk"


# --------------------------------------------------------------------------- check specs


def check_names(timeframe: Timeframe | None = None, *, vendor: bool = True) -> tuple[str, ...]:
    """The checks of ``raw_1s_bars`` (no timeframe) or of ``bars_<timeframe>``, in order;
    the vendor cross-check of ``bars_1min`` only with ``vendor`` (see
    :meth:`~dbento_assets.resources.DatabentoResource.declares_vendor_check`)."""
    if timeframe is None:
        return v.RAW_RULES
    compared = (v.RULE_VENDOR,) if vendor and timeframe.seconds == 60 else ()
    return (*v.AGGREGATED_RULES, *compared)


def check_specs(
    asset_key: AssetKey,
    partitions: PartitionsDefinition,
    timeframe: Timeframe | None = None,
    *,
    vendor: bool = True,
) -> list[AssetCheckSpec]:
    """One partitioned spec per rule; ERROR rules block, the WARN rule does not."""
    specs = []
    with warnings.catch_warnings():
        # A partitioned check spec is a preview feature in Dagster 1.13: without it a check
        # result is not attributed to its partition.
        warnings.simplefilter("ignore", PreviewWarning)
        for name in check_names(timeframe, vendor=vendor):
            severity = v.RULE_SEVERITY[name]
            specs.append(
                AssetCheckSpec(
                    name,
                    asset=asset_key,
                    description=f"{v.RULE_TITLES[name]} ({severity}"
                    + (", blocks the data)" if blocking(name) else ", informs only)"),
                    blocking=blocking(name),
                    partitions_def=partitions,
                    metadata={"severity": severity},
                )
            )
    return specs


def blocking(check_name: str) -> bool:
    """Whether the check of a rule blocks the data: its ERROR rules do."""
    return v.RULE_SEVERITY.get(check_name) == v.ERROR


def all_check_keys(catalog: Catalog, *, vendor: bool = True) -> list[AssetCheckKey]:
    """Every check of a catalog's assets: raw first, then each timeframe's (the vendor
    cross-check with ``vendor``)."""
    keys = [AssetCheckKey(RAW_KEY, name) for name in check_names()]
    for tf in catalog.timeframes:
        asset = AssetKey(bars_asset_name(tf))
        keys += [AssetCheckKey(asset, name) for name in check_names(tf, vendor=vendor)]
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
            "(dbento report).",
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
    results = run_raw_rules(raw, month, instrument, rules=v.RAW_BLOCKING_RULES)
    return [r for r in results if r.blocking]


# --------------------------------------------------------------------------- history (the report)


# --------------------------------------------------------------------------- vendor 1m


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
    otherwise (a DBN folder without ohlcv-1m files) None: the step yields no result, so
    Dagster shows the check as skipped (not executed), and the reason goes to the step's log.
    """
    if isinstance(vendor, str):
        result = vendor_skipped(vendor)
    else:
        common = intersect_windows(raw_covered, vendor.covered)
        minutes = whole_minutes(common)
        if len(minutes) == 0:
            result = vendor_skipped(
                f"the 1-second bars and Databento's 1-minute bars ({vendor.origin}) share no "
                "whole minute"
            )
        else:
            whole_month = common == [(month.start_ns, month.end_ns)]
            result = check_vendor(
                bars_1min,
                vendor.bars,
                covered_minutes=None if whole_month else minutes,
                month=month,
            )
            result.extra["vendor_source"] = vendor.origin
            result.extra["compared_windows"] = windows_json(common)
            return result
    if not requested:
        log(f"{v.RULE_VENDOR} not evaluated: {result.extra['skipped_because']}")
        return None
    return result
