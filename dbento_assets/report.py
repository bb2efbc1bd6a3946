"""``dbento report``: the latest result of every check per partition, as a Markdown file.

A symbol x month matrix (``pass`` / ``WARN`` / ``FAIL``) then the details of each failing check,
read from the project's Dagster instance. Exit status 1 when an ERROR check failed, 2 when the
report cannot run, 0 otherwise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from dagster import AssetCheckKey, AssetCheckSeverity, DagsterInstance
from upath import UPath

from dbento_assets.checks import all_check_keys
from dbento_assets.core.catalog import CatalogError, load_catalog
from dbento_assets.core.months import instant_text
from dbento_assets.core.rules import RULE_TITLES
from dbento_assets.core.source import SourceError
from dbento_assets.core.storage import write_atomic
from dbento_assets.history import (
    COMPLETED,
    evaluation_of,
    execution_records,
    latest_materialization,
    skipped_on_the_file_it_wrote,
)
from dbento_assets.io_managers import COMPLETE_KEY, THROUGH_KEY
from dbento_assets.partitions import Partition
from dbento_assets.project import project_instance
from dbento_assets.resources import databento_resource_from_env

DEFAULT_OUT = Path("logs") / "validation_report.md"
PASS, WARN, FAIL = "pass", "WARN", "FAIL"
EXIT_OK, EXIT_ERRORS, EXIT_UNUSABLE = 0, 1, 2
_SHOWN_ELSEWHERE = {"violations", "severity", "first_violations"}
_VALUE_CHARS = 300  # a JSON fact longer than this is cut in the details


@dataclass
class Outcome:
    """The latest evaluation of one check on one partition."""

    partition: str
    month: str  # YYYY-MM
    symbol: str
    asset: str
    check: str
    passed: bool
    severity: str  # ERROR or WARN
    description: str
    metadata: dict[str, Any]
    timestamp: float
    run_id: str

    @property
    def failed_error(self) -> bool:
        return not self.passed and self.severity == "ERROR"

    @property
    def failed_warn(self) -> bool:
        return not self.passed and self.severity != "ERROR"


@dataclass
class Collected:
    """Everything the report shows."""

    outcomes: list[Outcome] = field(default_factory=list)
    symbols: list[str] = field(default_factory=list)
    unpartitioned: int = 0  # completed evaluations without a partition
    # {(month, symbol): through date} of partitions an asset of which was last stored partial
    # (the month had not closed): their cells never read as a whole month.
    partial: dict[tuple[str, str], str] = field(default_factory=dict)
    # {(month, symbol): assets} of partitions with results, but none for these assets (a
    # timeframe added to the catalog since): "pass" says nothing of them.
    unchecked: dict[tuple[str, str], list[str]] = field(default_factory=dict)


def latest_per_partition(
    instance: DagsterInstance, key: AssetCheckKey
) -> tuple[dict[str, Any], int]:
    """{partition: newest completed execution record} of one check, and how many completed
    records had no partition. A partition whose newest record is a check skipped by the run
    that wrote its file has none: as in the UI, no older result speaks for that file."""
    latest: dict[str, Any] = {}
    skipped: set[str] = set()
    unpartitioned = 0
    for record in execution_records(instance, key):  # newest first
        if record.status.value not in COMPLETED:
            first = record.partition not in latest and record.partition not in skipped
            if first and skipped_on_the_file_it_wrote(instance, record):
                skipped.add(record.partition)
        elif record.partition is None:
            unpartitioned += 1
        elif record.partition not in skipped:
            latest.setdefault(record.partition, record)
    return latest, unpartitioned


def collect(
    instance: DagsterInstance,
    check_keys: Sequence[AssetCheckKey],
    symbols: Sequence[str],
) -> Collected:
    """The latest outcome of each check per partition, for the given symbols."""
    wanted = set(symbols)
    found = Collected(symbols=list(symbols))
    for key in check_keys:
        latest, unpartitioned = latest_per_partition(instance, key)
        found.unpartitioned += unpartitioned
        for partition, record in latest.items():
            try:
                parsed = Partition.from_key(partition)
            except ValueError:
                continue  # not one of this project's partition keys
            evaluation = evaluation_of(record)
            month, symbol = parsed.month, parsed.symbol
            if symbol not in wanted or evaluation is None:
                continue
            metadata = {name: _unwrap(value) for name, value in evaluation.metadata.items()}
            found.outcomes.append(
                Outcome(
                    partition=partition,
                    month=f"{month.year:04d}-{month.month:02d}",
                    symbol=symbol,
                    asset=key.asset_key.to_user_string(),
                    check=key.name,
                    passed=bool(evaluation.passed),
                    severity=(
                        "ERROR" if evaluation.severity == AssetCheckSeverity.ERROR else "WARN"
                    ),
                    description=evaluation.description or "",
                    metadata=metadata,
                    timestamp=record.event.timestamp,
                    run_id=record.run_id,
                )
            )
    assets = list(dict.fromkeys(key.asset_key for key in check_keys))
    checked: dict[tuple[str, str], set[str]] = {}
    for o in found.outcomes:
        checked.setdefault((o.month, o.symbol), set()).add(o.asset)
    for cell, names in checked.items():
        missing = [a.to_user_string() for a in assets if a.to_user_string() not in names]
        if missing:
            found.unchecked[cell] = missing
    for partition, cell in {(o.partition, (o.month, o.symbol)) for o in found.outcomes}:
        # Partial while any of its assets is (raw topped up alone leaves the bars behind).
        ends = []
        for asset in assets:
            record = latest_materialization(instance, asset, partition)
            materialization = record.asset_materialization if record is not None else None
            meta = materialization.metadata if materialization is not None else {}
            if getattr(meta.get(COMPLETE_KEY), "value", True) is False:
                ends.append(str(getattr(meta.get(THROUGH_KEY), "value", "")))
        if ends:
            found.partial[cell] = instant_text(min(ends))
    order = {(k.asset_key.to_user_string(), k.name): i for i, k in enumerate(check_keys)}
    found.outcomes.sort(key=lambda o: (o.symbol, o.month, order[(o.asset, o.check)]))
    return found


def partition_status(outcomes: Iterable[Outcome]) -> tuple[str, int]:
    """(``FAIL``/``WARN``/``pass``, number of failing checks) for one partition's outcomes."""
    items = list(outcomes)
    errors = sum(o.failed_error for o in items)
    warns = sum(o.failed_warn for o in items)
    if errors:
        return FAIL, errors + warns
    if warns:
        return WARN, warns
    return PASS, 0


