"""The ``databento`` Dagster resource: which source bars come from, and how to reach Databento.

:class:`DatabentoResource` holds every setting of the three sources and builds the one in
force with :meth:`DatabentoResource.month_source`: ``databento`` (the default: the historical
API, needs ``DATABENTO_API_KEY``), ``dbn`` (a folder of DBN files, ``DBENTO_DBN_DIR``) or
``demo`` (synthetic data, no account). :func:`databento_resource_from_env` builds it from the
environment and the settings file ``dbento.env`` (then ``.env``) of the working directory;
a variable already set, in the shell for instance, wins (:mod:`dbento_assets.project`). The
key is passed as ``EnvVar("DATABENTO_API_KEY")``, so Dagster resolves it at run time and never
stores its value in run config or the event log; it is passed only when set, because an unset
``EnvVar`` fails at resource initialisation even for the demo source. Settings:
``DBENTO_SOURCE``, ``DBENTO_GATEWAY`` (default ``https://hist.databento.com``),
``DBENTO_DATA_DIR`` (default ``./data``; the DBN cache lives in its ``dbn/`` folder, or in
that of ``DBENTO_CACHE_DIR`` when set, which an object-store data root needs),
``DBENTO_DBN_DIR``, ``DBENTO_MAX_COST_USD`` (default 5.00 US dollars per symbol-month
partition: a month of ohlcv-1s bars for one front-month future or ETF normally costs well
below that, so hitting it means something unexpected, like a parent symbol pulling every
contract), ``DBENTO_TIMEOUT_SECONDS``, ``DBENTO_RETRY_ATTEMPTS`` (attempts per API call for
429, 5xx, dropped connections and cut streams, run by ``tenacity``; a local disk error such as
no space is never retried, as every retry of a download is billed again),
``DBENTO_RETRY_BACKOFF_SECONDS`` (the first wait after a failed call; it doubles each time)
and ``DBENTO_VENDOR_CHECK`` (true/1/yes or false/0/no, default false: also buy Databento's
own ohlcv-1m of each partition, under the same ceiling and cached the same way, to compare
``bars_1min`` with it; the DBN-files source compares with the folder's ohlcv-1m files
whatever this says, as they cost nothing).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pandas as pd
from dagster import ConfigurableResource, EnvVar
from dotenv import load_dotenv
from pydantic import Field

from dbento_assets.core.databento_api import (
    DEFAULT_GATEWAY,
    DEFAULT_MAX_COST_USD,
    DEFAULT_TIMEOUT_SECONDS,
    DatabentoSource,
    RetryPolicy,
)
from dbento_assets.core.dbn_files import DbnFilesSource
from dbento_assets.core.demo import DemoSource
from dbento_assets.core.source import MonthSource, SourceError, origin_of
from dbento_assets.project import load_settings

DEFAULT_SOURCE = "databento"
DEFAULT_DATA_DIR = "./data"
API_KEY_VARIABLE = "DATABENTO_API_KEY"
TRUE_WORDS = frozenset({"true", "1", "yes"})
FALSE_WORDS = frozenset({"false", "0", "no"})
NO_KEY_MESSAGE = (
    "DBENTO_SOURCE=databento needs a Databento API key and none is set. Put "
    "DATABENTO_API_KEY=db-... in the dbento.env file of the project folder (or in the "
    "environment), then reload the code location; or try the pipeline without an account "
    "with DBENTO_SOURCE=demo (synthetic data)."
)


class DatabentoResource(ConfigurableResource):
    """Where bars come from (``source``) and the settings of each source."""

    source: str = Field(
        default=DEFAULT_SOURCE,
        description="databento (historical API), dbn (local DBN files) or demo (synthetic).",
    )
    api_key: str | None = Field(
        default=None,
        description="Databento API key; pass EnvVar('DATABENTO_API_KEY'), never a literal.",
    )
    gateway: str = Field(default=DEFAULT_GATEWAY, description="Databento historical gateway.")
    data_dir: str = Field(
        default=DEFAULT_DATA_DIR, description="Data root; the DBN cache is its dbn/ folder."
    )
    cache_dir: str | None = Field(
        default=None,
        description=(
            "Local folder whose dbn/ subfolder caches Databento downloads; default data_dir. "
            "Needed when data_dir is an object-store URL such as s3://bucket/prefix."
        ),
    )
    dbn_dir: str | None = Field(
        default=None, description="Folder of .dbn/.dbn.zst files for source 'dbn'."
    )
    max_cost_usd: float = Field(
        default=DEFAULT_MAX_COST_USD,
        description="Refuse to download a symbol-month whose estimated cost exceeds this.",
    )
    timeout_seconds: float = Field(
        default=DEFAULT_TIMEOUT_SECONDS,
        description="Connect and read timeout of each HTTP request to Databento.",
    )
    retry_attempts: int = Field(
        default=5, description="Attempts per API call for 429, 5xx and broken streams."
    )
    retry_backoff_seconds: float = Field(
        default=1.0, description="First backoff wait; doubles after each failed attempt."
    )
    retry_backoff_max_seconds: float = Field(default=60.0, description="Cap of one backoff wait.")
    retry_jitter: float = Field(
        default=0.5, description="Each wait is shortened by a random fraction up to this."
    )
    retry_after_max_seconds: float = Field(
        default=300.0, description="Cap on how long a 429's Retry-After is honoured."
    )
    demo_activity: float = Field(
        default=1.0, description="Demo source: multiplier of the synthetic trading activity."
    )
    vendor_check: bool = Field(
        default=False,
        description=(
            "Databento source: also download Databento's own ohlcv-1m of each partition "
            "(cached, under the same cost ceiling) and check bars_1min against it."
        ),
    )

    def retry_policy(self) -> RetryPolicy:
        """The retry settings as the core's :class:`RetryPolicy`."""
        try:
            return RetryPolicy(
                max_attempts=self.retry_attempts,
                backoff_base_seconds=self.retry_backoff_seconds,
                backoff_max_seconds=self.retry_backoff_max_seconds,
                jitter=self.retry_jitter,
                retry_after_max_seconds=self.retry_after_max_seconds,
            )
        except ValueError as exc:
            raise SourceError(f"invalid retry settings: {exc}") from None

    def month_source(self, catalog_file: Path | str | None = None) -> MonthSource:
        """Build the source named by ``source``; raise :class:`SourceError` if it cannot work.

        ``catalog_file`` is the catalog in use, named in error messages about a symbol
        (default: ``DBENTO_CATALOG`` or the packaged catalog).
        """
        name = (self.source or "").strip().lower()
        origin_of(name)  # raises a SourceError listing the valid names
        if name == "demo":
            return DemoSource(activity=self.demo_activity, now=demo_now())
        if name == "dbn":
            if not self.dbn_dir or not self.dbn_dir.strip():
                raise SourceError(
                    "DBENTO_SOURCE=dbn reads local DBN files: set DBENTO_DBN_DIR to the folder "
                    "holding your .dbn / .dbn.zst files"
                )
            return DbnFilesSource(self.dbn_dir.strip())
        return self.api_source(catalog_file)

    def api_source(self, catalog_file: Path | str | None = None) -> DatabentoSource:
        """The Databento API source whatever ``source`` says (used by the cost estimate)."""
        key = self.api_key
        if isinstance(key, EnvVar):  # outside a Dagster run the EnvVar is not resolved yet
            key = key.get_value()
        key = (key or "").strip()
        if not key:
            raise SourceError(NO_KEY_MESSAGE)
        return DatabentoSource(
            key,
            _local_cache_root(self.cache_dir or self.data_dir),
            gateway=self.gateway.strip() or DEFAULT_GATEWAY,
            max_cost_usd=self.max_cost_usd,
            timeout_seconds=self.timeout_seconds,
            retry=self.retry_policy(),
            catalog_file=Path(catalog_file) if catalog_file is not None else None,
            vendor_check=self.vendor_check,
        )


