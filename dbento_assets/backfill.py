"""``dbento build``: a range of symbol-months, one Dagster run per partition.

One run per partition keeps every check result attributed to its symbol-month (a ranged run,
as ``dagster asset materialize --partition-range`` makes, drops it). The runs go to the
project's instance (:mod:`dbento_assets.project`) with the usual partition tags. A range is
shared among ``DBENTO_RANGE_WORKERS`` processes, each paying the code location's start-up once.
The command line itself is :mod:`dbento_assets.cli`, and the ``build_range`` job
(:mod:`dbento_assets.range_job`) runs the same loop inside a Dagster run.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import math
import multiprocessing
import os
import queue
import signal
import socket
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import psutil
from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetKey,
    AssetSelection,
    DagsterEvent,
    DagsterEventType,
    DagsterInstance,
    DagsterRun,
    DagsterRunStatus,
    Definitions,
    ExecuteInProcessResult,
    JobDefinition,
    MultiPartitionsDefinition,
    Output,
    RunsFilter,
    StaticPartitionsDefinition,
    asset,
    materialize,
)
from pydantic import BaseModel, Field
from tqdm import tqdm

from dbento_assets.assets import (
    DOWNLOAD_POOL,
    FORCE_TAG,
    FORCE_VENDOR_1M,
    PAID_KEY,
)
from dbento_assets.core.catalog import Catalog, load_catalog
from dbento_assets.core.months import Month, month_range
from dbento_assets.core.run_rules import built_from_older_raw
from dbento_assets.core.settings import read
from dbento_assets.core.source import origin_of
from dbento_assets.io_managers import BarFileIOManager
from dbento_assets.names import CATALOG_METADATA_KEY, RAW_KEY
from dbento_assets.partitions import (
    MONTH_DIM,
    PARTITION_TAG,
    SYMBOL_DIM,
    Partition,
    partition_key,
)

RANGE_TAG = "dbento/range"
# The machine and process that run a partition's run, so a later build can tell a run whose
# process was killed (it would hold its download slot for ever) from one still running; the
# process's start time tells it from a later process given the same pid.
HOST_TAG, PID_TAG, STARTED_TAG = "dbento/host", "dbento/pid", "dbento/process_started"
KEY_FORM = "YYYY-MM-01|SYMBOL, for example 2024-01-01|ES"


class UsageError(ValueError):
    """Options that do not describe a valid range of partitions."""


class RangeSettings(BaseModel):
    """How a range is built, each setting read from ``DBENTO_<FIELD>``."""

    range_workers: int = Field(
        default_factory=lambda: min(64, _usable_cpus()),
        ge=1,
        le=64,
        description="Processes building the range's partitions at once (default: CPU cores).",
    )


def _usable_cpus() -> int:
    # The CPUs this process may run on (a container's or taskset's limit), not the machine's.
    getaffinity = getattr(os, "sched_getaffinity", None)
    return len(getaffinity(0)) if getaffinity else os.cpu_count() or 1


def range_workers() -> int:
    """``DBENTO_RANGE_WORKERS``; a value that does not fit raises :class:`UsageError`."""
    return read(RangeSettings, error=UsageError).range_workers


class Lines(Protocol):
    """Where a build's lines go: a terminal, a file, or a run's log."""

    def write(self, text: str, /) -> int: ...

    def flush(self) -> None: ...


@dataclass(frozen=True)
class PartitionOutcome:
    """How one partition's run ended, and what it wrote."""

    partition: str
    success: bool
    seconds: float
    run_id: str | None
    message: str = ""
    skipped: bool = False
    rows: int = 0
    files: int = 0
    cost_usd: float = 0.0
    stopped: bool = False  # interrupted while its run was in progress


class _Stopped(KeyboardInterrupt):
    """An interrupt that ended a partition's run, with what the run did before it."""

    def __init__(self, outcome: PartitionOutcome) -> None:
        super().__init__()
        self.outcome = outcome


