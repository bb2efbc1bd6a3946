"""Which Dagster executor runs the steps of a run, chosen with ``DBENTO_EXECUTOR``.

Unset means ``in_process``: a run is one partition with two chained steps, so a process per
step buys no parallelism and costs a start-up per step (it more than doubled a backfill's wall
time, benchmarks/bench_backfill.py). ``multiprocess``, ``celery`` and ``k8s`` are there for
larger deployments; the last two need the ``deploy`` extra and shared Postgres storage
(``deploy/k8s_celery.md``).
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