def databento_resource_from_env(env_file: Path | str | None = None) -> DatabentoResource:
    """The resource as the environment configures it, plus the settings file (``env_file``,
    default ``./dbento.env`` then ``./.env``), which never overrides a variable already set."""
    if env_file is not None:
        load_dotenv(Path(env_file), override=False)
    else:
        load_settings()
    settings: dict[str, Any] = {}
    source = _env("DBENTO_SOURCE")
    if source is not None:
        settings["source"] = source.lower()
        origin_of(settings["source"])
    for variable, field_name in (
        ("DBENTO_GATEWAY", "gateway"),
        ("DBENTO_DATA_DIR", "data_dir"),
        ("DBENTO_CACHE_DIR", "cache_dir"),
        ("DBENTO_DBN_DIR", "dbn_dir"),
    ):
        value = _env(variable)
        if value is not None:
            settings[field_name] = value
    for variable, field_name, kind in (
        ("DBENTO_MAX_COST_USD", "max_cost_usd", float),
        ("DBENTO_TIMEOUT_SECONDS", "timeout_seconds", float),
        ("DBENTO_RETRY_ATTEMPTS", "retry_attempts", int),
        ("DBENTO_RETRY_BACKOFF_SECONDS", "retry_backoff_seconds", float),
    ):
        value = _env(variable)
        if value is not None:
            settings[field_name] = _number(variable, value, kind)
    vendor_check = _env("DBENTO_VENDOR_CHECK")
    if vendor_check is not None:
        settings["vendor_check"] = _flag("DBENTO_VENDOR_CHECK", vendor_check)
    if _env(API_KEY_VARIABLE) is not None:
        settings["api_key"] = EnvVar(API_KEY_VARIABLE)
    return DatabentoResource(**settings)


