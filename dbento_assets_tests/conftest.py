"""Fixtures every test module can use: ``gateway``, the fake Databento HTTPS gateway, and
``fresh_instance``, a Dagster instance of the test's own."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from dagster import DagsterInstance

pytest_plugins = ["dbento_assets_tests.gateway"]


@pytest.fixture(scope="session")
def _instance_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new instance's home, created once (creating one takes about a second)."""
    home = tmp_path_factory.mktemp("dagster_home_template")
    with DagsterInstance.local_temp(str(home)):
        pass
    return home


@pytest.fixture
def fresh_instance(_instance_template: Path, tmp_path: Path) -> Iterator[DagsterInstance]:
    """An on-disk instance no other test has seen (a copy of the template, in milliseconds):
    what one test's runs recorded, such as where a month was bought, never reaches another."""
    home = tmp_path / "dagster_home"
    shutil.copytree(_instance_template, home)
    with DagsterInstance.local_temp(str(home)) as instance:
        yield instance
