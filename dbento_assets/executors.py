"""Which Dagster executor runs the steps of a run, chosen with ``DBENTO_EXECUTOR``.

The code location is the same everywhere; only the executor changes. Unset (the default)
means ``in_process``: every step runs in the run's own process. A run here is one partition
with two chained steps (download, then aggregate), so a process per step buys no parallelism
and costs a Python and Dagster start-up per step, which more than doubled the wall time of a
24-partition backfill (benchmarks/bench_backfill.py); it also lets the aggregation step take
the raw month from memory instead of reading the file back. ``multiprocess`` (Dagster's own
default) runs each step in a subprocess of the run. ``celery`` sends each step to a Celery
worker through a broker (dagster-celery), and ``k8s`` starts each step as a Kubernetes Job
(dagster-k8s); both need the ``deploy`` extra (``pip install 'dbento_assets[deploy]'``) and an
instance whose storage every machine reaches (Postgres, dagster-postgres), see
``deploy/k8s_celery.md``. For Celery the broker and the result backend come from
``DBENTO_CELERY_BROKER`` (default: RabbitMQ on ``DAGSTER_CELERY_BROKER_HOST`` or localhost)
and ``DBENTO_CELERY_BACKEND`` (default ``rpc://``); the workers must be started with the same
two URLs. Kubernetes settings (image, namespace, secrets) come from the ``K8sRunLauncher`` of
the Dagster Helm chart, or from run config.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from dagster import ExecutorDefinition, in_process_executor, multiprocess_executor

EXECUTOR_VARIABLE = "DBENTO_EXECUTOR"
EXECUTORS = ("multiprocess", "in_process", "celery", "k8s")
CELERY_BROKER_VARIABLE = "DBENTO_CELERY_BROKER"
CELERY_BACKEND_VARIABLE = "DBENTO_CELERY_BACKEND"
DEPLOY_EXTRA_HINT = "install it with: pip install 'dbento_assets[deploy]'"


class ExecutorChoiceError(ValueError):
    """``DBENTO_EXECUTOR`` names no executor, or one whose package is not installed."""


def executor_from_env(environ: Mapping[str, str] | None = None) -> ExecutorDefinition:
    """The executor ``DBENTO_EXECUTOR`` asks for; ``in_process`` when unset."""
    env = os.environ if environ is None else environ
    name = env.get(EXECUTOR_VARIABLE, "").strip().lower().replace("-", "_") or "in_process"
    if name == "multiprocess":
        return multiprocess_executor
    if name == "in_process":
        return in_process_executor
    if name == "celery":
        return _celery_executor(env)
    if name == "k8s":
        return _k8s_executor()
    raise ExecutorChoiceError(
        f"{EXECUTOR_VARIABLE}={env.get(EXECUTOR_VARIABLE)!r} is not one of "
        f"{', '.join(EXECUTORS)} (or leave it unset for in_process)"
    )


def _celery_executor(env: Mapping[str, str]) -> ExecutorDefinition:
    try:
        from dagster_celery import celery_executor
    except ImportError:
        raise ExecutorChoiceError(
            f"{EXECUTOR_VARIABLE}=celery needs the dagster-celery package; {DEPLOY_EXTRA_HINT}"
        ) from None
    config: dict[str, object] = {}
    broker = env.get(CELERY_BROKER_VARIABLE, "").strip()
    backend = env.get(CELERY_BACKEND_VARIABLE, "").strip()
    if broker:
        config["broker"] = broker
    if backend:
        config["backend"] = backend
    return celery_executor.configured(config, name="celery") if config else celery_executor


def _k8s_executor() -> ExecutorDefinition:
    try:
        from dagster_k8s import k8s_job_executor
    except ImportError:
        raise ExecutorChoiceError(
            f"{EXECUTOR_VARIABLE}=k8s needs the dagster-k8s package; {DEPLOY_EXTRA_HINT}"
        ) from None
    return k8s_job_executor
