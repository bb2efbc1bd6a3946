"""``dbento estimate``: price a range of symbol-months before buying it.

Asks Databento's free ``metadata.get_cost`` / ``get_billable_size`` per partition and prints
one line each and the total; months already cached cost nothing, a growing month costs only
its missing tail, and partitions above ``DBENTO_MAX_COST_USD`` are flagged. With
``DBENTO_VENDOR_CHECK`` on, the ohlcv-1m of each month is priced too.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
from collections.abc import Sequence
from typing import TextIO

from dbento_assets.core.catalog import CatalogError, load_catalog
from dbento_assets.core.databento_api import CostEstimate, format_usd
from dbento_assets.core.months import Month, month_range
from dbento_assets.core.source import SourceError
from dbento_assets.resources import databento_resource_from_env


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dbento estimate",
        description="Estimate the Databento cost of downloading ohlcv-1s months (free calls).",
    )
    parser.add_argument(
        "--symbols",
        "--symbol",  # as dbento build and dbento status spell it
        dest="symbols",
        help="comma-separated catalog symbols (default: every catalog symbol)",
    )
    parser.add_argument("--start", help="first month, YYYY-MM (default: the catalog's start_month)")
    parser.add_argument("--end", help="last month, YYYY-MM, inclusive (default: --start)")
    parser.add_argument("--catalog", help="catalog file (default: DBENTO_CATALOG or packaged)")
    return parser.parse_args(argv)


def format_size(size: int | None) -> str:
    """Bytes in decimal units: ``512 B``, ``1.2 MB``, ``3.4 GB``."""
    if size is None:
        return "-"
    if size < 1000:
        return f"{size} B"
    value, unit = float(size) / 1000, "KB"
    for bigger in ("MB", "GB", "TB"):
        if value < 1000:
            break
        value, unit = value / 1000, bigger
    return f"{value:,.1f} {unit}"


def format_line(est: CostEstimate, schema: str = "ohlcv-1s") -> str:
    head = f"{est.symbol:<8} {est.month!s:<8}"
    if schema != "ohlcv-1s":  # the optional vendor bars, on their own line
        note = f"{schema} for the vendor check" + (f"; {est.note}" if est.note else "")
        est = dataclasses.replace(est, note=note)
    if est.cached:
        return f"{head} {'skipped':>12} {'-':>10}  already in the DBN cache ({est.note})"
    if est.cost_usd is None:
        return f"{head} {'n/a':>12} {'-':>10}  {est.note}"
    tail = f"  {est.note}" if est.note else ""
    return f"{head} ${est.cost_usd:>11,.4f} {format_size(est.billable_size_bytes):>10}{tail}"


def run(
    argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Print the estimate; return the process exit status (0, or 2 on a usage/API error)."""
    out = out or sys.stdout
    err = err or sys.stderr
    args = parse_args(argv)
    try:
        catalog = load_catalog(args.catalog)
        symbols = (
            [s.strip() for s in args.symbols.split(",") if s.strip()]
            if args.symbols
            else catalog.symbols
        )
        instruments = [catalog.instrument(s) for s in symbols]
        first = Month.parse(args.start) if args.start else catalog.start_month
        last = Month.parse(args.end) if args.end else first
        if last < first:
            raise ValueError(f"--end {last} is before --start {first}")
        if first < catalog.start_month:  # months dbento build refuses are not priced
            raise ValueError(
                f"--start {first} is before the catalog's start_month {catalog.start_month}; "
                "move start_month in the catalog to price earlier months"
            )
        resource = databento_resource_from_env()
        if not (resource.api_key or ""):
            raise SourceError(_no_key_advice(resource.source))
        api = resource.api_source()
        # With DBENTO_VENDOR_CHECK on, each month also buys Databento's own 1-minute bars.
        schemas = ("ohlcv-1s", "ohlcv-1m") if resource.vendor_check else ("ohlcv-1s",)
        months = month_range(first, last)
        print(f"{'symbol':<8} {'month':<8} {'est. cost':>12} {'size':>10}", file=out)
        total_cost = 0.0
        total_size = 0
        counts = {"download": 0, "cached": 0, "unavailable": 0, "above": 0}
        for inst in instruments:
            for month, schema in itertools.product(months, schemas):
                est = api.estimate(inst, month, schema)
                print(format_line(est, schema), file=out, flush=True)
                if est.cached:
                    counts["cached"] += 1
                elif est.cost_usd is None:
                    counts["unavailable"] += 1
                else:
                    counts["download"] += 1
                    total_cost += est.cost_usd
                    total_size += est.billable_size_bytes or 0
                    counts["above"] += est.cost_usd > api.max_cost_usd
    except (CatalogError, SourceError, ValueError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=err)
        return 2
    print(
        f"total: ${total_cost:,.4f} for {counts['download']} partition(s) to download, "
        f"{format_size(total_size)} billable; {counts['cached']} cached month(s) skipped; "
        f"{counts['unavailable']} not available",
        file=out,
    )
    if counts["above"]:
        print(
            f"{counts['above']} partition(s) above the ceiling of {format_usd(api.max_cost_usd)} "
            "(DBENTO_MAX_COST_USD) would be refused",
            file=out,
        )
    return 0


def _no_key_advice(source: str) -> str:
    """Why the estimate cannot run without a key, in words that fit the source in use."""
    if source == "databento":
        return (
            "the estimate asks Databento for prices and needs your API key: put "
            "DATABENTO_API_KEY=db-... in dbento.env (keys: https://databento.com/portal/keys); "
            "to try the pipeline without an account use DBENTO_SOURCE=demo"
        )
    return (
        f"the estimate prices downloads from Databento, and DBENTO_SOURCE={source} downloads "
        "nothing and costs nothing; to price real data, put DATABENTO_API_KEY=db-... in "
        "dbento.env"
    )


def main() -> None:
    raise SystemExit(run())


if __name__ == "__main__":
    main()