@dataclass
class Summary:
    """Every partition's outcome, in the order they ran."""

    outcomes: list[PartitionOutcome] = field(default_factory=list)
    seconds: float = 0.0
    not_started: list[str] = field(default_factory=list)  # left when the build was stopped

    @property
    def failed(self) -> list[PartitionOutcome]:
        return [o for o in self.outcomes if not o.success and not o.stopped]

    @property
    def stopped(self) -> list[PartitionOutcome]:
        return [o for o in self.outcomes if o.stopped]

    @property
    def succeeded(self) -> list[PartitionOutcome]:
        return [o for o in self.outcomes if o.success and not o.skipped]

    @property
    def skipped(self) -> list[PartitionOutcome]:
        return [o for o in self.outcomes if o.skipped]

    def text(self, data_dir: str = "") -> str:
        rows = sum(o.rows for o in self.outcomes)
        files = sum(o.files for o in self.outcomes)
        cost = sum(o.cost_usd for o in self.outcomes)
        where = f" in {data_dir}" if data_dir else ""
        stopped = f", {len(self.stopped)} stopped" if self.stopped else ""
        head = (
            f"Done in {self.seconds:.1f} s: {len(self.outcomes)} partition(s), "
            f"{len(self.succeeded)} built, {len(self.skipped)} skipped (already built), "
            f"{len(self.failed)} failed{stopped}; {rows:,} rows in {files} file(s){where}; "
            f"Databento cost ${cost:,.4f}."
        )
        if self.failed:
            names = ", ".join(o.partition for o in self.failed)
            head += (
                f"\nFailed: {names}. Each failure's reason is printed under it; once it is "
                "fixed (or later, for a month not published yet), run the same command again "
                "with --missing-only: it builds only what is missing, and months already "
                "downloaded are not paid for again."
            )
        if self.stopped:
            head += (
                f"\nStopped (interrupted, or its run was cancelled) while building "
                f"{', '.join(o.partition for o in self.stopped)}: nothing half written, and a "
                "month paid for is kept for the next build."
            )
        if self.not_started:
            head += (
                f"\nStopped (interrupted, or its run was cancelled) before {len(self.not_started)} "
                f"partition(s): {', '.join(self.not_started)}."
            )
        return head


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
    # A symbol given twice is built once: two processes on one partition would race for it.
    wanted = list(dict.fromkeys(split_symbols(symbols))) or known_symbols
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
        option = "--end" if end else "--start"
        raise UsageError(
            f"{option} {last} is in the future; the latest month you can materialize is "
            f"{latest} (the month in progress, stored partial until it closes)"
        )
    return [str(partition_key(m, s)) for s in wanted for m in month_range(first, last)]


def check_partition_keys(partitions_def: MultiPartitionsDefinition, keys: Sequence[str]) -> None:
    """Raise :class:`UsageError` for a key that is not one of the partitions."""
    known = set(partitions_def.get_partition_keys())
    for key in keys:
        if key not in known:
            raise UsageError(
                f"{key!r} is not a partition of this code location: a partition key is "
                f"{KEY_FORM} (a closed month from the catalog's start_month, and a catalog "
                "symbol)"
            )


def preflight(defs: Definitions) -> str:
    """Fail with one sentence when the settings cannot work for any partition; return the
    data folder. Checks the source (key, DBN folder) and that the data folder holds data of
    this source's kind (a new folder is marked by its first bar file, not here: a build that
    writes nothing leaves it free for any source)."""
    resources: dict[str, Any] = dict(defs.resources or {})
    databento, io_manager = resources.get("databento"), resources.get("io_manager")
    if databento is None or io_manager is None:
        return ""
    source = databento.month_source()
    scan = getattr(source, "scan", None)
    if callable(scan):  # the DBN-files source: the folder must exist and be readable
        scan()
    io_manager.store.check_origin(origin_of(databento.source), databento.source)
    return str(io_manager.data_dir)


def month_symbol_partitions(defs: Definitions) -> MultiPartitionsDefinition:
    """The month x symbol partitions of the code location's assets."""
    partitions_def = defs.resolve_implicit_global_asset_job_def().partitions_def
    if not isinstance(partitions_def, MultiPartitionsDefinition):
        raise UsageError("the code location's assets are not month x symbol")
    return partitions_def


