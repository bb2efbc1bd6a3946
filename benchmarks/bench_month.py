"""Benchmark one partition: this project's whole per-partition work, rules included, against
the seed scripts' pandas pipeline with its validation step, and the same partition through
``dagster asset materialize``.

It builds a realistic ~1.2M-row ES month of 1-second bars as a DBN file (the demo generator),
then measures, in the same run and each in a fresh process (time and peak RSS):

(a) this project's partition, as the default in-process executor runs it: decode the DBN, the
    raw rules, the raw file (with the proof that its blocking rules passed), then the bars
    step: the raw gate (the proof recomputed; the rules are not run again), aggregation to
    15s/30s/1min, the aggregated rules (reconciliation against an independent groupby), the
    files; each Parquet file is encoded in a worker thread while its rules run, the
    groupby that reconciles the 15s bars with raw runs in it beside the aggregation, and
    those of 30s and 1min (from the finer bars) beside the finer timeframe's rules, as the
    steps do (``BarStore.encode_ahead``, ``reconcile_ahead``). Timed stage by stage. Once
    more with the two steps in separate processes, the bars step reading the raw file back
    (the multiprocess executor; time: the sum of the steps, peak RSS: the larger step's);
(b) the seed pipeline: ``DBNStore.to_df()``, raw CSV, ``read_csv``,
    ``resample(label='left', closed='left').agg(...).dropna()`` per timeframe, CSV files; then
    its validation step, written as a seed engineer would: a pandera schema (dtypes, positive
    prices, high/low consistent with open/close, a unique increasing index, bars on their
    timeframe's grid) validating the raw frame and each timeframe's CSV read back, and each
    timeframe reconciled with a ``resample`` of the raw frame (``assert_frame_equal``);
(c) the same partition through ``dagster asset materialize`` (all assets, their checks), a real
    subprocess with ``DAGSTER_HOME`` a fresh instance (created before the clock starts) and
    the local DBN folder as source (``DBENTO_SOURCE=dbn``): wall time and the process's peak
    RSS; once with the in-memory hand-off of the raw month (``DBENTO_HANDOFF=true``, the
    default) and once without it (the bars step reads the raw file).

In (a) and (b) interpreter start-up and imports are outside the timing; (c) is what a user
waits for, start-up included. For (a) and (c) it also prints the floor of a design that holds
the raw month as one frame: the memory before any work (after the imports; for (c) the
process as its first step starts) plus that frame alone. Every process runs as the README's
install makes it, without the test-only package hypothesis (pandera imports it on its first
validation when it is there; ``--with-test-extras`` keeps it). Run:
``python benchmarks/bench_month.py`` (``--repeat 3`` keeps the best of three).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported in the child processes only, after the package (see child)
    import pandas as pd

TIMEFRAMES = ("15s", "30s", "1min")
TARGET_ROWS = 1_200_000
SYMBOL = "ES"
PARTITION = "2024-01-01|ES"
Stages = dict[str, float]


class Clock:
    """Seconds per stage, in the order they first ran: ``with clock("stage"): ...``."""

    def __init__(self) -> None:
        self.stages: Stages = {}

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.stages[stage] = self.stages.get(stage, 0.0) + time.perf_counter() - start


def make_month_file(folder: Path, target_rows: int = TARGET_ROWS) -> tuple[Path, int]:
    """Write a demo ES month (January 2024) of about ``target_rows`` bars as DBN; return its
    path and its number of bars."""
    from dbento_assets.core.catalog import load_catalog
    from dbento_assets.core.dbn import encode_month
    from dbento_assets.core.demo import (
        demo_contract_schedule,
        generate_month_records,
        symbology_mappings,
    )
    from dbento_assets.core.months import Month

    instrument = load_catalog().instrument(SYMBOL)
    month = Month(2024, 1)
    activity = 1.0
    for _ in range(6):  # scale the trade probability until the month has ~1.2M bars
        records = generate_month_records(instrument, month, activity=activity)
        if abs(len(records) - target_rows) < 0.03 * target_rows:
            break
        activity *= target_rows / max(len(records), 1)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "ES_2024_01.ohlcv-1s.dbn.zst"
    # With its symbology, as Databento writes it: the local DBN source reads the file.
    mappings = symbology_mappings(instrument, demo_contract_schedule(instrument, month))
    path.write_bytes(encode_month(records, instrument, month, mappings=mappings))
    return path, len(records)


# --------------------------------------------------------------------------- (a) this project


def step_raw(dbn: Path, out: Path, clock: Clock) -> pd.DataFrame:
    """What ``raw_1s_bars`` does: decode the month's DBN (its one read), run the raw rules,
    write the raw file with the proof that its blocking rules passed."""
    from dbento_assets.core.catalog import load_catalog
    from dbento_assets.core.dbn import decode_month
    from dbento_assets.core.months import Month
    from dbento_assets.core.run_rules import raw_rules_proof, run_raw_rules
    from dbento_assets.core.storage import BarStore, FileIdentity

    month = Month(2024, 1)
    instrument = load_catalog().instrument(SYMBOL)
    store = BarStore.at(out)
    with clock("decode DBN"):
        raw = decode_month([dbn], SYMBOL, month).bars
    with clock("raw file encoded ahead (started)"):
        store.encode_ahead(raw)  # as raw_1s_bars does: encoded while the rules run
    with clock("raw rules"):
        results = run_raw_rules(raw, month, instrument)
    assert not [r for r in results if r.blocking], "the benchmark month must pass its rules"
    with clock("raw rules proof (fingerprint)"):
        proof = raw_rules_proof(raw, month)
    identity = FileIdentity(SYMBOL, month, "synthetic", raw_rules=proof)
    with clock("write raw"):
        store.write(raw, store.raw_path(SYMBOL, month), identity)
    raw.attrs["identity"] = identity  # as the IO manager hands it over
    return raw


def step_bars(
    out: Path,
    clock: Clock,
    raw: pd.DataFrame | None = None,
    *,
    symbol: str = SYMBOL,
    month: tuple[int, int] = (2024, 1),
    raw_from: Path | None = None,
    labels: tuple[str, ...] = TIMEFRAMES,
) -> None:
    """What the bars step does: the raw month (handed over, else read back from its file in
    ``raw_from``, default ``out``), the raw gate, aggregation, the aggregated rules per
    timeframe, the files (in ``out``)."""
    from dbento_assets.core.aggregate import aggregate_many, built_from
    from dbento_assets.core.catalog import load_catalog
    from dbento_assets.core.months import Month
    from dbento_assets.core.rules import RAW_BLOCKING_RULES, RULE_RECONCILED
    from dbento_assets.core.run_rules import (
        raw_rules_proven,
        reconcile_ahead,
        run_aggregated_rules,
        run_raw_rules,
    )
    from dbento_assets.core.storage import BarStore, FileIdentity
    from dbento_assets.core.timeframes import Timeframe, finest_first, parse_timeframe

    month_ = Month(*month)
    instrument = load_catalog().instrument(symbol)
    store = BarStore.at(out)
    if raw is None:
        source = BarStore.at(raw_from or out)
        with clock("read raw file"):
            raw, identity = source.read_with_identity(source.raw_path(symbol, month_))
    else:
        identity = raw.attrs["identity"]
    with clock("raw gate (proof check)"):
        proven = raw_rules_proven(raw, identity, month_)
    if not proven:
        with clock("raw gate (rules again)"):
            run_raw_rules(raw, month_, instrument, rules=RAW_BLOCKING_RULES)
    # Finest first, as the bars step judges them.
    timeframes = finest_first(parse_timeframe(label) for label in labels)
    plan = built_from(timeframes)
    with clock("recomputation from raw begun ahead (started)"):
        reconcile_ahead(raw, plan)  # as the bars step does: beside the aggregation
    with clock("aggregate"):
        aggregated = aggregate_many(raw, timeframes)
    with clock("bar files encoded ahead (started)"):
        for bars in aggregated.values():  # as the bars step does: encoded while checked
            store.encode_ahead(bars)
    with clock("recomputation from finer bars begun ahead (started)"):
        reconcile_ahead(raw, plan, aggregated)  # as the bars step does
    reconciled: dict[Timeframe, pd.DataFrame] = {}
    for tf in timeframes:
        bars = aggregated[tf]
        with clock("aggregated rules"):
            finer = reconciled.get(plan[tf]) if plan[tf] is not None else None
            results = run_aggregated_rules(bars, raw, month_, tf, built_from=finer)
        assert not [r for r in results if r.blocking], f"{tf.label} fails its rules"
        if any(r.rule == RULE_RECONCILED and r.passed for r in results):
            reconciled[tf] = bars
        with clock("write bars"):
            path = store.aggregated_path(symbol, month_, tf)
            store.write(bars, path, FileIdentity(symbol, month_, "synthetic", tf.label))


# --------------------------------------------------------------------------- (b) the seed


AGG = {"open": "first", "high": "max", "low": "min", "close": "last", "volume": "sum"}


def seed_schema(label: str | None):  # -> pandera.DataFrameSchema
    """The seed's bar schema: what a pandas engineer checks with pandera."""
    import pandera.pandas as pa

    price = pa.Column(float, pa.Check.gt(0))
    on_grid = (
        []
        if label is None
        else [pa.Check(lambda i: (i == i.dt.floor(label)).all(), element_wise=False)]
    )
    return pa.DataFrameSchema(
        {
            "open": price,
            "high": price,
            "low": price,
            "close": price,
            "volume": pa.Column(int, pa.Check.ge(0)),
        },
        index=pa.Index(
            unique=True,
            checks=[
                # UTC timestamps, at whatever resolution read_csv parses (pandas 3)
                pa.Check(lambda i: str(i.dt.tz) == "UTC", element_wise=False),
                pa.Check(lambda i: i.is_monotonic_increasing, element_wise=False),
                *on_grid,
            ],
        ),
        checks=[
            pa.Check(lambda d: d["high"] >= d[["open", "close"]].max(axis=1)),
            pa.Check(lambda d: d["low"] <= d[["open", "close"]].min(axis=1)),
            pa.Check(lambda d: d["high"] >= d["low"]),
        ],
    )


