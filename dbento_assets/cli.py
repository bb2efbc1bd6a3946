"""``dbento``: the project's one command line, for people who do not live in Dagster.

``build``, ``estimate``, ``check-key``, ``status``, ``report``, ``ui`` and ``dagster ...``, all
on the settings file ``dbento.env`` and the project's one Dagster instance
(:mod:`dbento_assets.project`). A user's mistake ends as one sentence, exit status 2;
``--verbose`` adds the traceback.
"""

from __future__ import annotations

import os
import socket
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TextIO

import click

from dbento_assets.project import ProjectError, instance_home, project_instance

if TYPE_CHECKING:
    from dagster import DagsterInstance, Definitions

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
DEFAULT_PORT = 3000


class Streams:
    """Where a command writes (the terminal, or a test's buffers) and what tests inject."""

    def __init__(
        self,
        out: TextIO | None = None,
        err: TextIO | None = None,
        defs: Definitions | None = None,
        instance: DagsterInstance | None = None,
    ) -> None:
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.defs = defs
        self.instance = instance


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message is written for the user: shown as one sentence, no traceback."""
    from dbento_assets.backfill import UsageError
    from dbento_assets.batches import BatchSettingError
    from dbento_assets.core.catalog import CatalogError
    from dbento_assets.core.source import SourceError
    from dbento_assets.core.storage import StorageError
    from dbento_assets.executors import ExecutorChoiceError

    return (
        UsageError,
        ProjectError,
        SourceError,
        CatalogError,
        StorageError,
        ExecutorChoiceError,
        BatchSettingError,
        click.UsageError,
    )


def one_line(exc: BaseException) -> str:
    text = exc.format_message() if isinstance(exc, click.ClickException) else str(exc)
    return " ".join(text.split()) or type(exc).__name__


def guarded(streams: Streams, verbose: bool, action: Callable[[], int], hint: str = "") -> int:
    """Run ``action``; a user's mistake becomes one line on stderr and exit status 2."""
    from dbento_assets.core.storage import share_system_allocator

    share_system_allocator()  # before the command's first Arrow buffer
    try:
        return action()
    except _expected_errors() as exc:
        print(f"error: {one_line(exc)}{hint}", file=streams.err)
        if verbose:
            traceback.print_exc(file=streams.err)
        return EXIT_USAGE
    except Exception as exc:
        print(
            f"error: {type(exc).__name__}: {one_line(exc)} (unexpected: run the command again "
            "with --verbose and report what it prints)",
            file=streams.err,
        )
        if verbose:
            traceback.print_exc(file=streams.err)
        return EXIT_USAGE


