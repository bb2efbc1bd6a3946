"""``dbento status``: what is on disk and how its checks went, one line per month.

For every catalog symbol (or the ones asked for) and every month from the catalog's
``start_month`` to the last closed month that has a file or a check result, a cell says how
many of the month's bar files exist (1-second bars plus one per timeframe) and the latest
check status from the Dagster instance, as in the validation report (``pass``, ``WARN (n)``,
``FAIL (n)``, ``unchecked``). The current month is listed too; a month stored partial (it had
not closed when it was built) says ``partial to <date>`` and is never shown as complete.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Sequence

from dagster import AssetKey, DagsterInstance, DagsterRunStatus, RunsFilter

from dbento_assets.checks import all_check_keys
from dbento_assets.core.catalog import load_catalog
from dbento_assets.core.months import Month, instant_text, month_range
from dbento_assets.core.run_rules import built_from_older_raw
from dbento_assets.io_managers import io_manager_from_env
from dbento_assets.names import RAW_KEY, bars_asset_name
from dbento_assets.partitions import PARTITION_TAG, Partition
from dbento_assets.report import collect, matrix
from dbento_assets.resources import databento_resource_from_env


def render(instance: DagsterInstance, symbols: Sequence[str] | None = None) -> str:
    """The symbol x month table as plain text."""
    catalog = load_catalog()
    wanted = list(symbols) if symbols else catalog.symbols
    for symbol in wanted:
        catalog.instrument(symbol)  # a CatalogError naming the known symbols
    databento = databento_resource_from_env()
    io_manager = io_manager_from_env(databento)
    store = io_manager.store
    checks = all_check_keys(catalog, vendor=databento.declares_vendor_check())
    cells = matrix(collect(instance, checks, wanted))
    keys = [RAW_KEY, *(AssetKey(bars_asset_name(tf)) for tf in catalog.timeframes)]
    last = current_month()
    rows: list[list[str]] = []
    for month in month_range(catalog.start_month, max(last, catalog.start_month)):
        row = [str(month)]
        for symbol in wanted:
            # Only a file saying it is this asset partition's, of the instrument the catalog
            # asks for now, counts: not one left by another symbol, request or month.
            partition = Partition(month, symbol)
            instrument = catalog.instrument(symbol)
            found = [
                io_manager.stored_identity(key, partition, instrument, any_origin=True)
                for key in keys
            ]
            # Bars built from other raw bars than the raw file's now (raw rebuilt alone since)
            # are not this month's files: the checks that passed them judged other data.
            behind = sum(built_from_older_raw(found[0], i) for i in found[1:])
            files = sum(i is not None for i in found) - behind
            checked = cells.get((str(month), symbol))
            status = "unchecked" if checked is None else _status(*checked)
            if checked is not None and files < len(keys):
                status = f"incomplete (last checks: {status})"  # not the files' verdict
            if behind:
                status += f"; {behind} bar file(s) built from an older raw file"
            # Partial while any of its files is (raw topped up alone leaves the bars behind).
            ends = sorted(i.through_text for i in found if i is not None and not i.complete)
            partial = f", partial to {instant_text(ends[0])}" if ends else ""
            if files == 0 and checked is None:
                # Never checked: never tried, or its run failed before any check (a download
                # that failed), which must not look the same.
                tried = instance.get_runs(RunsFilter(tags={PARTITION_TAG: str(partition)}), limit=1)
                failed = bool(tried) and tried[0].status == DagsterRunStatus.FAILURE
                row.append(f"0/{len(keys)} files, last run failed" if failed else "-")
            else:
                row.append(f"{files}/{len(keys)} files{partial}, {status}")
        if any(cell != "-" for cell in row[1:]):
            rows.append(row)
    history = os.environ.get("DAGSTER_HOME", "")
    head = f"Data folder {store.root} ({store.fmt} files); history in {history}"
    if not rows:
        return (
            f"{head}\nNothing built yet from {catalog.start_month}: try dbento build --symbol "
            f"{wanted[0]} --start {catalog.start_month}"
        )
    table = [["month", *wanted], *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in table
    ]
    return "\n".join([head, *lines])


def _status(status: str, failing: int) -> str:
    return status if failing == 0 else f"{status} ({failing})"


def last_closed_month() -> Month:
    """The month before the current one (UTC)."""
    return current_month().previous()


def current_month() -> Month:
    """The month in progress (UTC): it has a partition, stored partial until it closes."""
    this = dt.datetime.now(dt.UTC)
    return Month(this.year, this.month)