def seed(dbn: Path, out: Path, clock: Clock) -> None:
    """The seed scripts' pipeline (CSV only), then their validation step."""
    import databento
    import pandas as pd

    warnings.simplefilter("ignore")
    with clock("to_df"):
        df = databento.DBNStore.from_file(dbn).to_df()
    raw_csv = out / "ES_2024_01_1s.csv"
    with clock("write raw CSV"):
        df.to_csv(raw_csv)
    del df
    with clock("read_csv"):
        data = pd.read_csv(raw_csv, index_col="ts_event", parse_dates=["ts_event"])
    for label in TIMEFRAMES:
        with clock("resample"):
            bars = data.resample(label, label="left", closed="left").agg(AGG).dropna()
        with clock("write bars CSV"):
            bars.to_csv(out / f"ES_2024_01_{label}.csv")
        del bars
    # The validation step: the raw frame, then each timeframe's file, reconciled with raw.
    with clock("validation"):
        seed_schema(None).validate(data)
        for label in TIMEFRAMES:
            path = out / f"ES_2024_01_{label}.csv"
            stored = pd.read_csv(path, index_col="ts_event", parse_dates=["ts_event"])
            seed_schema(label).validate(stored)
            expected = data.resample(label, label="left", closed="left").agg(AGG).dropna()
            pd.testing.assert_frame_equal(
                stored, expected, check_freq=False, check_index_type=False
            )