def matrix(found: Collected) -> dict[tuple[str, str], tuple[str, int]]:
    """{(month, symbol): (status, failing checks)} for every partition with results."""
    cells: dict[tuple[str, str], list[Outcome]] = {}
    for outcome in found.outcomes:
        cells.setdefault((outcome.month, outcome.symbol), []).append(outcome)
    return {cell: partition_status(items) for cell, items in cells.items()}


def render(found: Collected, source: str, now: dt.datetime | None = None) -> str:
    """The report as Markdown."""
    now = now or dt.datetime.now(dt.UTC)
    cells = matrix(found)
    months = sorted({month for month, _ in cells})
    counts = {status: sum(s == status for s, _ in cells.values()) for status in (PASS, WARN, FAIL)}
    lines = [
        "# Validation report",
        "",
        f"Generated {now.strftime('%Y-%m-%d %H:%M:%S')} UTC from {source}. Each cell is the "
        "latest result of every check of that symbol-month (raw 1-second bars and every "
        "timeframe).",
        "",
        "## Symbol x month",
        "",
    ]
    if not cells:
        lines += ["No check results for these symbols yet: materialize some partitions first."]
    else:
        lines += [
            "| month | " + " | ".join(found.symbols) + " |",
            "|---|" + "---|" * len(found.symbols),
        ]
        for month in months:
            row = [
                _cell(cells.get((month, symbol)))
                + (
                    f", partial to {found.partial[(month, symbol)]}"
                    if (month, symbol) in found.partial
                    else ""
                )
                + (  # a FAIL says enough: what comes after a refused step never ran
                    f", {', '.join(found.unchecked[(month, symbol)])} not checked"
                    if (month, symbol) in found.unchecked
                    and cells.get((month, symbol), (FAIL,))[0] != FAIL
                    else ""
                )
                for symbol in found.symbols
            ]
            lines.append(f"| {month} | " + " | ".join(row) + " |")
        lines += [
            "",
            "pass: every check passed. WARN (n): n warnings, the data was kept. FAIL (n): n "
            "failing checks, at least one an ERROR: that data was refused and not saved. "
            "-: never checked."
            + (
                " partial to D: the month had not closed; its data ends at D (exclusive; a "
                "date alone is midnight UTC), "
                "it is not a whole month yet."
                if found.partial
                else ""
            )
            + (
                " X not checked: the asset X has no check result for that month (a timeframe "
                "added since); the verdict is about the others."
                if found.unchecked
                else ""
            ),
            "",
            f"{len(cells)} partitions: {counts[PASS]} pass, {counts[WARN]} warn, "
            f"{counts[FAIL]} fail.",
        ]
    if found.unpartitioned:
        lines += [
            "",
            f"{found.unpartitioned} check results carry no partition (from runs over a "
            "partition range) and are not shown; run one partition per run.",
        ]
    errors = [o for o in found.outcomes if o.failed_error]
    warns = [o for o in found.outcomes if o.failed_warn]
    lines += ["", "## Failures", ""]
    lines += _details(errors) if errors else ["No ERROR check failed."]
    lines += ["", "## Warnings", ""]
    lines += _details(warns) if warns else ["No warning."]
    return "\n".join(lines) + "\n"


