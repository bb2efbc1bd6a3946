"""Benchmark backfills through the Dagster daemon against the pure compute of their partitions.

The default, ``--mode rebuild``, is what a user waits for after adding a timeframe: the raw
months are already stored (built first, untimed, with ``dbento build --select raw_1s_bars``),
and every bars asset is built again for 5 symbols x 12 months of realistic demo data (60
partitions, about a million 1-second bars per ES month): first with ``dbento build`` (no
daemon; the range shared among ``DBENTO_RANGE_WORKERS`` processes), then on a real deployment
(webserver plus daemon, a temporary ``DAGSTER_HOME``; :mod:`dbento_assets_tests.deployment`),
twice:

- with the ``build_range`` job, launched as the launchpad does (``launchRun``): one run for
  the range, each partition a run of its own inside it;
- with a backfill launched as the UI's "Materialize" dialog does (``launchPartitionBackfill``):
  one run per partition, each a new process;
- with the same backfill batched (``DBENTO_BACKFILL_BATCH``, ``--batch``, default 12: a
  symbol's year per run), in a second deployment on the same data.

For each it prints the wall time (from the launch to the end), its ratio to the pure compute
of the same partitions and the target (wall <= 2 x pure compute + 60 s), Dagster's step
durations, and whether every check result is attributed to its partition and the UI's
per-partition check status (``partitionStatuses``) says what each partition's evaluation
said. The pure compute is measured in the same run before the deployment starts: the core
functions the bars step calls (read the raw file, the raw gate, aggregation, the aggregated
rules, the files), one partition after another in this process.

``--mode daemon`` backfills every asset (downloads included) and ``--mode cli`` runs the same
partitions with ``python -m dbento_assets.backfill`` (its processes, one run per partition, no
daemon); both report Dagster's step durations as compute. Options: ``--executor`` sets
``DBENTO_EXECUTOR`` (``in_process``: the steps of a run in the run's own process;
``multiprocess``: a process per step; ``default``: unset, Dagster's default),
``--max-concurrent-runs`` (the run queue limit), ``--pool-limit`` (the ``databento`` pool),
``--backfill-interval`` (shorten the backfill daemon's 30 s loop; default: Dagster's own),
``--months``/``--symbols``. ``--json`` prints the figures as one JSON object.

Run: ``python benchmarks/bench_backfill.py`` (from the repository root).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_month import Clock, step_bars  # noqa: E402
from dagster import DagsterInstance, DagsterRun, RunsFilter  # noqa: E402

from dbento_assets.backfill import RANGE_TAG  # noqa: E402
from dbento_assets.core.catalog import load_catalog  # noqa: E402
from dbento_assets.core.months import Month, month_range  # noqa: E402
from dbento_assets.names import RAW_ASSET, bars_asset_name  # noqa: E402
from dbento_assets.partitions import partition_key  # noqa: E402
from dbento_assets.range_job import JOB_NAME  # noqa: E402
from dbento_assets_tests.deployment import (  # noqa: E402
    Deployment,
    DeploymentConfig,
    RunTiming,
    backfill_runs,
    check_evaluations,
    materializations,
    partition_of,
    run_timings,
    running_deployment,
    statuses_said,
    write_dagster_yaml,
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=("rebuild", "daemon", "cli"), default="rebuild")
    parser.add_argument(
        "--executor", choices=("in_process", "multiprocess", "default"), default="in_process"
    )
    parser.add_argument("--max-concurrent-runs", type=int, default=2)
    parser.add_argument("--pool-limit", type=int, default=2)
    parser.add_argument("--run-buffer", type=int, default=1)
    parser.add_argument(
        "--backfill-interval",
        type=float,
        default=None,
        help="backfill daemon loop period in seconds (default: Dagster's own, 30 s)",
    )
    parser.add_argument("--symbols", default="ES,NQ,GC,SPY,QQQ")
    parser.add_argument("--start", default="2024-01")
    parser.add_argument("--months", type=int, default=12)
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument(
        "--batch", type=int, default=12, help="DBENTO_BACKFILL_BATCH of the batched backfill"
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    return parser.parse_args()


def planned_partitions(symbols: list[str], start: Month, months: int) -> list[str]:
    last = start
    for _ in range(months - 1):
        last = last.next()
    return [str(partition_key(m, s)) for s in symbols for m in month_range(start, last)]


def attribution(instance: DagsterInstance, run_ids: list[str], partitions: list[str]) -> dict:
    """Check results per partition: every check once per partition, each named by it."""
    evaluations = check_evaluations(instance, run_ids)
    per_key = Counter((e.asset, e.check_name, e.partition) for e in evaluations)
    checks = {(e.asset, e.check_name) for e in evaluations}
    complete = per_key == Counter({(a, c, p): 1 for a, c in checks for p in partitions})
    return {
        "check_evaluations": len(evaluations),
        "checks_per_partition": len(checks),
        "without_partition": sum(1 for e in evaluations if e.partition is None),
        "attributed_per_partition": bool(evaluations) and complete,
        "failed_error_checks": sum(
            1 for e in evaluations if not e.passed and e.severity == "ERROR"
        ),
    }


def figures(timings: list[RunTiming], wall: float, partitions: list[str]) -> dict:
    compute = sum(t.compute_seconds for t in timings)
    run_seconds = sum(t.run_seconds or 0.0 for t in timings)
    started = [t.created for t in timings]
    ended = [t.ended for t in timings if t.ended is not None]
    return {
        "partitions": len(partitions),
        "runs": len(timings),
        "runs_succeeded": sum(t.status == "SUCCESS" for t in timings),
        "wall_seconds": round(wall, 1),
        "compute_seconds": round(compute, 1),
        "run_seconds_sum": round(run_seconds, 1),
        "first_run_to_last_end_seconds": round(max(ended) - min(started), 1) if ended else None,
        "ratio_wall_to_compute": round(wall / compute, 2) if compute else None,
        "compute_per_partition_seconds": round(compute / max(len(timings), 1), 2),
    }


def deployment_for(
    args: argparse.Namespace, workdir: Path, env: dict[str, str]
) -> contextlib.AbstractContextManager[Deployment]:
    """A real deployment with the run queue, pool and backfill loop the options ask for."""
    config = DeploymentConfig(
        max_concurrent_runs=args.max_concurrent_runs,
        databento_pool_limit=args.pool_limit,
        run_buffer=args.run_buffer,
    )
    return running_deployment(
        workdir, env, config=config, backfill_interval_seconds=args.backfill_interval
    )


def bench_daemon(args: argparse.Namespace, workdir: Path, partitions: list[str]) -> dict:
    env = {"DBENTO_SOURCE": "demo", "DBENTO_DATA_DIR": str(workdir / "data")}
    if args.executor == "in_process":
        env["DBENTO_EXECUTOR"] = "in_process"
    elif args.executor == "multiprocess":
        env["DBENTO_EXECUTOR"] = "multiprocess"
    with deployment_for(args, workdir, env) as deployment:
        start = time.monotonic()
        backfill_id = deployment.launch_backfill(partitions)
        result = deployment.wait_for_backfill(
            backfill_id, timeout=args.timeout, poll_seconds=1.0, started_at=start
        )
        with deployment.instance() as instance:
            runs = backfill_runs(instance, backfill_id)
            timings = run_timings(instance, runs)
            out = figures(timings, result.wall_seconds, partitions)
            out["backfill_status"] = result.status
            out["run_partitions_match"] = sorted(partition_of(r) for r in runs) == sorted(
                partitions
            )
            out.update(attribution(instance, [r.run_id for r in runs], partitions))
    return out


def range_of(partitions: list[str]) -> tuple[list[str], str, str]:
    """The symbols and the first and last month (YYYY-MM) of month x symbol keys."""
    symbols = sorted({p.split("|")[1] for p in partitions})
    months = sorted({p.split("|")[0][:7] for p in partitions})
    return symbols, months[0], months[-1]


def dbento_build(workdir: Path, env: dict[str, str], partitions: list[str], *extra: str) -> Path:
    """Run ``dbento build`` over ``partitions`` (its own process, on ``workdir``'s
    ``DAGSTER_HOME``); return that home. Exits the benchmark when the command fails."""
    home = workdir / "dagster_home"
    write_dagster_yaml(home)
    symbols, first, last = range_of(partitions)
    command = [sys.executable, "-m", "dbento_assets.backfill", "--symbols", ",".join(symbols)]
    command += ["--start", first, "--end", last, *extra]
    child_env = {**os.environ, "DAGSTER_HOME": str(home), "PYTHONPATH": str(ROOT), **env}
    done = subprocess.run(command, cwd=workdir, env=child_env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"dbento build failed:\n{done.stdout}\n{done.stderr[-4000:]}")
    return home


def pure_compute(
    data_dir: Path, scratch: Path, partitions: list[str], labels: tuple[str, ...]
) -> dict:
    """The bars step's core functions over every partition, one after another in this
    process: seconds in all and per stage (the first partition pays the one-time start-up
    of the rules, as a run's process does)."""
    clock = Clock()
    start = time.perf_counter()
    for key in partitions:
        day, symbol = key.split("|")
        month = Month.parse(day[:7])
        step_bars(
            scratch,
            clock,
            symbol=symbol,
            month=(month.year, month.month),
            raw_from=data_dir,
            labels=labels,
        )
    return {
        "pure_compute_seconds": round(time.perf_counter() - start, 1),
        "pure_compute_stages": {k: round(v, 2) for k, v in clock.stages.items()},
        "timeframes": list(labels),
    }


def bench_rebuild(args: argparse.Namespace, workdir: Path, partitions: list[str]) -> dict:
    data_dir = workdir / "data"
    # A run per partition first; the batched backfill sets its own batch below.
    env = {"DBENTO_SOURCE": "demo", "DBENTO_DATA_DIR": str(data_dir), "DBENTO_BACKFILL_BATCH": "1"}
    if args.executor != "default":
        env["DBENTO_EXECUTOR"] = args.executor
    symbols, first, last = range_of(partitions)
    dbento_build(workdir, env, partitions, "--select", RAW_ASSET)
    timeframes = load_catalog().timeframes
    labels = tuple(tf.label for tf in timeframes)
    out = pure_compute(data_dir, workdir / "scratch", partitions, labels)
    out["batch"] = args.batch
    pure = out["pure_compute_seconds"]
    out["target_wall_seconds"] = round(2 * pure + 60, 1)
    bars_assets = [bars_asset_name(tf) for tf in timeframes]
    # dbento build: the range shared among DBENTO_RANGE_WORKERS processes, no daemon.
    since = datetime.datetime.now(datetime.UTC)
    start = time.monotonic()
    dbento_build(workdir, env, partitions, "--select", ",".join(bars_assets))
    cli_wall = time.monotonic() - start
    with deployment_for(args, workdir, env) as deployment:
        with deployment.instance() as instance:
            runs = list(instance.get_runs(RunsFilter(created_after=since)))
            out["cli"] = rebuild_figures(deployment, instance, runs, cli_wall, partitions, pure)
        out["cli"]["status"] = "SUCCESS"
        # The build_range job: one run for the range, each partition a run of its own in it.
        start = time.monotonic()
        range_config = {"start": first, "end": last, "symbols": symbols}
        range_config["select"] = ",".join(bars_assets)
        run_id = deployment.launch_run(JOB_NAME, range_config)
        status = deployment.wait_for_run(run_id, timeout=args.timeout)
        wall = time.monotonic() - start
        with deployment.instance() as instance:
            runs = list(instance.get_runs(RunsFilter(tags={RANGE_TAG: run_id})))
            out["range_job"] = rebuild_figures(deployment, instance, runs, wall, partitions, pure)
        out["range_job"]["status"] = status
        # The UI's backfill of the same partitions: one run per partition.
        out["backfill"] = ui_backfill(args, deployment, partitions, bars_assets, pure)
    # The same backfill batched: DBENTO_BACKFILL_BATCH partitions of a symbol per run (read
    # when the code location loads, so in a deployment of its own, on the same data).
    batched_env = {**env, "DBENTO_BACKFILL_BATCH": str(args.batch)}
    with deployment_for(args, workdir / "batched", batched_env) as deployment:
        out["batched"] = ui_backfill(args, deployment, partitions, bars_assets, pure)
    return out


def ui_backfill(
    args: argparse.Namespace,
    deployment: Deployment,
    partitions: list[str],
    assets: list[str],
    pure: float,
) -> dict:
    """A backfill launched as the UI's Materialize dialog does, timed to its end."""
    start = time.monotonic()
    backfill_id = deployment.launch_backfill(partitions, assets)
    result = deployment.wait_for_backfill(
        backfill_id, timeout=args.timeout, poll_seconds=1.0, started_at=start
    )
    with deployment.instance() as instance:
        runs = backfill_runs(instance, backfill_id)
        out = rebuild_figures(deployment, instance, runs, result.wall_seconds, partitions, pure)
    out["status"] = result.status
    return out


def rebuild_figures(
    deployment: Deployment,
    instance: DagsterInstance,
    runs: list[DagsterRun],
    wall: float,
    partitions: list[str],
    pure: float,
) -> dict:
    """Wall time against pure compute, and whether the UI shows each partition's checks as
    that partition's own evaluations said."""
    out = figures(run_timings(instance, runs), wall, partitions)
    run_ids = [r.run_id for r in runs]
    if all(partition_of(r) is not None for r in runs):  # a run per partition
        out["run_partitions_match"] = sorted(partition_of(r) for r in runs) == sorted(partitions)
    made = Counter((m.asset, m.partition) for m in materializations(instance, run_ids))
    assets = {asset for asset, _ in made}
    out["materialized_once_each"] = bool(made) and made == Counter(
        {(a, p): 1 for a in assets for p in partitions}
    )
    out.update(attribution(instance, run_ids, partitions))
    said = statuses_said(instance, run_ids)
    shown = deployment.check_partition_statuses()
    out["ui_check_status_right"] = bool(said) and all(shown.get(k) == v for k, v in said.items())
    out["ratio_wall_to_pure_compute"] = round(wall / pure, 2) if pure else None
    out["target_met"] = wall <= 2 * pure + 60
    return out


def bench_cli(args: argparse.Namespace, workdir: Path, partitions: list[str]) -> dict:
    env = {"DBENTO_SOURCE": "demo", "DBENTO_DATA_DIR": str(workdir / "data")}
    start = time.monotonic()
    home = dbento_build(workdir, env, partitions)
    wall = time.monotonic() - start
    with DagsterInstance.from_config(str(home)) as instance:
        runs = list(instance.get_runs(RunsFilter()))
        out = figures(run_timings(instance, runs), wall, partitions)
        out["backfill_status"] = "COMPLETED_SUCCESS"
        out["run_partitions_match"] = sorted(partition_of(r) for r in runs) == sorted(partitions)
        out.update(attribution(instance, [r.run_id for r in runs], partitions))
    return out


def print_rebuild(out: dict, partitions: list[str]) -> None:
    pure = out["pure_compute_seconds"]
    print(
        f"rebuild of {', '.join(out['timeframes'])} bars, {len(partitions)} partitions (raw "
        "months stored), through the daemon"
    )
    print(f"  pure compute:   {pure:.1f} s ({pure / len(partitions):.2f} s per partition)")
    print(f"    stages (s):   {out['pure_compute_stages']}")
    print(f"  target:         wall <= 2 x pure + 60 s = {out['target_wall_seconds']:.1f} s")
    for key, name in [
        ("cli", "dbento build (a run per partition, in DBENTO_RANGE_WORKERS processes)"),
        ("range_job", "build_range job (one run, a run per partition inside it)"),
        ("backfill", "UI backfill (one run per partition)"),
        ("batched", f"UI backfill, DBENTO_BACKFILL_BATCH={out['batch']} (partitions per run)"),
    ]:
        one = out[key]
        print(
            f"  {name}: {one['status']}, {one['runs']} runs; every partition materialized "
            f"once: {one['materialized_once_each']}"
        )
        print(
            f"    wall {one['wall_seconds']:.1f} s = {one['ratio_wall_to_pure_compute']} x pure; "
            f"target {'met' if one['target_met'] else 'not met'}; Dagster's step durations "
            f"{one['compute_seconds']:.1f} s"
        )
        print(
            f"    checks: {one['check_evaluations']} evaluations, {one['checks_per_partition']} "
            f"per partition, attributed per partition: {one['attributed_per_partition']}, "
            f"UI status per partition right: {one['ui_check_status_right']}"
        )
    print(f"  settings: {out['settings']}")


def main() -> None:
    args = parse_args()
    symbols = [s.strip() for s in args.symbols.split(",") if s.strip()]
    partitions = planned_partitions(symbols, Month.parse(args.start), args.months)
    workdir = Path(tempfile.mkdtemp(prefix="bench-backfill-"))
    try:
        bench = {"rebuild": bench_rebuild, "daemon": bench_daemon, "cli": bench_cli}[args.mode]
        out = bench(args, workdir, partitions)
    finally:
        if not args.keep:
            subprocess.run(["rm", "-rf", str(workdir)], check=False)
    out["settings"] = {
        "mode": args.mode,
        "executor": args.executor,
        "max_concurrent_runs": args.max_concurrent_runs,
        "pool_limit": args.pool_limit,
        "run_buffer": args.run_buffer,
        "backfill_interval_seconds": args.backfill_interval or 30.0,
        "cpus": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    if args.json:
        print(json.dumps(out))
        return
    if args.mode == "rebuild":
        print_rebuild(out, partitions)
        return
    compute = out["compute_seconds"]
    print(f"backfill of {len(partitions)} partitions ({args.mode}, {args.executor} executor)")
    print(f"  status:                   {out['backfill_status']}, {out['runs']} runs")
    print(f"  wall time:                {out['wall_seconds']:.1f} s")
    each = out["compute_per_partition_seconds"]
    print(f"  sum of partition compute: {compute:.1f} s ({each} s per partition)")
    print(f"  ratio wall / compute:     {out['ratio_wall_to_compute']}")
    print(f"  target wall <= 2 x compute + constant: 2 x compute = {2 * compute:.1f} s")
    print(
        f"  check results: {out['check_evaluations']} evaluations, "
        f"{out['checks_per_partition']} checks per partition, attributed per partition: "
        f"{out['attributed_per_partition']}"
    )
    print(f"  settings: {out['settings']}")


if __name__ == "__main__":
    main()