# --------------------------------------------------------------------------- (c) Dagster


def through_dagster(dbn: Path, out: Path, handoff: bool) -> dict[str, float]:
    """One partition through ``dagster asset materialize`` in a subprocess: its wall time and
    peak RSS (this wrapper's only child, so ``RUSAGE_CHILDREN`` is that process's)."""
    from dagster import DagsterInstance

    home = out / "dagster_home"
    home.mkdir()
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "DBENTO_SOURCE": "dbn",
        "DBENTO_DBN_DIR": str(dbn.parent),
        "DBENTO_DATA_DIR": str(out / "data"),
        "DBENTO_HANDOFF": "true" if handoff else "false",
    }
    os.environ["DAGSTER_HOME"] = str(home)
    DagsterInstance.get().dispose()  # the fresh instance exists before the clock starts
    dagster = shutil.which("dagster") or str(Path(sys.executable).parent / "dagster")
    cmd = [dagster, "asset", "materialize", "-m", "dbento_assets.definitions"]
    cmd += ["--select", "*", "--partition", PARTITION]
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=out
    )
    # Its memory as the first step starts (the CLI, Dagster, the code location and the
    # instance loaded; no bar yet): what one partition's work adds to at the least.
    sampled = [0.0]
    sampler = threading.Thread(target=_sample_rss, args=(proc, sampled), daemon=True)
    sampler.start()
    before_work = 0.0
    assert proc.stderr is not None
    log = []
    for line in proc.stderr:
        log.append(line)
        if not before_work and "STEP_START" in line:
            before_work = sampled[0]
    proc.wait()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"dagster asset materialize failed:\n{''.join(log)[-3000:]}")
    if not before_work:
        raise SystemExit("dagster asset materialize logged no STEP_START: no floor to print")
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"seconds": wall, "peak_rss_mb": rss, "imports_mb": before_work}


