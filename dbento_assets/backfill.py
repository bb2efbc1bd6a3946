"""Materialize a range of months from the command line, one run per partition.

``python -m dbento_assets.backfill --symbol ES --start 2024-01 --end 2024-06`` materializes
every asset (or the ``--select`` ones) of each symbol-month in the range, each partition in
its own Dagster run, one after the other, in this process. It exists because
``dagster asset materialize --partition-range`` runs a range as a single run, which needs
``BackfillPolicy.single_run()`` on every asset and records asset check results without their
partition; run by run, every check result stays attributed to its symbol-month, as in a
backfill launched from the UI. The runs are recorded in the instance of ``DAGSTER_HOME`` (the
one the UI shows), with the usual partition tags; without ``DAGSTER_HOME`` they go to a
temporary instance and a warning says so. Settings come from the same environment and
``.env`` file as the code location. Options: ``--symbol`` (repeatable, or comma-separated;
default every catalog symbol), ``--start``/``--end`` (``YYYY-MM``, inclusive; ``--end``
defaults to ``--start``), ``--select`` (a Dagster asset selection such as ``raw_1s_bars`` or
``bars_1min``; default every asset), ``--force`` (the run tag ``dbento/force=true``: download
again even months in the DBN cache, which costs money) and ``--missing-only`` (skip partitions
where every selected asset already has a materialization, to resume an interrupted range)
and ``--verbose`` (Dagster's own log on the console).
It prints a line per partition as it finishes and a summary, and exits with status 0 when
every partition succeeded, 1 when any failed and 2 for bad options.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TextIO

from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetKey,
    AssetSelection,
    DagsterEventType,
    DagsterInstance,
    Definitions,
    ExecuteInProcessResult,
    JobDefinition,
    MultiPartitionsDefinition,
    Output,
    StaticPartitionsDefinition,
    asset,
    materialize,
)

from dbento_assets.assets import FORCE_TAG
from dbento_assets.core.months import Month, month_range
from dbento_assets.partitions import MONTH_DIM, SYMBOL_DIM, partition_key

if TYPE_CHECKING:
    from dagster._utils.error import SerializableErrorInfo

RANGE_TAG = "dbento/range"
PROG = "python -m dbento_assets.backfill"


class UsageError(ValueError):
    """Options that do not describe a valid range of partitions."""


@dataclass(frozen=True)
class PartitionOutcome:
    """How one partition's run ended."""

    partition: str
    success: bool
    seconds: float
    run_id: str | None
    message: str = ""
    skipped: bool = False


