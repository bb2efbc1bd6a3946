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

from collections.abc import Mapping

from dagster import ExecutorDefinition, in_process_executor, multiprocess_executor
from pydantic import BaseModel, Field, field_validator

from dbento_assets.core.settings import read, variable

EXECUTOR_VARIABLE = variable("executor")
EXECUTORS = ("multiprocess", "in_process", "celery", "k8s")
DEPLOY_EXTRA_HINT = "install it with: pip install 'dbento_assets[deploy]'"


class ExecutorChoiceError(ValueError):
    """``DBENTO_EXECUTOR`` names no executor, or one whose package is not installed."""


class ExecutorSettings(BaseModel):
    """The executor settings, each read from ``DBENTO_<FIELD>``."""

    executor: str = Field(default="in_process", description=f"One of {', '.join(EXECUTORS)}.")
    celery_broker: str | None = Field(
        default=None, description="Celery broker URL (default: RabbitMQ on localhost)."
    )
    celery_backend: str | None = Field(
        default=None, description="Celery result backend URL (default rpc://)."
    )

    @field_validator("executor", mode="before")
    @classmethod
    def _known_executor(cls, value: object) -> str:
        name = str(value).strip().lower().replace("-", "_")
        if name not in EXECUTORS:
            raise ValueError(
                f"is not one of {', '.join(EXECUTORS)} (or leave it unset for in_process)"
            )
        return name


def executor_from_env(environ: Mapping[str, str] | None = None) -> ExecutorDefinition:
    """The executor ``DBENTO_EXECUTOR`` asks for; ``in_process`` when unset."""
    settings = read(ExecutorSettings, environ, ExecutorChoiceError)
    if settings.executor == "multiprocess":
        return multiprocess_executor
    if settings.executor == "celery":
        return _celery_executor(settings)
    if settings.executor == "k8s":
        return _k8s_executor()
    return in_process_executor


def _celery_executor(settings: ExecutorSettings) -> ExecutorDefinition:
    try:
        from dagster_celery import celery_executor
    except ImportError:
        raise ExecutorChoiceError(
            f"{EXECUTOR_VARIABLE}=celery needs the dagster-celery package; {DEPLOY_EXTRA_HINT}"
        ) from None
    config = {
        name: value
        for name, value in (
            ("broker", settings.celery_broker),
            ("backend", settings.celery_backend),
        )
        if value
    }
    return celery_executor.configured(config, name="celery") if config else celery_executor


def _k8s_executor() -> ExecutorDefinition:
    try:
        from dagster_k8s import k8s_job_executor
    except ImportError:
        raise ExecutorChoiceError(
            f"{EXECUTOR_VARIABLE}=k8s needs the dagster-k8s package; {DEPLOY_EXTRA_HINT}"
        ) from None
    return k8s_job_executor
