"""Peak memory of a range of months built in ONE process: 1, 6 and 12 months side by side.

Each measurement is a fresh child process running ``python -m dbento_assets.backfill --symbol
ES --start 2024-01 --end 2024-NN`` (every asset, one run per partition, a temporary instance
and a fresh data folder); its peak resident memory is the child's ``ru_maxrss`` as the kernel
reports it to the parent (``os.wait4``), so nothing samples or misses a short peak. It runs on
two sources: ``demo`` (synthetic months, generated in the process) and ``dbn`` (a folder of
DBN files, one per month, written beforehand from the demo generator, so the months are the
same). For each source it prints the peak of each range and the ratio 12 months / 1 month;
the target is a ratio of at most 1.15 (memory flat along a long build).

Run: ``python benchmarks/bench_memory.py`` (from the repository root; about five minutes).
Options: ``--months 1,6,12``, ``--sources demo,dbn``, ``--symbol ES``, ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dbento_assets.core.catalog import load_catalog  # noqa: E402
from dbento_assets.core.demo import DemoSource  # noqa: E402
from dbento_assets.core.months import Month, month_range  # noqa: E402
from dbento_assets.core.source import FetchRequest  # noqa: E402

TARGET = 1.15
START = Month(2024, 1)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--months", default="1,6,12", help="comma-separated range lengths")
    parser.add_argument("--sources", default="demo,dbn")
    parser.add_argument("--symbol", default="ES")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    return parser.parse_args()


def last_month(months: int) -> Month:
    return month_range(START, Month(START.year + 10, 1))[months - 1]


def write_dbn_folder(folder: Path, symbol: str, months: int) -> None:
    """One DBN file per month, the demo generator's bytes (what ``DBENTO_SOURCE=demo`` decodes)."""
    folder.mkdir(parents=True, exist_ok=True)
    instrument = load_catalog().instrument(symbol)
    source = DemoSource()
    for month in month_range(START, last_month(months)):
        fetched = source.fetch(FetchRequest(instrument, month), lambda _msg: None)
        for i, payload in enumerate(fetched.payloads):
            data = payload if isinstance(payload, bytes) else Path(payload).read_bytes()
            (folder / f"{symbol}_{month.tag}_{i}.dbn").write_bytes(data)


def peak_of_build(source: str, symbol: str, months: int, work: Path, dbn_dir: Path) -> dict:
    """Build ``months`` months in one child process; its peak RSS in MB and wall time."""
    data = Path(tempfile.mkdtemp(prefix=f"data-{source}-{months}-", dir=work))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "DBENTO_SOURCE": source,
        "DBENTO_DATA_DIR": str(data),
        "DBENTO_DBN_DIR": str(dbn_dir),
        "DBENTO_RANGE_WORKERS": "1",  # the whole range in this one process
    }
    env.pop("DAGSTER_HOME", None)  # a temporary instance per build: nothing carried over
    end = last_month(months)
    argv = [sys.executable, "-m", "dbento_assets.backfill", "--symbol", symbol]
    argv += ["--start", str(START), "--end", str(end)]
    started = time.monotonic()
    child = subprocess.Popen(
        argv, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    # wait4 reports the child's own peak (ru_maxrss, in KiB on Linux) as it exits.
    out = child.stdout.read() if child.stdout else ""
    err = child.stderr.read() if child.stderr else ""
    _pid, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"{source} {months} month(s) failed ({child.returncode}):\n{out}\n{err}")
    return {
        "source": source,
        "months": months,
        "peak_mb": round(usage.ru_maxrss / 1024),
        "seconds": round(time.monotonic() - started, 1),
    }


def main() -> None:
    args = parse_args()
    lengths = [int(m) for m in args.months.split(",")]
    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        work = Path(tmp)
        dbn_dir = work / "dbn-files"
        if "dbn" in sources:
            write_dbn_folder(dbn_dir, args.symbol, max(lengths))
        for source in sources:
            for months in lengths:
                rows.append(peak_of_build(source, args.symbol, months, work, dbn_dir))
                if not args.json:
                    peak, seconds = rows[-1]["peak_mb"], rows[-1]["seconds"]
                    print(f"  {source:<5} {months:>2} month(s): peak {peak} MB ({seconds} s)")
    ratios = {}
    for source in sources:
        peaks = {r["months"]: r["peak_mb"] for r in rows if r["source"] == source}
        ratios[source] = round(peaks[max(lengths)] / peaks[min(lengths)], 3)
    if args.json:
        print(json.dumps({"rows": rows, "ratios": ratios, "target": TARGET}))
        return
    header = "source | " + " | ".join(f"{m} month(s)" for m in lengths)
    print(f"\nPeak RSS of one process building {args.symbol} from {START}:")
    print(f"{header} | ratio {max(lengths)}/{min(lengths)}")
    for source in sources:
        peaks = {r["months"]: r["peak_mb"] for r in rows if r["source"] == source}
        cells = " | ".join(f"{peaks[m]} MB" for m in lengths)
        verdict = "ok" if ratios[source] <= TARGET else f"ABOVE target {TARGET}"
        print(f"{source} | {cells} | {ratios[source]:.2f} ({verdict})")


if __name__ == "__main__":
    main()
