"""The code location: every asset, resource and IO manager, loaded the same way by all entry points.

``dagster dev`` (via ``[tool.dagster]`` in pyproject.toml), ``dagster dev -w workspace.yaml``
and ``dagster asset materialize -m dbento_assets`` all load :data:`defs`. Settings come from
environment variables (and the settings file ``dbento.env`` of the working directory):
``DBENTO_SOURCE``,
``DBENTO_DATA_DIR``, ``DBENTO_FORMAT``, ``DATABENTO_API_KEY`` and the others listed in
``.env.example``. It holds the assets (with their checks), the monthly schedule (stopped
until you turn it on) and the executor chosen by ``DBENTO_EXECUTOR`` (in-process when
unset: see :mod:`dbento_assets.executors`). :func:`build_definitions` builds the same thing from
explicit parts for tests.
"""

from __future__ import annotations

import os

from dagster import Definitions, ExecutorDefinition

from dbento_assets.assets import build_assets
from dbento_assets.core.catalog import Catalog, load_catalog
from dbento_assets.executors import executor_from_env
from dbento_assets.io_managers import BarFileIOManager
from dbento_assets.resources import DatabentoResource, databento_resource_from_env
from dbento_assets.schedules import build_schedules


def io_manager_for(databento: DatabentoResource) -> BarFileIOManager:
    """The bar-file IO manager sharing the resource's data root and source."""
    fmt = os.environ.get("DBENTO_FORMAT", "parquet").strip().lower() or "parquet"
    return BarFileIOManager(data_dir=databento.data_dir, fmt=fmt, source=databento.source)


def build_definitions(
    catalog: Catalog | None = None,
    databento: DatabentoResource | None = None,
    io_manager: BarFileIOManager | None = None,
    executor: ExecutorDefinition | None = None,
) -> Definitions:
    """Definitions for a catalog (default: the catalog file in force) and resources."""
    # Settings first: the settings file may name the catalog (DBENTO_CATALOG).
    databento = databento or databento_resource_from_env()
    catalog = catalog or load_catalog()
    return Definitions(
        assets=build_assets(catalog),
        schedules=build_schedules(catalog),
        executor=executor or executor_from_env(),
        resources={
            "databento": databento,
            "io_manager": io_manager or io_manager_for(databento),
        },
    )


defs = build_definitions()
