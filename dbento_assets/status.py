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

from dagster import DagsterInstance

from dbento_assets.checks import all_check_keys
from dbento_assets.core.catalog import load_catalog
from dbento_assets.core.months import Month, month_range
from dbento_assets.io_managers import io_manager_from_env
from dbento_assets.report import collect, matrix
from dbento_assets.resources import databento_resource_from_env


def render(instance: DagsterInstance, symbols: Sequence[str] | None = None) -> str:
    """The symbol x month table as plain text."""
    catalog = load_catalog()
    wanted = list(symbols) if symbols else catalog.symbols
    for symbol in wanted:
        catalog.instrument(symbol)  # a CatalogError naming the known symbols
    store = io_manager_from_env(databento_resource_from_env()).store
    cells = matrix(collect(instance, all_check_keys(catalog), wanted))
    per_month = 1 + len(catalog.timeframes)
    last = current_month()
    rows: list[list[str]] = []
    for month in month_range(catalog.start_month, max(last, catalog.start_month)):
        row = [str(month)]
        for symbol in wanted:
            files = int(store.raw_path(symbol, month).exists()) + sum(
                store.aggregated_path(symbol, month, tf).exists() for tf in catalog.timeframes
            )
            checked = cells.get((str(month), symbol))
            status = "unchecked" if checked is None else _status(*checked)
            identity = store.identity_of(store.raw_path(symbol, month)) if files else None
            partial = (
                f", partial to {identity.through_text[:10]}"
                if identity is not None and not identity.complete
                else ""
            )
            row.append(
                "-"
                if files == 0 and checked is None
                else f"{files}/{per_month} files{partial}, {status}"
            )
        if any(cell != "-" for cell in row[1:]):
            rows.append(row)
    history = os.environ.get("DAGSTER_HOME", "")
    head = f"Data folder {store.root} ({store.fmt} files); history in {history}"
    if not rows:
        return (
            f"{head}\nNothing built yet: try dbento build --symbol ES --start {catalog.start_month}"
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
