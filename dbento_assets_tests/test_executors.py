"""DBENTO_EXECUTOR: the same definitions load with Dagster's default, in-process, Celery and
Kubernetes executors (the real dagster-celery and dagster-k8s), and bad choices are explained."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from dagster import Definitions, in_process_executor
from dagster._config import validate_config

from dbento_assets.definitions import build_definitions
from dbento_assets.executors import (
    EXECUTOR_VARIABLE,
    ExecutorChoiceError,
    executor_from_env,
)

REPO = Path(__file__).resolve().parent.parent


def definitions_with(env: dict[str, str]) -> Definitions:
    """What definitions.py builds, with the executor the environment asks for."""
    return build_definitions(executor=executor_from_env(env))


def asset_job_executor(defs: Definitions):
    Definitions.validate_loadable(defs)
    return defs.resolve_implicit_global_asset_job_def().executor_def


def test_unset_runs_each_partition_in_one_process():
    assert executor_from_env({}) is in_process_executor
    assert executor_from_env({EXECUTOR_VARIABLE: "  "}) is in_process_executor
    executor = asset_job_executor(definitions_with({}))
    assert executor.name == "in_process"


@pytest.mark.parametrize(
    ("choice", "name"),
    [
        ("multiprocess", "multiprocess"),
        ("in_process", "in_process"),
        ("In-Process", "in_process"),
        ("celery", "celery"),
        ("k8s", "k8s"),
    ],
)
def test_each_choice_loads_the_definitions_with_that_executor(choice, name):
    if name == "celery":
        pytest.importorskip("dagster_celery")
    if name == "k8s":
        pytest.importorskip("dagster_k8s")
    executor = asset_job_executor(definitions_with({EXECUTOR_VARIABLE: choice}))
    assert executor.name == name


def test_an_unknown_executor_is_a_clear_error():
    with pytest.raises(ExecutorChoiceError, match="not one of multiprocess, in_process, celery"):
        executor_from_env({EXECUTOR_VARIABLE: "dask"})


@pytest.mark.parametrize(
    ("choice", "package"), [("celery", "dagster_celery"), ("k8s", "dagster_k8s")]
)
def test_a_missing_integration_says_how_to_install_it(monkeypatch, choice, package):
    monkeypatch.setitem(sys.modules, package, None)  # as if it were not installed
    with pytest.raises(ExecutorChoiceError, match=r"dbento_assets\[deploy\]"):
        executor_from_env({EXECUTOR_VARIABLE: choice})


def test_celery_broker_and_backend_come_from_the_environment():
    pytest.importorskip("dagster_celery")
    from dagster_celery import celery_executor

    assert executor_from_env({EXECUTOR_VARIABLE: "celery"}) is celery_executor
    configured = executor_from_env(
        {
            EXECUTOR_VARIABLE: "celery",
            "DBENTO_CELERY_BROKER": "redis://127.0.0.1:6379/0",
            "DBENTO_CELERY_BACKEND": "redis://127.0.0.1:6379/1",
        }
    )
    assert configured.name == "celery" and configured is not celery_executor
    # The deploy/celery.yaml worker config is valid config of the same executor.
    from dagster_celery.cli import get_validated_config

    env = {"DBENTO_CELERY_BROKER": "redis://h:6379/0", "DBENTO_CELERY_BACKEND": "redis://h/1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        worker = get_validated_config(str(REPO / "deploy" / "celery.yaml"))
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert worker["broker"] == "redis://h:6379/0" and worker["backend"] == "redis://h/1"


def test_the_documented_k8s_run_config_is_valid_for_the_k8s_executor():
    pytest.importorskip("dagster_k8s")
    from dagster_k8s import k8s_job_executor

    run_config = {  # the execution block shown in deploy/k8s_celery.md
        "job_namespace": "dagster",
        "env_secrets": ["dbento-secrets"],
        "max_concurrent": 4,
        "step_k8s_config": {
            "container_config": {"resources": {"requests": {"cpu": "1", "memory": "2Gi"}}}
        },
    }
    result = validate_config(k8s_job_executor.config_schema.config_type, run_config)
    assert result.success, result.errors
    bad = validate_config(k8s_job_executor.config_schema.config_type, {"max_concurent": 4})
    assert not bad.success


@pytest.mark.slow
def test_dagster_cli_loads_the_code_location_with_the_k8s_executor(tmp_path):
    pytest.importorskip("dagster_k8s")
    env = {**os.environ, "DBENTO_SOURCE": "demo", "DAGSTER_HOME": str(tmp_path)}
    env[EXECUTOR_VARIABLE] = "k8s"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "dagster",
            "definitions",
            "validate",
            "-m",
            "dbento_assets",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