def build_range(
    defs: Definitions,
    instance: DagsterInstance,
    partitions: Sequence[str],
    *,
    select: str | None = None,
    force: bool = False,
    force_tag: str = "true",
    missing_only: bool = False,
    tags: dict[str, str] | None = None,
    log_level: str = "CRITICAL",
    out: Lines | None = None,
    progress: Lines | None = None,
    stop: Callable[[], bool] | None = None,
    workers: int = 1,
    load_defs: Callable[[], Definitions] | None = None,
) -> str:
    """Build ``partitions`` of the selected assets, each in its own run (``dbento build`` and
    the ``build_range`` job), printing one line per partition; return the summary's text.

    Every run is recorded in ``instance`` in full; ``log_level`` only sets what Dagster's
    console logger prints while it runs. A progress bar goes to ``progress`` when that is a
    terminal. ``stop`` is asked before each partition; when it says so, no further run is
    started. ``force`` tags each run ``dbento/force=<force_tag>``. With ``workers`` above
    one and ``load_defs`` (a module-level function giving ``defs``, for new processes to
    load), the partitions are shared among that many processes. Raises
    :class:`UsageError` for options that contradict each other or select nothing, and
    :class:`RangeFailed` (with the same text) when a partition failed or the build was
    stopped.
    """
    if force and missing_only:
        option = "--force-vendor-1m" if force_tag == FORCE_VENDOR_1M else "--force"
        raise UsageError(f"{option} and --missing-only contradict each other; choose one")
    asset_keys = selected_assets(defs, select)
    data_dir = preflight(defs)
    out = out or sys.stdout
    progress = progress or sys.stderr
    run_tags = dict(tags or {})
    if force:
        run_tags[FORCE_TAG] = force_tag
    files = _bar_files(defs)
    done = (
        _built_everywhere(files, instance, asset_keys, partitions, catalog_of(defs))
        if missing_only
        else set()
    )
    todo = [name for name in partitions if name not in done]
    for stale in files.store.remove_all_stale_temps() if files is not None else []:
        print(f"Removed {stale}, left by a write that was killed.", file=out)
    for run in cancel_orphaned_runs(instance):
        print(
            f"Cancelled run {run.run_id} ({run.tags.get(PARTITION_TAG, 'no partition')}), "
            "left unfinished by a process that was killed; its download slot is free.",
            file=out,
        )
    parallel = load_defs is not None and stop is None and instance.is_persistent
    shares = min(workers, len(todo)) if parallel else 1
    if shares > 1:
        _settle_download_pool(instance)
    summary = Summary()
    started = time.monotonic()
    with _progress_bar(len(partitions), progress) as bar:

        def report(outcome: PartitionOutcome) -> None:
            summary.outcomes.append(outcome)
            bar.write(_line(outcome), file=out)
            out.flush()
            bar.update(1)

        def skipped(name: str) -> PartitionOutcome:
            return PartitionOutcome(name, True, 0.0, None, "already built", True)

        if shares > 1 and load_defs is not None:
            for name in [p for p in partitions if p in done]:
                report(skipped(name))
            plan = _Share(load_defs, instance.get_ref(), select, run_tags, log_level)
            _build_in_processes(instance, plan, todo, shares, report)
        else:
            job = defs.resolve_implicit_global_asset_job_def()

            def to_build() -> Iterator[str]:  # in order, the built ones said
                for name in partitions:
                    if name in done:
                        report(skipped(name))
                    else:
                        bar.set_postfix_str(name)
                        yield name

            with _stop_signals() as signalled:
                if todo:
                    warm_up()
                stopped = signalled if stop is None else lambda: stop() or signalled()
                for outcome in _build_each(
                    job, instance, to_build(), asset_keys, run_tags, log_level, stopped
                ):
                    report(outcome)
    reported = {o.partition for o in summary.outcomes}
    summary.not_started = [p for p in todo if p not in reported]
    summary.seconds = time.monotonic() - started
    text = summary.text(data_dir)
    if summary.failed or summary.stopped or summary.not_started:
        raise RangeFailed(text)
    return text