def _cell(value: tuple[str, int] | None) -> str:
    if value is None:
        return "-"
    status, failing = value
    return status if status == PASS else f"{status} ({failing})"


def _details(outcomes: Sequence[Outcome]) -> list[str]:
    lines: list[str] = []
    for o in outcomes:
        when = dt.datetime.fromtimestamp(o.timestamp, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
        title = RULE_TITLES.get(o.check, o.check)
        lines += [
            f"### {o.symbol} {o.month}: {o.asset} / {o.check} ({o.severity})",
            "",
            f"**{title}.** {o.description}",
            "",
            f"- violations: {o.metadata.get('violations', 'unknown')}",
            f"- checked: {when} UTC, run {o.run_id}",
        ]
        for name, value in o.metadata.items():
            if name not in _SHOWN_ELSEWHERE:
                lines.append(f"- {name}: {_short(value)}")
        table = o.metadata.get("first_violations")
        if table:
            lines += ["", "First violating rows:", "", str(table)]
        lines.append("")
    return lines


def _unwrap(value: Any) -> Any:
    """A metadata value as plain Python (text, number, bool, Markdown text or JSON data)."""
    return getattr(value, "value", value)


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    text = text.replace("\n", " ")
    return text if len(text) <= _VALUE_CHARS else text[: _VALUE_CHARS - 3] + "..."


def write_report(text: str, out: Path) -> Path:
    """Write the report whole (see :func:`~dbento_assets.core.storage.write_atomic`), into
    ``out``, or into a file of the default name when ``out`` is a folder; the file written."""
    if out.is_dir():
        out = out / DEFAULT_OUT.name
    write_atomic(UPath(out), lambda f: f.write(text.encode("utf-8")))
    return out


def main(
    argv: Sequence[str] | None = None,
    instance: DagsterInstance | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Write the report; return the exit status (1 when an ERROR check failed)."""
    out = out or sys.stdout
    err = err or sys.stderr
    parser = argparse.ArgumentParser(
        prog="dbento report",
        description="Write the validation report from the project's Dagster instance "
        "(DAGSTER_HOME, else ./.dagster_home).",
    )
    parser.add_argument(
        "--symbol",
        "--symbols",  # as dbento estimate spells it
        dest="symbol",
        action="append",
        help="only these catalog symbols (comma-separated, repeatable); default: every symbol",
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"report file (default {DEFAULT_OUT})"
    )
    args = parser.parse_args(argv)
    try:
        catalog = load_catalog()
    except CatalogError as exc:
        print(f"error: {exc}", file=err)
        return EXIT_UNUSABLE
    symbols = [s.strip() for item in args.symbol or [] for s in item.split(",") if s.strip()]
    symbols = symbols or catalog.symbols
    unknown = [s for s in symbols if s not in catalog.instruments]
    if unknown:
        print(
            f"error: {', '.join(unknown)} not in the catalog {catalog.path} "
            f"(symbols: {', '.join(catalog.symbols)})",
            file=err,
        )
        return EXIT_UNUSABLE
    try:
        # The checks this deployment has: a check it no longer declares speaks for no file.
        checks = all_check_keys(
            catalog, vendor=databento_resource_from_env().declares_vendor_check()
        )
    except SourceError as exc:
        print(f"error: {exc}", file=err)
        return EXIT_UNUSABLE
    if instance is None:
        with project_instance() as project:
            return _write(project, checks, symbols, args.out, out, err)
    return _write(instance, checks, symbols, args.out, out, err)


def _write(
    instance: DagsterInstance,
    checks: list[AssetCheckKey],
    symbols: Sequence[str],
    path: Path,
    out: TextIO,
    err: TextIO,
) -> int:
    home = os.environ.get("DAGSTER_HOME", "")
    source = f"the Dagster instance in {home}" if home else "the Dagster instance"
    found = collect(instance, checks, symbols)
    try:
        path = write_report(render(found, source), path)
    except OSError as exc:
        print(f"error: the report cannot be written to {path}: {exc.strerror or exc}", file=err)
        return EXIT_UNUSABLE
    cells = matrix(found)
    failed = sum(status == FAIL for status, _ in cells.values())
    warned = sum(status == WARN for status, _ in cells.values())
    print(
        f"{path}: {len(cells)} partitions checked, {failed} with failed ERROR checks, "
        f"{warned} with warnings only.",
        file=out,
    )
    return EXIT_ERRORS if any(o.failed_error for o in found.outcomes) else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())  # the same as ``dbento report``