def _env(name: str) -> str | None:
    value = os.environ.get(name)
    if value is None or not value.strip():
        return None
    return value.strip()


def _number(variable: str, text: str, kind: type[int] | type[float]) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        raise SourceError(f"{variable}={text!r} is not a {kind.__name__}") from None
    if not math.isfinite(value) or value < 0:
        raise SourceError(f"{variable}={text!r} must be a non-negative number")
    return value


def _flag(variable: str, text: str) -> bool:
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise SourceError(
        f"{variable}={text!r} is neither true nor false: write true, 1 or yes to turn it on, "
        "false, 0 or no to turn it off"
    )


def demo_now() -> pd.Timestamp | None:
    """The demo source's "now" from ``DBENTO_DEMO_NOW`` (an ISO date or instant, UTC), to run
    the life of a current month (day 3, day 17, closed) in tests and demos; None: the clock."""
    text = os.environ.get("DBENTO_DEMO_NOW", "").strip()
    if not text:
        return None
    try:
        stamp = pd.Timestamp(text)
    except ValueError:
        raise SourceError(f"DBENTO_DEMO_NOW={text!r} is not a date such as 2024-03-17") from None
    return stamp.tz_convert("UTC") if stamp.tzinfo else stamp.tz_localize("UTC")


def _local_cache_root(folder: str) -> Path:
    """The local folder holding the ``dbn/`` download cache (an object store cannot: the
    client streams to a temporary file and renames it when complete)."""
    text = folder.strip()
    if text.startswith("file://"):
        text = text.removeprefix("file://")
    elif "://" in text:
        raise SourceError(
            f"DBENTO_DATA_DIR={folder!r} is not a local folder, and the Databento download "
            "cache must be: set DBENTO_CACHE_DIR to a local folder (for example ./dbn-cache) "
            "to keep the downloaded DBN files there while the bar files go to the URL"
        )
    return Path(text).expanduser()