INTERRUPTED = "interrupted (Ctrl-C, a stop signal or a cancelled run); nothing half written"


def _build_each(
    job: JobDefinition,
    instance: DagsterInstance,
    partitions: Iterable[str],
    asset_keys: Sequence[AssetKey],
    tags: dict[str, str],
    log_level: str,
    stopped: Callable[[], bool],
) -> Iterator[PartitionOutcome]:
    """Each partition's run, one after another, until ``stopped`` says so. An interrupt ends
    the partition in progress (its outcome: interrupted) and the build."""
    for name in partitions:
        if stopped():
            return
        try:
            if RAW_KEY in asset_keys and not _download_slot_free(instance, stopped):
                return
        except KeyboardInterrupt:
            return  # before its run: the partition is not started
        try:
            outcome = _run_one(job, instance, name, asset_keys, tags, log_level)
        except _Stopped as exc:
            yield exc.outcome
            return
        except KeyboardInterrupt:
            yield PartitionOutcome(name, False, 0.0, None, INTERRUPTED, stopped=True)
            return
        yield outcome


def _settle_download_pool(instance: DagsterInstance) -> None:
    """Give the download pool its slots (the instance's default limit) before several build
    processes claim one: on a new instance each would otherwise set them up as it first
    claims, at the same moment. A limit already set (``dagster instance concurrency set``) is
    left as it is."""
    storage = instance.event_log_storage
    info = storage.get_concurrency_info(DOWNLOAD_POOL)
    if not info.slot_count and (info.limit is None or info.using_default_limit):
        storage.initialize_concurrency_limit_to_default(DOWNLOAD_POOL)


def _download_slot_free(instance: DagsterInstance, stopped: Callable[[], bool]) -> bool:
    """Wait until the download pool has a free slot (at once, as a rule); False when the
    build is stopped first. Dagster waits for one inside the run too, but there neither
    Ctrl-C nor a stop is heard until a slot frees, and nothing says what it waits for."""
    said = False
    for waited in itertools.count():
        info = instance.event_log_storage.get_concurrency_info(DOWNLOAD_POOL)
        limit = info.slot_count or info.limit
        if not limit or len(info.claimed_slots) < limit:  # no limit (or none Dagster keeps)
            return True
        if stopped():
            return False
        if not said:
            holders = ", ".join(sorted(info.active_run_ids))
            print(
                f"Waiting for a download slot: the {DOWNLOAD_POOL} pool's {limit} slot(s) are "
                f"held by run(s) {holders} (Ctrl-C stops the build).",
                file=sys.stderr,
                flush=True,
            )
            said = True
        if waited % 10 == 9:
            cancel_orphaned_runs(instance)  # a holder killed meanwhile
        time.sleep(1.0)
    return False  # not reached: the count has no end


@dataclass(frozen=True)
class _Share:
    """What a build process needs to build its share of a range (sent to it pickled)."""

    load_defs: Callable[[], Definitions]
    instance: Any  # an InstanceRef
    select: str | None
    tags: dict[str, str]
    log_level: str

    def build(self, partitions: Sequence[str], outcomes: Any, stopping: Any) -> None:
        """In a build process: each partition's outcome onto the ``outcomes`` queue, until
        the ``stopping`` event is set, an interrupt comes (its run in progress ends) or the
        command's process is gone (killed alone: nothing would watch or report the rest); a
        second interrupt is ignored."""
        command = multiprocessing.parent_process()
        try:
            defs = self.load_defs()
            job = defs.resolve_implicit_global_asset_job_def()
            asset_keys = selected_assets(defs, self.select)
            with DagsterInstance.from_ref(self.instance) as instance, _stop_signals() as signalled:

                def stop() -> bool:
                    # The command first: a command killed while it held the event's lock
                    # would leave is_set() waiting for ever.
                    return (
                        (command is not None and not command.is_alive())
                        or signalled()
                        or stopping.is_set()
                    )

                warm_up()
                for outcome in _build_each(
                    job, instance, partitions, asset_keys, self.tags, self.log_level, stop
                ):
                    if outcome.stopped:  # a second interrupt must not cut the end
                        signal.signal(signal.SIGINT, signal.SIG_IGN)
                    outcomes.put(outcome)
                # Stopped or done: the interrupt the command passes on must not cut the end.
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                stopped = stop()
        except KeyboardInterrupt:
            stopped = True  # between two runs: the parent tells what is left
        if stopped:
            sys.exit(_STOPPED_EXIT)


