"""Benchmark one month: this project's pipeline against the seed scripts' pandas pipeline.

It builds a realistic ~1.2M-row ES month of 1-second bars as a DBN file (the demo generator),
then times, in the same run and in separate processes:

(a) this project's month pipeline: ``raw_1s_bars`` decodes the DBN and writes the raw file,
    then the ``bars_<tf>`` step aggregates the month to 15s, 30s and 1min and writes their
    files. Once as the in-process executor (the default) runs it: one process, the raw month
    handed to the aggregation in memory; once as the multiprocess executor runs it: each step
    in its own process, the aggregation reading the raw file back (time: the sum of the
    steps; peak RSS: the larger step's);
(b) the reference, the seed scripts' pipeline: ``DBNStore.to_df()``, raw CSV, ``read_csv``,
    ``resample(label='left', closed='left').agg(...).dropna()`` per timeframe, CSV files;
(c) all validation rules on the month (raw and every timeframe), compared with (a).

Interpreter start-up and imports are outside every timing, for (a), (b) and (c) alike.
Run: ``python benchmarks/bench_month.py`` (``--repeat 3`` keeps the best of three).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported in the child processes only, after the package (see child)
    import pandas as pd

TIMEFRAMES = ("15s", "30s", "1min")
TARGET_ROWS = 1_200_000
SYMBOL = "ES"


def make_month_file(folder: Path, target_rows: int = TARGET_ROWS) -> tuple[Path, int]:
    """Write a demo ES month (January 2024) of about ``target_rows`` bars as DBN; return its
    path and its number of bars."""
    from dbento_assets.core.catalog import load_catalog
    from dbento_assets.core.dbn import encode_month
    from dbento_assets.core.demo import generate_month_records
    from dbento_assets.core.months import Month

    instrument = load_catalog().instrument(SYMBOL)
    month = Month(2024, 1)
    activity = 1.0
    for _ in range(6):  # scale the trade probability until the month has ~1.2M bars
        records = generate_month_records(instrument, month, activity=activity)
        if abs(len(records) - target_rows) < 0.03 * target_rows:
            break
        activity *= target_rows / max(len(records), 1)
    path = folder / "ES_2024_01.ohlcv-1s.dbn.zst"
    path.write_bytes(encode_month(records, instrument, month))
    return path, len(records)


def step_raw(dbn: Path, out: Path, fmt: str) -> pd.DataFrame:
    """What ``raw_1s_bars`` does: decode the month's DBN, write the raw file."""
    from dbento_assets.core.dbn import decode_month
    from dbento_assets.core.months import Month
    from dbento_assets.core.storage import BarStore

    month = Month(2024, 1)
    store = BarStore.at(out, fmt)
    raw = decode_month([dbn], SYMBOL, month).bars
    store.write(raw, store.raw_path(SYMBOL, month))
    return raw


def step_bars(out: Path, fmt: str, raw: pd.DataFrame | None = None) -> None:
    """What the ``bars_<tf>`` step does: read the raw file once (unless the raw step handed
    the month over in memory), aggregate, write each timeframe."""
    from dbento_assets.core.aggregate import aggregate_many
    from dbento_assets.core.months import Month
    from dbento_assets.core.storage import BarStore
    from dbento_assets.core.timeframes import parse_timeframe

    month = Month(2024, 1)
    store = BarStore.at(out, fmt)
    if raw is None:
        raw = store.read(store.raw_path(SYMBOL, month))
    aggregated = aggregate_many(raw, [parse_timeframe(label) for label in TIMEFRAMES])
    while aggregated:
        tf, bars = aggregated.popitem()
        store.write(bars, store.aggregated_path(SYMBOL, month, tf))
        del bars


def single_process(dbn: Path, out: Path, fmt: str) -> None:
    """The whole pipeline of (a) in one process, as the in-process executor (the default)
    runs it: the IO manager hands the raw month to the aggregation step in memory."""
    step_bars(out, fmt, raw=step_raw(dbn, out, fmt))


def checks(dbn: Path, out: Path, fmt: str) -> float:
    """All validation rules for the month (raw + each timeframe); times only the rules."""
    from dbento_assets.core.aggregate import aggregate_bars
    from dbento_assets.core.catalog import load_catalog
    from dbento_assets.core.dbn import decode_month
    from dbento_assets.core.months import Month
    from dbento_assets.core.run_rules import run_aggregated_rules, run_raw_rules
    from dbento_assets.core.timeframes import parse_timeframe

    month = Month(2024, 1)
    instrument = load_catalog().instrument(SYMBOL)
    raw = decode_month([dbn], SYMBOL, month).bars
    aggs = {label: aggregate_bars(raw, parse_timeframe(label)) for label in TIMEFRAMES}
    start = time.perf_counter()
    run_raw_rules(raw, month, instrument)
    for label, agg in aggs.items():
        run_aggregated_rules(agg, raw, month, parse_timeframe(label), instrument)
    return time.perf_counter() - start


