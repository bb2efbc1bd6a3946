"""Benchmark one month: this project's pipeline against the seed scripts' pandas pipeline.

It builds a realistic ~1.2M-row ES month of 1-second bars as a DBN file (the demo generator),
then times, each in its own fresh process and in the same run:

(a) this project's month pipeline, as the assets run it: decode the DBN, write the raw file,
    then per timeframe (15s, 30s, 1min) read the raw file back, aggregate and write the file;
    plus, separately, all validation rules on the month (raw and every timeframe);
(b) the reference, the seed scripts' pipeline: ``DBNStore.to_df()``, raw CSV, ``read_csv``,
    ``resample(label='left', closed='left').agg(...).dropna()`` per timeframe, CSV files.

It prints both times, the ratio, and each one's peak RSS, for Parquet and for CSV mode.
Run: ``python benchmarks/bench_month.py`` (add ``--repeat 3`` for the best of three).
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

TIMEFRAMES = ("15s", "30s", "1min")
TARGET_ROWS = 1_200_000


def make_month_file(folder: Path) -> tuple[Path, int]:
    """Write a ~1.2M-row demo ES month (January 2024) as DBN; return its path and rows."""
    from dbento_assets.core.catalog import load_catalog
    from dbento_assets.core.dbn import encode_ohlcv_1s
    from dbento_assets.core.demo import generate_month_records
    from dbento_assets.core.months import Month

    instrument = load_catalog().instrument("ES")
    month = Month(2024, 1)
    activity = 1.0
    for _ in range(6):  # scale the trade probability until the month has ~1.2M bars
        records = generate_month_records(instrument, month, activity=activity)
        if abs(len(records) - TARGET_ROWS) < 0.03 * TARGET_ROWS:
            break
        activity *= TARGET_ROWS / max(len(records), 1)
    path = folder / "ES_2024_01.ohlcv-1s.dbn.zst"
    path.write_bytes(
        encode_ohlcv_1s(
            records,
            dataset=instrument.dataset,
            symbols=[instrument.request_symbol],
            stype_in=instrument.stype_in,
            start_ns=month.start_ns,
            end_ns=month.end_ns,
        )
    )
    return path, len(records)


def run_ours(dbn: Path, out: Path, fmt: str) -> None:
    """Decode, raw file, then per timeframe: read raw, aggregate, write (as the assets do)."""
    from dbento_assets.core.aggregate import aggregate_bars
    from dbento_assets.core.dbn import decode_month
    from dbento_assets.core.months import Month
    from dbento_assets.core.storage import BarStore
    from dbento_assets.core.timeframes import parse_timeframe

    month = Month(2024, 1)
    store = BarStore.at(out, fmt)
    raw = decode_month([dbn], "ES", month).bars
    raw_path = store.raw_path("ES", month)
    store.write(raw, raw_path)
    for label in TIMEFRAMES:
        tf = parse_timeframe(label)
        store.write(
            aggregate_bars(store.read(raw_path), tf), store.aggregated_path("ES", month, tf)
        )


def run_checks(dbn: Path, out: Path, fmt: str) -> float:
    """All validation rules for the month (raw + each timeframe), on frames already built."""
    from dbento_assets.core import validation
    from dbento_assets.core.aggregate import aggregate_bars
    from dbento_assets.core.catalog import load_catalog
    from dbento_assets.core.dbn import decode_month
    from dbento_assets.core.months import Month
    from dbento_assets.core.timeframes import parse_timeframe

    month = Month(2024, 1)
    instrument = load_catalog().instrument("ES")
    raw = decode_month([dbn], "ES", month).bars
    aggs = {label: aggregate_bars(raw, parse_timeframe(label)) for label in TIMEFRAMES}
    start = time.perf_counter()
    validation.run_raw_rules(raw, month, instrument)
    for label, agg in aggs.items():
        validation.run_aggregated_rules(agg, raw, month, parse_timeframe(label), instrument)
    return time.perf_counter() - start  # only the rules, not the set-up


def run_reference(dbn: Path, out: Path, fmt: str) -> None:
    """The seed scripts' pipeline (``fmt`` is ignored: it only wrote CSV)."""
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


def child(kind: str, dbn: Path, fmt: str) -> None:
    """Run one pipeline in this (fresh) process and print its time and peak RSS as JSON."""
    runner = {"ours": run_ours, "reference": run_reference, "checks": run_checks}[kind]
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        measured = runner(dbn, Path(out), fmt)
        seconds = measured if measured is not None else time.perf_counter() - start
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_rss_mb": rss_mb}))


def measure(kind: str, dbn: Path, fmt: str, repeat: int) -> dict[str, float]:
    runs = []
    for _ in range(repeat):
        cmd = [sys.executable, __file__, "--child", kind, "--dbn", str(dbn), "--fmt", fmt]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return {
        "seconds": min(r["seconds"] for r in runs),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=["ours", "reference", "checks"])
    parser.add_argument("--dbn", type=Path)
    parser.add_argument("--fmt", default="parquet", choices=["parquet", "csv"])
    parser.add_argument("--repeat", type=int, default=1, help="best of N runs per pipeline")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.dbn, args.fmt)
        return
    with tempfile.TemporaryDirectory() as tmp:
        dbn, rows = make_month_file(Path(tmp))
        print(f"month: ES 2024-01, {rows:,} one-second bars, DBN {dbn.stat().st_size:,} bytes")
        reference = measure("reference", dbn, "csv", args.repeat)
        print(
            f"reference (to_df -> CSV -> read_csv -> resample -> CSV): "
            f"{reference['seconds']:.2f} s, peak RSS {reference['peak_rss_mb']:.0f} MB"
        )
        for fmt in ("parquet", "csv"):
            ours = measure("ours", dbn, fmt, args.repeat)
            print(
                f"dbento_assets [{fmt}]: {ours['seconds']:.3f} s, "
                f"peak RSS {ours['peak_rss_mb']:.0f} MB -> "
                f"{reference['seconds'] / ours['seconds']:.1f}x faster, "
                f"RSS {ours['peak_rss_mb'] / reference['peak_rss_mb']:.2f} of reference"
            )
        checks = measure("checks", dbn, "parquet", args.repeat)
        ours_parquet = measure("ours", dbn, "parquet", 1)
        print(
            f"all validation rules (raw + {len(TIMEFRAMES)} timeframes): "
            f"{checks['seconds']:.3f} s = {checks['seconds'] / ours_parquet['seconds']:.2f} of "
            "the parquet pipeline's aggregation and writing"
        )


if __name__ == "__main__":
    main()