# A build process's exit code when it stopped as told, with partitions perhaps left (as a shell
# reports a command Ctrl-C ended); any other ending with partitions left is a failure.
_STOPPED_EXIT = 130

# How long build processes get to stop by themselves after an interrupt (a terminal's Ctrl-C
# reaches them too) before it is passed on to them, and then to end their runs before they
# are killed.
_PASS_ON_SECONDS = 5.0
_STOP_GRACE_SECONDS = 30.0


def cancel_orphaned_runs(instance: DagsterInstance) -> list[DagsterRun]:
    """Cancel the unfinished runs whose process is gone (killed, or stopped after a grace),
    freeing the download slots they hold: the next build would wait for ever for one.
    Returns them.

    A build's runs name their machine and process (tags). Other runs (``dagster asset
    materialize``, ``dagster dev``) are judged by the processes their events were logged
    from, and only with an instance on this machine's disk (SQLite), where every run's
    process is one of this machine's."""
    host = socket.gethostname()
    local = "sqlite" in type(instance.run_storage).__module__
    cancelled = []
    for run in instance.get_runs(RunsFilter(statuses=_UNFINISHED)):
        ours = run.tags.get(HOST_TAG) == host and int(run.tags.get(PID_TAG) or 0) > 0
        if not (ours or local):
            continue  # its processes cannot be judged from here
        logged = _logging_processes(instance, run.run_id)
        if ours and set(logged) <= {int(run.tags[PID_TAG])}:
            gone = _process_gone(run.tags)
        else:  # not a build's, or re-executed from one (Dagster copies the parent's tags)
            gone = local and bool(logged) and all(_pid_gone(*seen) for seen in logged.items())
        if not gone:
            continue
        instance.report_run_canceled(run, "Stopped: the process building it ended first.")
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        cancelled.append(run)
    return cancelled


_UNFINISHED = [
    DagsterRunStatus.NOT_STARTED,
    DagsterRunStatus.STARTING,
    DagsterRunStatus.STARTED,
    DagsterRunStatus.CANCELING,
]


def _process_tags() -> dict[str, str]:
    """This machine and process, as a run of it is tagged."""
    return {
        HOST_TAG: socket.gethostname(),
        PID_TAG: str(os.getpid()),
        STARTED_TAG: str(psutil.Process().create_time()),
    }


def _logging_processes(instance: DagsterInstance, run_id: str) -> dict[int, float]:
    """The processes that logged events of the run: pid to the time of its first event."""
    first_seen: dict[int, float] = {}
    for entry in instance.all_logs(run_id):
        pid = entry.dagster_event.pid if entry.dagster_event is not None else None
        if pid:
            first_seen[pid] = min(first_seen.get(pid, entry.timestamp), entry.timestamp)
    return first_seen


def _pid_gone(pid: int, started_by: float) -> bool:
    """Whether process ``pid``, known to run at ``started_by`` (a UNIX time), has ended: no
    such process, a zombie, or one started after that time under the same pid."""
    try:
        process = psutil.Process(pid)
        return (
            process.status() == psutil.STATUS_ZOMBIE
            or process.create_time() > started_by + 1.0  # to the clock tick
        )
    except psutil.NoSuchProcess:
        return True
    except psutil.AccessDenied:  # another user's process, so alive
        return False


def _process_gone(tags: Mapping[str, str]) -> bool:
    """Whether the process a build's run is tagged with has ended."""
    pid = int(tags.get(PID_TAG) or 0)
    started = tags.get(STARTED_TAG)  # missing on runs of earlier versions: the pid alone
    return pid > 0 and _pid_gone(pid, math.inf if started is None else float(started))