verbose_option = click.option(
    "--verbose", is_flag=True, help="show Dagster's own log and the traceback of an error"
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def dbento() -> None:
    """Databento 1-second bars, month by month: build, price, check and inspect them.

    Settings come from the shell, then from dbento.env in this folder (the shell wins).
    Every command keeps its history in one Dagster instance: DAGSTER_HOME, else
    ./.dagster_home.
    """


@dbento.command(short_help="Build a range of symbol-months (one run each).")
@click.option(
    "--symbol",
    "--symbols",
    "symbols",
    multiple=True,
    help="catalog symbol; repeat it or separate with commas (default: every symbol)",
)
@click.option("--start", help="first month, YYYY-MM")
@click.option("--end", help="last month, YYYY-MM, inclusive (default: --start)")
@click.option(
    "--partition",
    "partitions",
    multiple=True,
    help="one partition key instead of a range, YYYY-MM-01|SYMBOL (repeatable)",
)
@click.option(
    "--select",
    help="assets to build, such as 'raw_1s_bars' or 'bars_15s,bars_1min' (default: all)",
)
@click.option(
    "--force",
    is_flag=True,
    help="download again even months already in the download cache (costs money)",
)
@click.option(
    "--force-vendor-1m",
    is_flag=True,
    help="download again only Databento's 1-minute bars of the vendor cross-check (costs "
    "money; needs DBENTO_VENDOR_CHECK=true)",
)
@click.option(
    "--missing-only",
    is_flag=True,
    help="skip partitions where every asset is already built (recorded in the history, with "
    "its file in the data folder)",
)
@verbose_option
@click.pass_obj
def build(
    streams: Streams,
    symbols: tuple[str, ...],
    start: str | None,
    end: str | None,
    partitions: tuple[str, ...],
    select: str | None,
    force: bool,
    force_vendor_1m: bool,
    missing_only: bool,
    verbose: bool,
) -> int:
    """Build symbol-months, one Dagster run per partition, e.g. --symbol ES --start 2024-01.

    A range is shared among DBENTO_RANGE_WORKERS processes (default: one per CPU core,
    at most 64); Ctrl-C stops them all, each after its partition in progress.

    Exit status: 0 all built, 1 some partition failed, 2 a set-up or option error.
    """
    from dbento_assets import assets, backfill

    def action() -> int:
        if force and force_vendor_1m:
            raise backfill.UsageError(
                "--force already downloads the 1-minute bars again with the month; give "
                "--force or --force-vendor-1m"
            )
        if bool(start) == bool(partitions):
            raise backfill.UsageError(
                "give either --start YYYY-MM (with --end and --symbol) or --partition "
                f"{backfill.KEY_FORM}"
            )
        defs = streams.defs or _project_defs()
        partitions_def = backfill.month_symbol_partitions(defs)
        if partitions:
            keys = list(dict.fromkeys(partitions))  # a partition given twice is built once
            backfill.check_partition_keys(partitions_def, keys)
            label = ",".join(keys)
        else:
            assert start is not None
            keys = backfill.plan_partitions(partitions_def, symbols, start, end)
            names = ",".join(backfill.split_symbols(symbols) or ["all"])
            label = f"{names} {start}..{end or start}"
        workers = backfill.range_workers()
        with project_instance(streams.instance) as instance:
            try:
                text = backfill.build_range(
                    defs,
                    instance,
                    keys,
                    select=select,
                    force=force or force_vendor_1m,
                    force_tag=assets.FORCE_VENDOR_1M if force_vendor_1m else "true",
                    missing_only=missing_only,
                    tags={backfill.RANGE_TAG: label},
                    log_level="DEBUG" if verbose else "CRITICAL",
                    out=streams.out,
                    progress=streams.err,
                    workers=workers,
                    # New build processes load the project's code location; given one
                    # (tests), the build stays in this process.
                    load_defs=_project_defs if streams.defs is None else None,
                )
            except backfill.RangeFailed as failed:
                print(failed, file=streams.out, flush=True)
                return EXIT_FAILED
        print(text, file=streams.out, flush=True)
        return EXIT_OK

    return guarded(streams, verbose, action)


# A command whose arguments go to another parser (its own --help included).
PASS_THROUGH = {"ignore_unknown_options": True, "allow_extra_args": True}


def passed_through(name: str | None, short_help: str) -> Callable[[Callable[..., int]], Any]:
    """Register a ``dbento`` command whose arguments all go to another command's parser."""

    def register(func: Callable[..., int]) -> Any:
        args = click.argument("args", nargs=-1, type=click.UNPROCESSED)(click.pass_obj(func))
        return dbento.command(
            name, context_settings=PASS_THROUGH, add_help_option=False, short_help=short_help
        )(args)

    return register


@passed_through("estimate", "Price months on Databento, free.")
def estimate(streams: Streams, args: tuple[str, ...]) -> int:
    """The Databento cost of a range, free: --symbols ES,NQ --start 2024-01 --end 2024-03."""
    from dbento_assets import estimate as module

    verbose, rest = _split_verbose(args)
    return guarded(streams, verbose, lambda: module.run(rest, streams.out, streams.err))


@dbento.command("check-key", short_help="Prove the API key works (free).")
@verbose_option
@click.pass_obj
def check_key(streams: Streams, verbose: bool) -> int:
    """Prove the API key works with one free price request (nothing is bought)."""
    from dbento_assets.core.catalog import load_catalog
    from dbento_assets.resources import databento_resource_from_env

    def action() -> int:
        catalog = load_catalog()
        instrument = catalog.instrument(catalog.symbols[0])
        month = catalog.start_month  # long published, so Databento can price it
        api = databento_resource_from_env().api_source()
        # Asked even for a month in the download cache: only Databento's answer proves a key.
        est = api.estimate(instrument, month, ask=True)
        what = (
            f"{instrument.symbol} {month} would cost ${est.cost_usd or 0:,.4f}"
            if est.cost_usd is not None
            else est.note
        )
        print(f"The key works: Databento answered ({what}).", file=streams.out)
        return EXIT_OK

    return guarded(streams, verbose, action)


@dbento.command(short_help="Files on disk and check status, symbol x month.")
@click.option(
    "--symbol", "symbols", multiple=True, help="only these symbols (comma-separated, repeatable)"
)
@verbose_option
@click.pass_obj
def status(streams: Streams, symbols: tuple[str, ...], verbose: bool) -> int:
    """What is on disk and its check status, symbol x month."""

    def action() -> int:
        from dbento_assets import status as module

        with _instance(streams) as instance:
            from dbento_assets.backfill import split_symbols

            wanted = split_symbols(symbols) or None  # ES,NQ as dbento build takes them
            print(module.render(instance, wanted), file=streams.out)
        return EXIT_OK

    return guarded(streams, verbose, action)


@passed_through("report", "Write the validation report (Markdown).")
def report(streams: Streams, args: tuple[str, ...]) -> int:
    """Write the validation report (default logs/validation_report.md); --help for options."""
    from dbento_assets import report as module

    verbose, rest = _split_verbose(args)

    def action() -> int:
        with _instance(streams) as instance:
            return module.main(rest, instance=instance, out=streams.out, err=streams.err)

    return guarded(streams, verbose, action)


@dbento.command(
    context_settings=PASS_THROUGH,
    short_help="Start the Dagster UI (dagster dev); Ctrl-C stops it.",
)
@click.option("--port", "-p", type=int, default=DEFAULT_PORT, show_default=True)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
def ui(streams: Streams, port: int, args: tuple[str, ...]) -> int:
    """Start the Dagster UI (dagster dev) on the project's history; stop it with Ctrl-C."""

    def action() -> int:
        home = instance_home()
        if not _port_free(port):
            raise ProjectError(
                f"port {port} is already in use, probably by a dagster dev started earlier: "
                f"stop it with Ctrl-C in its terminal, or run dbento ui --port {port + 1}."
            )
        print(
            f"Dagster UI on http://127.0.0.1:{port} with the history in {home}; Ctrl-C stops it.",
            file=streams.err,
            flush=True,
        )
        # Dagster's CLI warns at each start that `dagster dev` is superseded by `dg dev`, a
        # tool this project does not install: a user following it would find no such command.
        quiet = ["-W", "ignore:Function `dev_command` is superseded:FutureWarning"]
        command = [sys.executable, *quiet, "-m", "dagster", "dev", "-m", "dbento_assets"]
        command += ["-h", "127.0.0.1", "-p", str(port), *args]
        os.execvp(command[0], command)
        return EXIT_OK  # not reached

    return guarded(streams, False, action)


@passed_through("dagster", "Any dagster command, on the same history.")
def dagster_command(streams: Streams, args: tuple[str, ...]) -> int:
    """Any dagster command on the project's history, e.g. dagster instance concurrency get
    databento (that one does not read .env, so it needs this)."""

    def action() -> int:
        instance_home()
        command = [sys.executable, "-m", "dagster", *args]
        os.execvp(command[0], command)
        return EXIT_OK  # not reached

    return guarded(streams, "--verbose" in args, action)


def _project_defs() -> Definitions:
    from dbento_assets.definitions import defs

    return defs


def _split_verbose(args: Sequence[str]) -> tuple[bool, list[str]]:
    """``--verbose`` is ours; the rest goes to a passed-through command's own parser."""
    return "--verbose" in args, [a for a in args if a != "--verbose"]


def _instance(streams: Streams) -> Any:
    return project_instance(streams.instance)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def run(
    argv: Sequence[str],
    out: TextIO | None = None,
    err: TextIO | None = None,
    *,
    defs: Definitions | None = None,
    instance: DagsterInstance | None = None,
) -> int:
    """``dbento ARGV`` in this process; returns the exit status."""
    streams = Streams(out, err, defs, instance)
    try:
        result = dbento.main(
            args=list(argv), prog_name="dbento", standalone_mode=False, obj=streams
        )
    except click.exceptions.NoArgsIsHelpError as exc:
        print(exc.format_message(), file=streams.err)
        return EXIT_USAGE
    except click.ClickException as exc:
        print(f"error: {one_line(exc)} See dbento --help.", file=streams.err)
        return EXIT_USAGE
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.Abort:
        print("aborted", file=streams.err)
        return EXIT_FAILED
    return int(result or 0)


def main(argv: Sequence[str] | None = None) -> None:
    """The ``dbento`` console script."""
    raise SystemExit(run(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
