"""A long build holds its memory flat: no bar frame outlives the run that made it.

The peak memory of a many-month build is measured by ``benchmarks/bench_memory.py``; these
tests pin down its causes without timing anything. Every frame the IO manager writes is
watched through a weak reference, and Python's automatic cyclic collection is switched off
while the build runs, so that what frees a frame is the code under test, not the moment the
collector happens to run: a frame still reachable after its run (held by Dagster's captured
outputs, a reference cycle, or the IO manager's raw-month handoff) fails the test.
"""

from __future__ import annotations

import gc
import io
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import pandas as pd
import pytest
from dagster import (
    AssetKey,
    AssetSelection,
    DagsterInstance,
    DagsterInvariantViolationError,
    ExecuteInProcessResult,
    JobDefinition,
    instance_for_test,
    materialize,
)

from dbento_assets import io_managers
from dbento_assets.backfill import run
from dbento_assets.core.months import Month
from dbento_assets.core.storage import BarStore
from dbento_assets.definitions import build_definitions
from dbento_assets.io_managers import RAW_ASSET, BarFileIOManager
from dbento_assets.resources import DatabentoResource

ACTIVITY = 0.02  # light synthetic months: the test is about references, not sizes


@pytest.fixture
def written(monkeypatch: pytest.MonkeyPatch) -> list[weakref.ref[pd.DataFrame]]:
    """Weak references to every frame written as a bar file while the test runs."""
    refs: list[weakref.ref[pd.DataFrame]] = []
    real_write = BarStore.write

    def watching_write(self: BarStore, frame: pd.DataFrame, path: object) -> int:
        refs.append(weakref.ref(frame))
        return real_write(self, frame, path)

    monkeypatch.setattr(BarStore, "write", watching_write)
    return refs


@contextmanager
def no_automatic_collection() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def test_a_backfill_keeps_no_frame_of_a_finished_partition(tmp_path, written):
    resource = DatabentoResource(
        source="demo", data_dir=str(tmp_path / "data"), demo_activity=ACTIVITY
    )
    defs = build_definitions(databento=resource)
    out = io.StringIO()
    with instance_for_test() as instance, no_automatic_collection():
        argv = ["--symbol", "ES", "--start", "2024-01", "--end", "2024-02"]
        assert run(argv, out, defs=defs, instance=instance) == 0, out.getvalue()
        alive = [frame.shape for ref in written if (frame := ref()) is not None]
    # 2 partitions x (raw + 3 timeframes) were written, and none is still in memory.
    assert len(written) == 8
    assert alive == []


def test_a_backfill_empties_the_outputs_dagster_captured(tmp_path, monkeypatch):
    # Order-independent half of the test above: once a process has built Dagster's records,
    # the reference cycles alone would hold the frames, and collecting them would hide a
    # Dagster release where emptying the captured outputs no longer works. Here the result
    # of every run is kept, and must hold no output value any more.
    results: list[ExecuteInProcessResult] = []
    real_execute = JobDefinition.execute_in_process

    def keeping_execute(self: JobDefinition, *args: object, **kwargs: object):
        result = real_execute(self, *args, **kwargs)
        results.append(result)
        return result

    monkeypatch.setattr(JobDefinition, "execute_in_process", keeping_execute)
    resource = DatabentoResource(
        source="demo", data_dir=str(tmp_path / "data"), demo_activity=ACTIVITY
    )
    defs = build_definitions(databento=resource)
    out = io.StringIO()
    with instance_for_test() as instance:
        argv = ["--symbol", "ES", "--start", "2024-01", "--select", RAW_ASSET]
        assert run(argv, out, defs=defs, instance=instance) == 0, out.getvalue()
    assert len(results) == 1 and results[0].success
    with pytest.raises(DagsterInvariantViolationError):
        results[0].asset_value(AssetKey(RAW_ASSET))


def test_a_raw_only_run_leaves_no_month_in_the_handoff(tmp_path, written):
    resources = {
        "databento": DatabentoResource(
            source="demo", data_dir=str(tmp_path), demo_activity=ACTIVITY
        ),
        "io_manager": BarFileIOManager(data_dir=str(tmp_path), source="demo"),
    }
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