def _build_in_processes(
    instance: DagsterInstance,
    share: _Share,
    partitions: Sequence[str],
    processes: int,
    report: Callable[[PartitionOutcome], None],
) -> None:
    """Every ``processes``-th partition in each of ``processes`` new processes (spawned, so
    each loads the code location as a run worker does); each outcome reported as it comes.
    A process that dies leaves its partitions not built, each reported failed with its exit
    code, and its run in progress cancelled. An interrupt (Ctrl-C, SIGTERM) stops every
    process, each after its run in progress has ended; the partitions not reached are left
    for the caller to list, as they are when an interrupt reaches a process and not this one."""
    context = multiprocessing.get_context("spawn")
    outcomes = context.Queue()
    # Set on an interrupt, so a process whose run ends before the interrupt is passed on to
    # it starts no other partition (whose download the interrupt would then cut).
    stopping = context.Event()
    workers = [
        context.Process(target=share.build, args=(partitions[i::processes], outcomes, stopping))
        for i in range(processes)
    ]
    reported: set[str] = set()
    interrupted = False

    def take(timeout: float | None) -> None:
        outcome = outcomes.get(timeout=timeout) if timeout else outcomes.get_nowait()
        reported.add(outcome.partition)
        report(outcome)

    with _sigterm_as_interrupt():
        try:
            for worker in workers:
                worker.start()
            while any(worker.is_alive() for worker in workers):
                with contextlib.suppress(queue.Empty):
                    take(0.2)
        except KeyboardInterrupt:
            interrupted = True
            stopping.set()
            _stop(workers)
        finally:
            _end(workers)
    with contextlib.suppress(queue.Empty):
        while True:  # what the processes put before they ended
            take(None)
    cancel_orphaned_runs(instance)
    if interrupted:
        return
    for index, worker in enumerate(workers):
        if worker.exitcode == _STOPPED_EXIT:
            # It stopped as told: an interrupt reached it and not this process (which ignores
            # SIGINT when a shell started it in the background). What it did not reach is
            # listed as not started, as after a Ctrl-C, not as failed.
            continue
        for name in partitions[index::processes]:
            if name not in reported:
                message = (
                    f"not built: its build process ended (exit code {worker.exitcode}) "
                    "before building it; run the same command again with --missing-only"
                )
                report(PartitionOutcome(name, False, 0.0, None, message))


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a supervisor, ``kill``) stops a build as Ctrl-C does, so its processes are
    stopped too instead of building on unwatched."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _stop_signals() -> Iterator[Callable[[], bool]]:
    """Whether Ctrl-C or SIGTERM has reached this process since entering, even one that
    landed as a Dagster run was ending: Dagster catches it there and drops it, and the build
    would start its next partition. Python writes each signal it catches to the wakeup fd
    (whichever handler is installed then), so the drop cannot hide it."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    reader, writer = socket.socketpair()
    for end in (reader, writer):
        end.setblocking(False)
    seen = False

    def signalled() -> bool:
        nonlocal seen
        with contextlib.suppress(BlockingIOError):
            while data := reader.recv(256):
                seen = seen or any(n in (signal.SIGINT, signal.SIGTERM) for n in data)
        return seen

    previous: int | None = None
    try:
        with _signals_held():  # an interrupt between swap and restore would leave ours set
            previous = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        yield signalled
    finally:
        if previous is not None:
            with _signals_held():
                signal.set_wakeup_fd(previous)
        reader.close()
        writer.close()


@contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM held back (delivered on leaving), for a step no interrupt may split."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _stop(workers: Sequence[Any]) -> None:
    """Interrupt the build processes still running after a moment: a terminal's Ctrl-C has
    reached them already, a signal to this process alone has not."""
    deadline = time.monotonic() + _PASS_ON_SECONDS
    for worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()))
    for worker in workers:
        if worker.is_alive() and worker.pid is not None:
            os.kill(worker.pid, signal.SIGINT)


def _end(workers: Sequence[Any]) -> None:
    """Wait for the build processes to end; kill those still running after the grace."""
    deadline = time.monotonic() + _STOP_GRACE_SECONDS
    for worker in workers:
        if worker.pid is None:
            continue  # never started
        worker.join(max(0.0, deadline - time.monotonic()))
        if worker.is_alive():
            worker.kill()
            worker.join()


class RangeFailed(RuntimeError):
    """Some partition of a range failed; the message is the range's summary."""


