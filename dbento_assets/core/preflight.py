"""Settings checked before a partition asks its source for anything, so before any payment.

:func:`preflight` checks the file format, the catalog, the data folder's origin (demo and real
data never mix) and that the data and cache folders can be written, then removes temporaries
that killed writes left for this partition. Each failure is one sentence saying what to fix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from upath import UPath

from dbento_assets.core.catalog import Catalog, CatalogError, load_catalog
from dbento_assets.core.months import Month
from dbento_assets.core.source import origin_of
from dbento_assets.core.storage import NOTES, BarStore, check_local_folder


@dataclass(frozen=True)
class Preflight:
    """What :func:`preflight` found fit, for the caller to log."""

    store: BarStore
    removed_temps: list[str]


def preflight(
    *,
    data_dir: str,
    fmt: str,
    source_name: str,
    catalog: Catalog,
    symbol: str,
    month: Month,
    cache_folder: str | os.PathLike[str] | None = None,
) -> Preflight:
    """Check every setting a partition needs before its source is asked for anything.

    ``cache_folder`` is the local folder a paid download is written to (None for sources
    that download nothing). Raises :class:`~dbento_assets.core.storage.StorageError`,
    :class:`~dbento_assets.core.source.SourceError` or
    :class:`~dbento_assets.core.catalog.CatalogError`.
    """
    store = BarStore.at(data_dir, fmt)  # the format, and a data folder that is set at all
    origin = origin_of(source_name)
    check_catalog(catalog, symbol)
    store.check_origin(origin, source_name)
    paths: list[UPath] = store.partition_paths(symbol, month, catalog.timeframes)
    store.check_writable(paths)
    if cache_folder is not None:
        check_local_folder(
            cache_folder,
            f"The DBN download cache folder {cache_folder}",
            "set DBENTO_CACHE_DIR (or DBENTO_DATA_DIR) to a local folder you can write, or "
            "give this user write access to it",
        )
    notes = [store.note_path(symbol, month, kind) for kind in NOTES]
    return Preflight(store, store.remove_stale_temps([*paths, *notes]))


def check_catalog(catalog: Catalog, symbol: str) -> None:
    """Refuse when the catalog file no longer loads, or now describes ``symbol`` otherwise
    than the loaded ``catalog`` (a request built from a stale entry would buy the wrong
    data)."""
    loaded = catalog.instrument(symbol)  # a symbol the catalog does not know
    try:
        on_disk = load_catalog(catalog.path)
    except CatalogError as exc:
        raise CatalogError(
            f"The catalog file {catalog.path} no longer loads ({exc}); fix it and reload the "
            "code location."
        ) from None
    if on_disk.instruments.get(symbol) != loaded:
        raise CatalogError(
            f"The catalog file {catalog.path} changed the entry of {symbol} since the code "
            "location was loaded; reload the code location so that what is bought matches "
            "the file."
        )