def reference(dbn: Path, out: Path, fmt: str) -> None:
    """The seed scripts' pipeline (it only wrote CSV, so ``fmt`` is ignored)."""
    import databento
    import pandas as pd

    warnings.simplefilter("ignore")
    df = databento.DBNStore.from_file(dbn).to_df()
    raw_csv = out / "ES_2024_01_1s.csv"
    df.to_csv(raw_csv)
    data = pd.read_csv(raw_csv, index_col="ts_event", parse_dates=["ts_event"])
    agg = {"open": "first", "high": "max", "low": "min", "close": "last", "volume": "sum"}
    for label in TIMEFRAMES:
        bars = data.resample(label, label="left", closed="left").agg(agg).dropna()
        bars.to_csv(out / f"ES_2024_01_{label}.csv")


def child(kind: str, dbn: Path, out: Path, fmt: str) -> None:
    """Run one piece in this fresh process; print its seconds and peak RSS as JSON."""
    if kind != "reference":
        # A process running this project's pipeline (a Dagster run worker, a CLI) imports
        # the package before pandas or pyarrow, which sets its allocator choice.
        import dbento_assets
    # Import what any piece uses before the clock starts: start-up is not the pipeline.
    import databento  # noqa: F401
    import pandas  # noqa: F401
    import pyarrow.csv
    import pyarrow.parquet  # noqa: F401

    if kind != "reference":
        import dbento_assets.core.aggregate
        import dbento_assets.core.dbn
        import dbento_assets.core.storage
    if kind == "checks":
        import dbento_assets.core.run_rules  # noqa: F401

    start = time.perf_counter()
    if kind == "raw":
        step_raw(dbn, out, fmt)
    elif kind == "bars":
        step_bars(out, fmt)
    elif kind == "single":
        single_process(dbn, out, fmt)
    elif kind == "reference":
        reference(dbn, out, fmt)
    seconds = checks(dbn, out, fmt) if kind == "checks" else time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_rss_mb()}))


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM belongs to the process image, so unlike
    ``ru_maxrss`` it does not inherit the parent's high-water mark across fork and exec."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(kind: str, dbn: Path, out: Path, fmt: str) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", kind, "--dbn", str(dbn), "--out", str(out)]
    done = subprocess.run([*cmd, "--fmt", fmt], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(kinds: list[str], dbn: Path, fmt: str, repeat: int) -> dict[str, float]:
    """Run ``kinds`` in sequence, each in a fresh process; best total of ``repeat`` tries."""
    best: dict[str, float] | None = None
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as out:
            runs = [run_child(kind, dbn, Path(out), fmt) for kind in kinds]
        total = {
            "seconds": sum(r["seconds"] for r in runs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        }
        if best is None or total["seconds"] < best["seconds"]:
            best = total
    assert best is not None
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child")
    parser.add_argument("--dbn", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--fmt", default="parquet", choices=["parquet", "csv"])
    parser.add_argument("--repeat", type=int, default=1, help="best of N runs per pipeline")
    parser.add_argument(
        "--rows", type=int, default=TARGET_ROWS, help="one-second bars in the month (~)"
    )
    args = parser.parse_args()
    if args.child:
        child(args.child, args.dbn, args.out, args.fmt)
        return
    variants = {
        "in-process executor (default), one process": ["single"],
        "multiprocess executor, one process per step": ["raw", "bars"],
    }
    with tempfile.TemporaryDirectory() as tmp:
        dbn, rows = make_month_file(Path(tmp), args.rows)
        print(f"month: ES 2024-01, {rows:,} one-second bars, DBN {dbn.stat().st_size:,} bytes")
        ref = measure(["reference"], dbn, "csv", args.repeat)
        print(
            "reference (to_df -> CSV -> read_csv -> resample -> CSV): "
            f"{ref['seconds']:.2f} s, peak RSS {ref['peak_rss_mb']:.0f} MB"
        )
        default_parquet = 0.0
        for fmt in ("parquet", "csv"):
            for name, kinds in variants.items():
                ours = measure(kinds, dbn, fmt, args.repeat)
                default_parquet = default_parquet or ours["seconds"]
                print(
                    f"dbento_assets [{fmt}], {name}: {ours['seconds']:.3f} s -> "
                    f"{ref['seconds'] / ours['seconds']:.1f}x faster; peak RSS "
                    f"{ours['peak_rss_mb']:.0f} MB = {ours['peak_rss_mb'] / ref['peak_rss_mb']:.2f}"
                    " of the reference"
                )
        rules = measure(["checks"], dbn, "parquet", args.repeat)
        print(
            f"all validation rules (raw + {len(TIMEFRAMES)} timeframes): "
            f"{rules['seconds']:.3f} s = {rules['seconds'] / default_parquet:.2f} of the "
            "default Parquet pipeline's time"
        )


if __name__ == "__main__":
    main()