@contextmanager
def _progress_bar(total: int, stream: Lines) -> Iterator[Any]:
    """A tqdm bar on a terminal; elsewhere (a log file, a test) an inert one."""
    interactive = bool(getattr(stream, "isatty", lambda: False)())
    with tqdm(
        total=total,
        file=stream,
        unit="partition",
        disable=not interactive or total < 2,
        dynamic_ncols=True,
        leave=False,
    ) as bar:
        yield bar


def selected_assets(defs: Definitions, select: str | None) -> list[AssetKey]:
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


def split_symbols(symbols: Sequence[str] | None) -> list[str]:
    return [s.strip() for item in symbols or [] for s in item.split(",") if s.strip()]


def _month(option: str, text: str) -> Month:
    try:
        return Month.parse(text)
    except ValueError as exc:
        raise UsageError(f"{option} {text!r}: {exc}") from None


def _bar_files(defs: Definitions) -> BarFileIOManager | None:
    """The code location's IO manager, when it is this project's (it then names each file)."""
    io_manager = dict(defs.resources or {}).get("io_manager")
    return io_manager if isinstance(io_manager, BarFileIOManager) else None


def _built_everywhere(
    io_manager: BarFileIOManager | None,
    instance: DagsterInstance,
    asset_keys: Sequence[AssetKey],
    partitions: Sequence[str],
    catalog: Catalog,
) -> set[str]:
    """Partitions in which every asset of ``asset_keys`` has a materialization and its file
    in the data folder, saying it is that asset's partition, of the instrument the catalog
    asks for, and the whole month. A history that outlived its files (deleted, another data
    folder or format since, another file copied over, the symbol asked for otherwise since)
    is not a built partition, nor is a month stored partial (built again, it buys only what
    it lacks), nor bars built from other raw bars than the raw file's now."""
    sets = [set(instance.get_materialized_partitions(key)) for key in asset_keys]
    recorded = set.intersection(set(partitions), *sets) if sets else set()
    if io_manager is None:
        return recorded
    built = set()
    for name in recorded:
        partition = Partition.from_key(name)
        instrument = catalog.instrument(partition.symbol)
        found = [io_manager.stored_identity(key, partition, instrument) for key in asset_keys]
        raw = (  # its footer read once
            found[list(asset_keys).index(RAW_KEY)]
            if RAW_KEY in asset_keys
            else io_manager.stored_identity(RAW_KEY, partition, instrument)
        )
        if all(
            identity is not None and identity.complete and not built_from_older_raw(raw, identity)
            for identity in found
        ):
            built.add(name)
    return built


def catalog_of(defs: Definitions) -> Catalog:
    """The catalog the code location was built from (the one in force if it does not say)."""
    path = dict(defs.metadata or {}).get(CATALOG_METADATA_KEY)
    return load_catalog(str(getattr(path, "value", path))) if path is not None else load_catalog()


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
    run_id = str(uuid.uuid4())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            result = job.execute_in_process(
                partition_key=partition,
                instance=instance,
                tags={**tags, **_process_tags()},
                asset_selection=list(asset_keys),
                run_config={"loggers": {"console": {"config": {"log_level": log_level}}}},
                raise_on_error=False,
                run_id=run_id,
            )
    except BaseException as exc:
        # Interrupted (a cancelled job run, Ctrl-C) before its run could end: it would show
        # as not started, or running, for ever.
        run = instance.get_run_by_id(run_id)
        if run is not None and not run.is_finished:
            instance.report_run_canceled(run, "Stopped: the build it belongs to was cancelled.")
        if not isinstance(exc, KeyboardInterrupt) or run is None:
            raise
        raise _Stopped(
            _stopped(partition, start, run_id, _stored_events(instance, run_id))
        ) from None
    if _interrupted(result):
        # Ctrl-C during the run: Dagster ends it as failed and returns, and the build would
        # go on with the next partition. It stops here, as a Ctrl-C between runs does.
        raise _Stopped(_stopped(partition, start, run_id, _stored_events(instance, run_id)))
    seconds = time.monotonic() - start
    # From the events stored: the run's result leaves out those a failing step logged last
    # (what a refused download cost, recorded as the step fails).
    rows, files, cost = _written(_stored_events(instance, run_id))
    message = "" if result.success else _failure_text(result)
    outcome = PartitionOutcome(
        partition, result.success, seconds, result.run_id, message, False, rows, files, cost
    )
    # The run's result holds every output value of the run (a month of frames) in
    # reference cycles: collect them now rather than when the collector's oldest
    # generation next happens to run.
    del result
    gc.collect()
    return outcome


