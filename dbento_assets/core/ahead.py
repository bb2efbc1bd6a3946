"""Work on a bar frame begun in a background thread, taken later by the code that needs it.

:func:`begin` prepares a piece of work on a frame in the caller's thread and runs it in the one
worker thread while the caller goes on (on a machine with two cores, pandas' and Arrow's heavy
loops run beside the caller's); :func:`take` hands the work's future to whoever later needs that
work on that very frame. The preparation reads a shallow copy of the frame, kept until the work
is taken, so a column the caller then changes in place is copied by pandas (copy on write)
instead of changing under the work; :func:`take` compares where each column lies in memory and
gives None for a frame changed since, so the caller computes afresh. The work gets arrays, not
the caller's pandas objects (pandas is not thread-safe). A frame dropped lets its work go.
Not seen: a value written into a column's memory behind pandas' back (through
``Series.array``, or into an array the frame was built on without a copy); nothing here
writes bars that way.
"""

from __future__ import annotations

import functools
import os
import threading
import weakref
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import pandas as pd
import pyarrow as pa

_T = TypeVar("_T")
_P = TypeVar("_P")
_Key = tuple[int, Hashable]  # id() of the frame, kind of work


class _Begun:
    """One piece of work begun on a frame."""

    def __init__(
        self, frame: pd.DataFrame, snapshot: pd.DataFrame, key: _Key, future: Future[Any]
    ) -> None:
        self.snapshot = snapshot  # kept until taken: what makes pandas copy on write
        self.columns = column_addresses(frame)
        # Weak: the work must not keep alive a frame that nobody will use.
        self.frame = weakref.ref(frame, functools.partial(_forget, key))
        self.future = future


def begin(
    frame: pd.DataFrame,
    kind: Hashable,
    prepare: Callable[[pd.DataFrame], _P],
    work: Callable[[_P], _T],
) -> None:
    """Start ``work(prepare(frame))`` in the worker thread, ``prepare`` run here (what
    ``prepare`` raises, this raises); :func:`take` with the same ``kind`` gets it. Nothing is
    started while the interpreter shuts down (the taker then finds None)."""
    key = (id(frame), kind)
    snapshot = frame.copy(deep=False)  # shares the columns; see the module
    prepared = prepare(snapshot)
    try:
        future = _WORKER.submit(work, prepared)
    except RuntimeError:  # the interpreter is shutting down
        return
    begun = _Begun(frame, snapshot, key, future)
    with _LOCK:
        _BEGUN[key] = begun


def take(frame: pd.DataFrame, kind: Hashable) -> Future[Any] | None:
    """The work of ``kind`` begun on this very frame, unchanged since (taken: it serves one
    caller); None when there is none."""
    with _LOCK:
        found = _BEGUN.pop((id(frame), kind), None)
    if found is None or found.frame() is not frame:
        return None
    if column_addresses(frame) != found.columns:
        found.future.cancel()  # not begun yet: the worker skips it
        return None
    return found.future


def column_addresses(frame: pd.DataFrame) -> tuple[object, ...]:
    """Where a frame's columns lie in memory: a column replaced, or copied on write, moves.
    A column of a kind not known here counts as moved (its work is then done again)."""
    if not frame.columns.is_unique:
        return (object(),)
    found: list[object] = [len(frame), tuple(frame.columns), tuple(map(str, frame.dtypes))]
    for name in frame.columns:
        column = frame[name]
        dtype = column.dtype
        if isinstance(dtype, pd.DatetimeTZDtype):
            found.append(column.array.asi8.__array_interface__["data"][0])
        elif isinstance(dtype, pd.ArrowDtype) or (
            isinstance(dtype, pd.StringDtype) and dtype.storage == "pyarrow"
        ):
            array = pa.array(column)  # pandas hands over its Arrow data as it is
            chunks = array.chunks if isinstance(array, pa.ChunkedArray) else [array]
            found += [b.address for chunk in chunks for b in chunk.buffers() if b is not None]
        elif isinstance(dtype, pd.api.extensions.ExtensionDtype):
            # Equal to nothing else: no work is trusted on it (Python-stored strings, say,
            # which pyarrow copies into buffers freed at once, so addresses can repeat).
            found.append(object())
        else:
            found.append(column.to_numpy().__array_interface__["data"][0])
    return tuple(found)


def _forget(key: _Key, ref: weakref.ref[pd.DataFrame]) -> None:
    """Drop the work on a frame that is gone (``ref`` its weak reference)."""
    with _LOCK:
        if (found := _BEGUN.get(key)) is not None and found.frame is ref:
            del _BEGUN[key]
            found.future.cancel()  # not begun yet: the worker skips it


def _start() -> None:
    """A fresh worker and registry: at import, and in a child forked from a process that
    had them (the child has no worker thread, only a copy of the parent's records)."""
    global _LOCK, _WORKER, _BEGUN
    # Re-entrant: a frame's last reference may go (and _forget run) while it is held.
    _LOCK = threading.RLock()
    _WORKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dbento-ahead")
    _BEGUN = {}  # by id() of the frame (each entry checks it is that frame) and kind


_LOCK: threading.RLock
_WORKER: ThreadPoolExecutor
_BEGUN: dict[_Key, _Begun]
_start()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_start)
