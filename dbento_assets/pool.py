"""The download pool's limit, kept on this machine as well as by Dagster.

Dagster lets a step of the ``databento`` pool start once it has claimed one of the pool's
slots, but on its SQLite storage two processes claiming at the same moment can both take the
last free slot (a read, then a write, without a lock between them), and two downloads then
run where the limit allows one. A step of the pool therefore also holds one of ``limit``
lock files under the instance's folder; the kernel drops a lock when its process dies.
"""

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from dagster import DagsterInstance
from filelock import FileLock, Timeout

WAIT_SECONDS = 0.2  # between two tries for a free lock


def pool_limit(instance: DagsterInstance, pool: str) -> int:
    """The pool's number of slots; 0 when the instance keeps no limit."""
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return 0
    info = storage.get_concurrency_info(pool)
    return info.slot_count or info.limit or 0


def slot_lock(instance: DagsterInstance, pool: str, slot: int) -> FileLock:
    """The lock file of the pool's ``slot``-th slot on this machine (its folder is made when
    it is first acquired)."""
    path = Path(instance.root_directory) / ".dbento-pools" / f"{pool}-{slot}.lock"
    # No marker-file fallback where the filesystem has no flock: a marker outlives a killed
    # process and would hold the slot for ever (the OSError leaves the limit to Dagster).
    # Writable by every account sharing the instance.
    return FileLock(path, mode=0o666, thread_local=False, fallback_to_soft=False)


@contextmanager
def machine_slot(
    instance: DagsterInstance, pool: str, log: Callable[[str], None]
) -> Iterator[None]:
    """Hold one of the pool's slots on this machine for the block (at once, as a rule)."""
    said = False
    while True:
        limit = pool_limit(instance, pool)  # read again: a limit may change meanwhile
        if not limit:
            yield
            return
        for slot in range(limit):
            lock: FileLock | None = slot_lock(instance, pool, slot)
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue
            except OSError as exc:  # a read-only DAGSTER_HOME (one mounted from a config map)
                log(f"the {pool} pool's limit is left to Dagster alone: {exc}")
                lock = None
            try:
                yield
            finally:
                if lock is not None:
                    lock.release()
            return
        if not said:
            log(
                f"waiting for a slot of the {pool} pool: its {limit} slot(s) are held by other "
                "steps on this machine (Dagster let this one start at the same moment)"
            )
            said = True
        time.sleep(WAIT_SECONDS)