def _stored_events(instance: DagsterInstance, run_id: str) -> list[DagsterEvent]:
    return [r.dagster_event for r in instance.all_logs(run_id) if r.dagster_event]


def _stopped(
    partition: str, start: float, run_id: str, events: Sequence[DagsterEvent]
) -> PartitionOutcome:
    """A partition whose run an interrupt ended: what the run wrote and paid before it."""
    rows, files, cost = _written(events)
    seconds = time.monotonic() - start
    return PartitionOutcome(
        partition, False, seconds, run_id, INTERRUPTED, False, rows, files, cost, stopped=True
    )


def _written(events: Sequence[DagsterEvent]) -> tuple[int, int, float]:
    """(rows, files, Databento cost) of a run from its events: what its materializations
    wrote, and what it paid Databento, the 1-minute bars of the cross-check and refused
    downloads included."""
    rows, files, cost = 0, 0, 0.0
    for event in events:
        if event.event_type == DagsterEventType.ASSET_MATERIALIZATION:
            materialization = event.step_materialization_data.materialization
            metadata = {k: getattr(v, "value", v) for k, v in materialization.metadata.items()}
            rows += int(metadata.get("dagster/row_count") or 0)
            files += "path" in metadata
        elif event.event_type == DagsterEventType.ASSET_OBSERVATION:
            observation = event.asset_observation_data.asset_observation
            paid = observation.metadata.get(PAID_KEY)  # see assets.record_paid
            cost += float(getattr(paid, "value", paid) or 0.0)
    return rows, files, cost


# What Dagster's step failure says when the process was interrupted while it ran.
_INTERRUPTED = {"DagsterExecutionInterruptedError", "KeyboardInterrupt"}


def _interrupted(result: ExecuteInProcessResult) -> bool:
    for event in result.all_events:
        if event.event_type == DagsterEventType.STEP_FAILURE:
            error: _ErrorInfo | None = event.step_failure_data.error
            while error is not None:
                if error.cls_name in _INTERRUPTED:
                    return True
                error = error.cause
    return False


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


def _root_message(error: _ErrorInfo) -> str:
    """The innermost error, ``SourceError: ...``: the source's words, not Dagster's wrapper."""
    while error.cause is not None:
        error = error.cause
    message = error.message.strip()
    prefix, sep, rest = message.partition(": ")
    if sep and error.cls_name and prefix.endswith(error.cls_name):
        return f"{error.cls_name}: {rest}"
    return message


class _ErrorInfo(Protocol):
    """What a step failure's error info offers (Dagster does not export its class)."""

    message: str
    cls_name: str | None
    cause: _ErrorInfo | None


def _line(outcome: PartitionOutcome) -> str:
    if outcome.skipped:
        return f"{outcome.partition:<18} skipped  already built"
    status = "ok" if outcome.success else "STOPPED" if outcome.stopped else "FAILED"
    line = f"{outcome.partition:<18} {status:<7} {outcome.seconds:6.1f} s  run {outcome.run_id}"
    return f"{line}\n    {outcome.message}" if outcome.message else line


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m dbento_assets.backfill ARGS``, the same as ``dbento build ARGS``."""
    from dbento_assets.cli import main as cli_main

    cli_main(["build", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