@dataclass
class Summary:
    """Every partition's outcome, in the order they ran."""

    outcomes: list[PartitionOutcome] = field(default_factory=list)

    @property
    def failed(self) -> list[PartitionOutcome]:
        return [o for o in self.outcomes if not o.success]

    @property
    def succeeded(self) -> list[PartitionOutcome]:
        return [o for o in self.outcomes if o.success and not o.skipped]

    @property
    def skipped(self) -> list[PartitionOutcome]:
        return [o for o in self.outcomes if o.skipped]

    def text(self) -> str:
        head = (
            f"{len(self.outcomes)} partition(s): {len(self.succeeded)} succeeded, "
            f"{len(self.failed)} failed, {len(self.skipped)} skipped (already materialized)"
        )
        if self.failed:
            names = ", ".join(o.partition for o in self.failed)
            head += (
                f". Failed: {names}. Run the same command again with --missing-only to retry "
                "only what is missing; months already downloaded are not requested again."
            )
        return head


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Materialize symbol-months one run per partition, so every asset check result "
            "is recorded against its partition. Runs go to the instance of DAGSTER_HOME."
        ),
    )
    parser.add_argument(
        "--symbol",
        "--symbols",
        dest="symbols",
        action="append",
        help="catalog symbol; repeat it or separate with commas (default: every symbol)",
    )
    parser.add_argument("--start", required=True, help="first month, YYYY-MM")
    parser.add_argument("--end", help="last month, YYYY-MM, inclusive (default: --start)")
    parser.add_argument(
        "--select",
        help="assets to materialize, a Dagster asset selection such as 'raw_1s_bars' or "
        "'bars_15s,bars_1min' (default: every asset)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="download again even months already in the DBN cache (tag dbento/force=true; "
        "costs money)",
    )
    parser.add_argument(
        "--missing-only",
        action="store_true",
        help="skip partitions where every selected asset is already materialized",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show Dagster's own log of every run on the console (default: only the lines "
        "of this command)",
    )
    return parser.parse_args(argv)


def plan_partitions(
    partitions_def: MultiPartitionsDefinition,
    symbols: Sequence[str] | None,
    start: str,
    end: str | None,
) -> list[str]:
    """The partition keys of ``symbols`` x ``[start, end]``, symbol by symbol, month order.

    Raises :class:`UsageError` naming the valid choices for an unknown symbol, a malformed
    month, a reversed range, or months outside the partitions (before the catalog's
    ``start_month`` or not closed yet).
    """
    dims = {d.name: d.partitions_def for d in partitions_def.partitions_defs}
    known_symbols = list(dims[SYMBOL_DIM].get_partition_keys())
    month_keys = list(dims[MONTH_DIM].get_partition_keys())
    wanted = _split_symbols(symbols) or known_symbols
    unknown = [s for s in wanted if s not in known_symbols]
    if unknown:
        raise UsageError(
            f"unknown symbol(s) {', '.join(unknown)}; the catalog has {', '.join(known_symbols)}"
        )
    first = _month("--start", start)
    last = _month("--end", end) if end else first
    if last < first:
        raise UsageError(f"--end {last} is before --start {first}")
    if not month_keys:
        raise UsageError("the partitions have no month yet: no month has closed since start_month")
    earliest, latest = Month.parse(month_keys[0]), Month.parse(month_keys[-1])
    if first < earliest:
        raise UsageError(
            f"--start {first} is before the catalog's start_month {earliest}; "
            "move start_month in the catalog to backfill earlier months"
        )
    if last > latest:
        raise UsageError(
            f"--end {last} has not closed yet (or is in the future); the latest month "
            f"you can materialize is {latest}"
        )
    return [str(partition_key(m, s)) for s in wanted for m in month_range(first, last)]


def run_partitions(
    job: JobDefinition,
    instance: DagsterInstance,
    partitions: Sequence[str],
    asset_keys: Sequence[AssetKey],
    *,
    force: bool = False,
    missing_only: bool = False,
    tags: dict[str, str] | None = None,
    log_level: str = "CRITICAL",
    out: TextIO | None = None,
) -> Summary:
    """Materialize each partition in its own run, printing one line per partition.

    Every run is recorded in ``instance`` in full; ``log_level`` only sets what Dagster's
    console logger prints while it runs.
    """
    out = out or sys.stdout
    run_tags = dict(tags or {})
    if force:
        run_tags[FORCE_TAG] = "true"
    done = _materialized_everywhere(instance, asset_keys) if missing_only else set()
    if any(name not in done for name in partitions):
        warm_up()
    summary = Summary()
    for name in partitions:
        if name in done:
            outcome = PartitionOutcome(name, True, 0.0, None, "already materialized", True)
        else:
            outcome = _run_one(job, instance, name, asset_keys, run_tags, log_level)
        summary.outcomes.append(outcome)
        print(_line(outcome), file=out, flush=True)
    print(summary.text(), file=out, flush=True)
    return summary


def run(
    argv: Sequence[str] | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
    *,
    defs: Definitions | None = None,
    instance: DagsterInstance | None = None,
) -> int:
    """The command; returns its exit status. Tests pass ``defs`` and ``instance``."""
    out = out or sys.stdout
    err = err or sys.stderr
    args = parse_args(argv)
    try:
        if args.force and args.missing_only:
            raise UsageError("--force and --missing-only contradict each other; choose one")
        if defs is None:
            from dbento_assets.definitions import defs as loaded

            defs = loaded
        job = defs.resolve_implicit_global_asset_job_def()
        partitions_def = job.partitions_def
        if not isinstance(partitions_def, MultiPartitionsDefinition):
            raise UsageError("the code location's assets are not month x symbol partitioned")
        partitions = plan_partitions(partitions_def, args.symbols, args.start, args.end)
        asset_keys = _selected_assets(defs, args.select)
    except UsageError as exc:
        print(f"error: {exc}", file=err)
        return 2
    symbols = ",".join(_split_symbols(args.symbols) or ["all"])
    label = f"{symbols} {args.start}..{args.end or args.start}"
    with _instance(instance, err) as active:
        summary = run_partitions(
            job,
            active,
            partitions,
            asset_keys,
            force=args.force,
            missing_only=args.missing_only,
            tags={RANGE_TAG: label},
            log_level="DEBUG" if args.verbose else "CRITICAL",
            out=out,
        )
    return 1 if summary.failed else 0


def main() -> None:
    raise SystemExit(run())


def _month(option: str, text: str) -> Month:
    try:
        return Month.parse(text)
    except ValueError as exc:
        raise UsageError(f"{option} {text!r}: {exc}") from None


def _split_symbols(symbols: Sequence[str] | None) -> list[str]:
    return [s.strip() for item in symbols or [] for s in item.split(",") if s.strip()]


def _selected_assets(defs: Definitions, select: str | None) -> list[AssetKey]:
    graph = defs.resolve_asset_graph()
    if not select:
        return sorted(graph.materializable_asset_keys)
    try:
        selection = AssetSelection.from_coercible([s.strip() for s in select.split(",")])
        keys = selection.resolve(graph)
    except Exception as exc:  # Dagster raises several kinds for a bad selection string
        raise UsageError(f"--select {select!r}: {exc}") from None
    if not keys:
        names = ", ".join(k.to_user_string() for k in sorted(graph.materializable_asset_keys))
        raise UsageError(f"--select {select!r} matches no asset; the assets are {names}")
    return sorted(keys)


@contextmanager
def _instance(given: DagsterInstance | None, err: TextIO) -> Iterator[DagsterInstance]:
    if given is not None:
        yield given
        return
    if os.environ.get("DAGSTER_HOME", "").strip():
        with DagsterInstance.get() as instance:
            yield instance
        return
    print(
        "warning: DAGSTER_HOME is not set, so these runs go to a temporary instance and will "
        "not show in the Dagster UI; set DAGSTER_HOME to the folder `dagster dev` uses.",
        file=err,
    )
    with DagsterInstance.ephemeral() as instance:
        yield instance


def _materialized_everywhere(instance: DagsterInstance, asset_keys: Sequence[AssetKey]) -> set[str]:
    """Partitions in which every asset of ``asset_keys`` has a materialization."""
    sets = [set(instance.get_materialized_partitions(key)) for key in asset_keys]
    return set.intersection(*sets) if sets else set()


_WARM_UP_PARTITIONS = StaticPartitionsDefinition(["warm-up"])


@asset(partitions_def=_WARM_UP_PARTITIONS)
def dbento_warm_up_source() -> int:
    return 0


@asset(
    partitions_def=_WARM_UP_PARTITIONS,
    check_specs=[AssetCheckSpec("warm_up", asset="dbento_warm_up_sink")],
)
def dbento_warm_up_sink(dbento_warm_up_source: int) -> Iterator[Output | AssetCheckResult]:
    yield Output(dbento_warm_up_source)
    yield AssetCheckResult(passed=True)


_warmed_up = False


def warm_up() -> None:
    """Run a throwaway two-asset job once per process, before the first real partition.

    Dagster 1.13 compiles the constructor of each of its ``@record`` classes the first time
    one is built, with the caller's local variables copied into the compiled function's
    globals (dagster_shared/record: ``JitCheckedNew`` -> ``EvalContext.update_from_frame``),
    and keeps that function for the life of the process. Two such first builds happen
    inside a run, in frames that hold the step context: ``AssetCheckEvaluation`` and its
    ``AssetCheckEvaluationTargetMaterializationData`` (an asset check result), and
    ``StepInputData`` (an input loaded from an upstream asset). A step context holds the
    run's captured outputs, so the first real partition of a backfill stayed in memory for
    good, a month of frames (benchmarks/bench_memory.py). This run has an input and a check
    result, so what Dagster keeps is its own step context, with one integer as output.
    dbento_assets_tests/test_memory.py fails if a Dagster release pins something else.
    """
    global _warmed_up
    if _warmed_up:
        return
    with DagsterInstance.ephemeral() as instance:
        materialize(
            [dbento_warm_up_source, dbento_warm_up_sink],
            instance=instance,
            partition_key="warm-up",
            run_config={"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}},
        )
    _warmed_up = True
    gc.collect()


def _run_one(
    job: JobDefinition,
    instance: DagsterInstance,
    partition: str,
    asset_keys: Sequence[AssetKey],
    tags: dict[str, str],
    log_level: str,
) -> PartitionOutcome:
    start = time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        result = job.execute_in_process(
            partition_key=partition,
            instance=instance,
            tags=tags,
            asset_selection=list(asset_keys),
            run_config={"loggers": {"console": {"config": {"log_level": log_level}}}},
            raise_on_error=False,
        )
    seconds = time.monotonic() - start
    if result.success:
        outcome = PartitionOutcome(partition, True, seconds, result.run_id)
    else:
        outcome = PartitionOutcome(partition, False, seconds, result.run_id, _failure_text(result))
    # The run's result holds every output value of the run (a month of frames) in
    # reference cycles: collect them now rather than when the collector's oldest
    # generation next happens to run.
    del result
    gc.collect()
    return outcome


def _failure_text(result: ExecuteInProcessResult) -> str:
    """The first step failure's message (else the run failure's), on one line."""
    for event in result.all_events:
        if event.event_type == DagsterEventType.STEP_FAILURE:
            data = event.step_failure_data
            message = ""
            if data.user_failure_data is not None and data.user_failure_data.description:
                message = data.user_failure_data.description
            elif data.error is not None:
                message = _root_message(data.error)
            if message.strip():
                return " ".join(message.split())[:500]
    for event in result.all_events:
        if event.event_type == DagsterEventType.RUN_FAILURE and event.message:
            return " ".join(event.message.split())[:500]
    return "the run failed (see the run in the Dagster UI)"


def _root_message(error: SerializableErrorInfo) -> str:
    """The innermost error, ``SourceError: ...``: the source's words, not Dagster's wrapper."""
    while error.cause is not None:
        error = error.cause
    message = error.message.strip()
    prefix, sep, rest = message.partition(": ")
    if sep and error.cls_name and prefix.endswith(error.cls_name):
        return f"{error.cls_name}: {rest}"
    return message


def _line(outcome: PartitionOutcome) -> str:
    if outcome.skipped:
        return f"{outcome.partition:<18} skipped  already materialized"
    status = "ok" if outcome.success else "FAILED"
    line = f"{outcome.partition:<18} {status:<7} {outcome.seconds:6.1f} s  run {outcome.run_id}"
    return f"{line}\n    {outcome.message}" if outcome.message else line


if __name__ == "__main__":
    main()
