"""The code location: every asset, resource and IO manager, loaded the same way by all entry points.

``dagster dev``, ``dagster dev -w workspace.yaml`` and ``dagster asset materialize -m
dbento_assets`` all load :data:`defs`; :func:`build_definitions` builds the same from explicit
parts for tests.
"""

from __future__ import annotations

from dagster import Definitions, ExecutorDefinition

from dbento_assets.assets import build_assets
from dbento_assets.core.catalog import Catalog, load_catalog
from dbento_assets.executors import executor_from_env
from dbento_assets.io_managers import BarFileIOManager, io_manager_from_env
from dbento_assets.names import CATALOG_METADATA_KEY
from dbento_assets.range_job import build_range_job
from dbento_assets.resources import DatabentoResource, databento_resource_from_env
from dbento_assets.schedules import build_schedules


def build_definitions(
    catalog: Catalog | None = None,
    databento: DatabentoResource | None = None,
    io_manager: BarFileIOManager | None = None,
    executor: ExecutorDefinition | None = None,
) -> Definitions:
    """Definitions for a catalog (default: the catalog file in force) and resources; the
    IO manager (default: from the environment) stores under ``databento``'s data root."""
    databento = databento or databento_resource_from_env()
    catalog = catalog or load_catalog()
    assets = Definitions(
        assets=build_assets(catalog, vendor=databento.declares_vendor_check()),
        schedules=build_schedules(catalog),
        executor=executor or executor_from_env(),
        resources={
            "databento": databento,
            "io_manager": io_manager or io_manager_from_env(databento),
        },
        metadata={CATALOG_METADATA_KEY: str(catalog.path)},
    )
    return Definitions.merge(assets, Definitions(jobs=[build_range_job(assets)]))


defs = build_definitions()