def _sample_rss(proc: subprocess.Popen[str], last: list[float]) -> None:
    """Keep ``last[0]`` the process's resident memory, read every 5 ms while it runs."""
    while proc.poll() is None:
        last[0] = rss_mb(proc.pid) or last[0]
        time.sleep(0.005)


# --------------------------------------------------------------------------- processes


def child(kind: str, dbn: Path, out: Path) -> None:
    """Run one piece in this fresh process; print its seconds, stages and peak RSS as JSON."""
    if kind.startswith("dagster"):
        print(json.dumps(through_dagster(dbn, out, handoff=kind == "dagster")))
        return
    if kind != "seed":
        # A process running this project's pipeline (a Dagster run worker, a CLI) imports
        # the package before pandas or pyarrow, which sets its allocator choice.
        import dbento_assets
        from dbento_assets.core.storage import share_system_allocator

        share_system_allocator()  # as the IO manager does when a run starts
    # Import what the piece uses before the clock starts: start-up is not the pipeline.
    import pandas  # noqa: F401
    import pyarrow.csv
    import pyarrow.parquet  # noqa: F401

    if kind == "seed":
        import databento  # noqa: F401  (the seed decodes with the client; we do not)
        import pandera.pandas  # noqa: F401
    else:
        import dbento_assets.core.aggregate
        import dbento_assets.core.dbn
        import dbento_assets.core.run_rules
        import dbento_assets.core.storage  # noqa: F401

    clock = Clock()
    floor: dict[str, float] = {"imports_mb": rss_mb()}
    if kind == "ours":
        raw = step_raw(dbn, out, clock)
        floor["raw_frame_mb"] = float(raw.memory_usage(deep=True).sum()) / 2**20
        step_bars(out, clock, raw=raw)
        del raw
    elif kind == "raw":
        step_raw(dbn, out, clock)
    elif kind == "bars":
        step_bars(out, clock)
    elif kind == "seed":
        seed(dbn, out, clock)
    seconds = sum(clock.stages.values())
    peak = peak_rss_mb()
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak, "stages": clock.stages, **floor}))


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM belongs to the process image, so unlike
    ``ru_maxrss`` it does not inherit the parent's high-water mark across fork and exec."""
    return _status_mb("self", "VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb(pid: int | str = "self") -> float:
    """A process's resident memory now (0 where /proc is missing)."""
    return _status_mb(pid, "VmRSS")


def _status_mb(pid: int | str, field: str) -> float:
    status = Path(f"/proc/{pid}/status")
    with contextlib.suppress(OSError):
        for line in status.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    return 0.0


def as_installed(folder: Path) -> dict[str, str]:
    """The environment of a process as the README's install makes it: without the test-only
    package hypothesis, which pandera imports on its first validation when it is there (about
    0.13 s in each process). A stand-in that fails to import, first on the path, hides it
    from the child and from every process it starts."""
    shim = folder / "as_installed" / "hypothesis"
    shim.mkdir(parents=True, exist_ok=True)
    (shim / "__init__.py").write_text('raise ImportError("hypothesis: a test-only dependency")\n')
    path = os.pathsep.join(filter(None, [str(shim.parent), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


def run_child(kind: str, dbn: Path, out: Path, env: dict[str, str] | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--dbn", str(dbn), "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(kinds: list[str], dbn: Path, repeat: int, env: dict[str, str] | None) -> dict:
    """Run ``kinds`` in sequence, each in a fresh process; best total of ``repeat`` tries."""
    best: dict | None = None
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as out:
            runs = [run_child(kind, dbn, Path(out), env) for kind in kinds]
        stages: Stages = {}
        for r in runs:
            for name, seconds in r.get("stages", {}).items():
                stages[name] = stages.get(name, 0.0) + seconds
        total = {
            "seconds": sum(r["seconds"] for r in runs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "stages": stages,
            **{k: max(r.get(k, 0.0) for r in runs) for k in ("imports_mb", "raw_frame_mb")},
        }
        if best is None or total["seconds"] < best["seconds"]:
            best = total
    assert best is not None
    return best


def floor_text(run: dict, ref: dict, before: str) -> str:
    """The least peak a whole-month design can have: the memory before any work plus the raw
    month's frame alone (no file buffer, no rule or aggregation temporary)."""
    least = run["imports_mb"] + run["raw_frame_mb"]
    return (
        f"  floor: {before} {run['imports_mb']:.0f} MB + the raw month's frame "
        f"{run['raw_frame_mb']:.0f} MB = {least:.0f} MB = {least / ref['peak_rss_mb']:.2f} of the "
        "seed's peak"
    )


def stage_text(stages: Stages) -> str:
    return ", ".join(f"{name} {seconds:.3f}" for name, seconds in stages.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child")
    parser.add_argument("--dbn", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--repeat", type=int, default=1, help="best of N runs per pipeline")
    parser.add_argument(
        "--rows", type=int, default=TARGET_ROWS, help="one-second bars in the month (~)"
    )
    parser.add_argument(
        "--with-test-extras",
        action="store_true",
        help="measure with the test extras importable (hypothesis), as in a development venv",
    )
    args = parser.parse_args()
    if args.child:
        child(args.child, args.dbn, args.out)
        return
    with tempfile.TemporaryDirectory() as tmp:
        dbn, rows = make_month_file(Path(tmp) / "dbn", args.rows)
        print(f"month: ES 2024-01, {rows:,} one-second bars, DBN {dbn.stat().st_size:,} bytes")
        env = None if args.with_test_extras else as_installed(Path(tmp))
        print(
            "every process: "
            + ("with the test extras" if env is None else "as installed (no hypothesis)")
        )
        ref = measure(["seed"], dbn, args.repeat, env)
        print(
            "reference, the seed pipeline with its validation rules (to_df -> CSV -> read_csv "
            "-> resample -> CSV; pandera schemas + resample reconciliation): "
            f"{ref['seconds']:.2f} s, peak RSS "
            f"{ref['peak_rss_mb']:.0f} MB\n  stages (s): {stage_text(ref['stages'])}"
        )
        variants = {
            "whole partition, rules included, one process (in-process executor)": ["ours"],
            "whole partition, rules included, a process per step (files only)": ["raw", "bars"],
        }
        frame = 0.0
        for name, kinds in variants.items():
            ours = measure(kinds, dbn, args.repeat, env)
            frame = frame or ours["raw_frame_mb"]
            print(
                f"dbento_assets [parquet], {name}: {ours['seconds']:.3f} s -> "
                f"{ref['seconds'] / ours['seconds']:.1f}x faster than the seed; peak RSS "
                f"{ours['peak_rss_mb']:.0f} MB = {ours['peak_rss_mb'] / ref['peak_rss_mb']:.2f}"
                f" of the seed's\n  stages (s): {stage_text(ours['stages'])}"
            )
            if ours["raw_frame_mb"]:
                print(floor_text(ours, ref, "the imports"))
        for kind, name in [("dagster", "with"), ("dagster-files", "without")]:
            run = measure([kind], dbn, args.repeat, env)
            print(
                f"dagster asset materialize, one partition, {name} the in-memory hand-off: "
                f"wall {run['seconds']:.2f} s = {run['seconds'] / ref['seconds']:.2f} of the "
                f"seed's time; peak RSS {run['peak_rss_mb']:.0f} MB = "
                f"{run['peak_rss_mb'] / ref['peak_rss_mb']:.2f} of the seed's"
            )
            before = "the process as its first step starts"
            print(floor_text({**run, "raw_frame_mb": frame}, ref, before))


if __name__ == "__main__":
    main()
