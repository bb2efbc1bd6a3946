"""A long build holds its memory flat: no bar frame outlives the run that made it.

The peak memory of a many-month build is measured by ``benchmarks/bench_memory.py``; these
tests pin down its causes without timing anything. Every frame the IO manager writes is
watched through a weak reference, and Python's automatic cyclic collection is switched off
while the build runs, so that what frees a frame is the code under test, not the moment the
collector happens to run: a frame still reachable after its run (held by the outputs Dagster
captured, in a reference cycle or in the step context it keeps of a process's first run, or
by the IO manager's raw-month handoff) fails the test.
"""

from __future__ import annotations

import gc
import io
import json
import os
import subprocess
import sys
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
from dagster import AssetSelection, DagsterInstance, instance_for_test, materialize

from dbento_assets import io_managers
from dbento_assets.core.months import Month
from dbento_assets.core.storage import BarStore
from dbento_assets.definitions import build_definitions
from dbento_assets.io_managers import BarFileIOManager
from dbento_assets.names import RAW_ASSET
from dbento_assets.resources import DatabentoResource
from dbento_assets_tests.test_backfill_cli import run

ROOT = Path(__file__).resolve().parents[1]
ACTIVITY = 0.02  # light synthetic months: the test is about references, not sizes


@contextmanager
def watching_writes() -> Iterator[list[weakref.ref[pd.DataFrame]]]:
    """Weak references to every frame written as a bar file while the block runs."""
    refs: list[weakref.ref[pd.DataFrame]] = []
    real_write = BarStore.write

    def watching_write(self: BarStore, frame: pd.DataFrame, *args: object, **kwargs: object) -> int:
        refs.append(weakref.ref(frame))
        return real_write(self, frame, *args, **kwargs)

    BarStore.write = watching_write  # type: ignore[method-assign]
    try:
        yield refs
    finally:
        BarStore.write = real_write  # type: ignore[method-assign]


@pytest.fixture
def written() -> Iterator[list[weakref.ref[pd.DataFrame]]]:
    with watching_writes() as refs:
        yield refs


@contextmanager
def no_automatic_collection() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def backfill_two_months(data_dir: str) -> dict[str, object]:
    """Build ES 2024-01..02 with the backfill command; how many frames it wrote, which live on."""
    resource = DatabentoResource(source="demo", data_dir=data_dir, demo_activity=ACTIVITY)
    defs = build_definitions(databento=resource)
    out = io.StringIO()
    with watching_writes() as written, instance_for_test() as instance, no_automatic_collection():
        argv = ["--symbol", "ES", "--start", "2024-01", "--end", "2024-02"]
        assert run(argv, out, defs=defs, instance=instance) == 0, out.getvalue()
        alive = [list(frame.shape) for ref in written if (frame := ref()) is not None]
    return {"written": len(written), "alive": alive}


def test_a_backfill_keeps_no_frame_of_a_finished_partition(tmp_path):
    # 2 partitions x (raw + 3 timeframes) were written, and none is still in memory.
    assert backfill_two_months(str(tmp_path / "data")) == {"written": 8, "alive": []}


def test_the_first_partition_of_a_fresh_process_is_not_kept_either(tmp_path):
    # Dagster keeps the step context of the first run of a PROCESS that loads an input and
    # records a check result, with all its outputs (see dbento_assets.backfill.warm_up).
    # In this test session some earlier test may already have been that run, so the same
    # build runs here in a fresh process, as `python -m dbento_assets.backfill` does.
    code = (
        "import json, sys\n"
        "from dbento_assets_tests.test_memory import backfill_two_months\n"
        "print(json.dumps(backfill_two_months(sys.argv[1])))\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "data")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"written": 8, "alive": []}


def test_a_raw_only_run_leaves_no_month_in_the_handoff(tmp_path, written):
    databento = DatabentoResource(source="demo", data_dir=str(tmp_path), demo_activity=ACTIVITY)
    resources = {"databento": databento, "io_manager": BarFileIOManager(databento=databento)}
    defs = build_definitions(databento=resources["databento"])
    assets = list(defs.assets or [])
    result = materialize(
        assets,
        selection=AssetSelection.assets(RAW_ASSET),
        partition_key="2024-01-01|ES",
        resources=resources,
        instance=DagsterInstance.ephemeral(),
    )
    assert result.success
    path = BarStore.at(str(tmp_path)).raw_path("ES", Month(2024, 1))
    assert path.exists() and len(written) == 1
    # The handoff is private; reading it is the direct way to see that the month the run
    # wrote for an aggregation that never came was let go when the run ended.
    assert io_managers._HANDOFF.take(path) is None
