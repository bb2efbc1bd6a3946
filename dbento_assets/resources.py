"""The ``databento`` Dagster resource: which source bars come from, and how to reach Databento.

:class:`DatabentoResource` declares every setting of the three sources (the UI's launchpad
shows them) and is the one place that builds a source (:meth:`~DatabentoResource.month_source`):
``databento``, ``dbn`` or ``demo``. The API key is passed as ``EnvVar("DATABENTO_API_KEY")``,
only when set, so Dagster resolves it at run time and never stores it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
from dagster import ConfigurableResource, EnvVar, Failure
from pydantic import Field, field_validator

from dbento_assets.core.catalog import Instrument
from dbento_assets.core.coverage import VendorMonth
from dbento_assets.core.databento_api import (
    DEFAULT_GATEWAY,
    DEFAULT_MAX_COST_USD,
    DEFAULT_TIMEOUT_SECONDS,
    DatabentoSource,
    RetryPolicy,
)
from dbento_assets.core.dbn_files import DbnFilesSource
from dbento_assets.core.demo import DemoSource
from dbento_assets.core.months import Month
from dbento_assets.core.settings import Flag, load_settings, read
from dbento_assets.core.source import (
    NO_KEY_MESSAGE,
    FetchRequest,
    Logger,
    MonthSource,
    SourceError,
    origin_of,
)

API_KEY_VARIABLE = "DATABENTO_API_KEY"


class DatabentoResource(ConfigurableResource):
    """Where bars come from (``source``) and the settings of each source."""

    source: str = Field(
        default="databento",
        description="databento (historical API), dbn (local DBN files) or demo (synthetic).",
    )
    api_key: str | None = Field(
        default=None,
        description="Databento API key: set DATABENTO_API_KEY; a key typed here is refused.",
    )
    gateway: str = Field(default=DEFAULT_GATEWAY, description="Databento historical gateway.")
    data_dir: str = Field(
        default="./data",
        description="Data root (a folder or fsspec URL); the DBN cache is its dbn/ folder.",
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
    # A month of ohlcv-1s bars of one front-month future or ETF normally costs well below
    # the default ceiling, so hitting it means something unexpected, like a parent symbol
    # pulling every contract.
    max_cost_usd: float = Field(
        default=DEFAULT_MAX_COST_USD,
        ge=0,
        allow_inf_nan=False,
        description="Refuse to download a symbol-month whose estimated cost (USD) exceeds this.",
    )
    timeout_seconds: float = Field(
        default=DEFAULT_TIMEOUT_SECONDS,
        ge=0,
        allow_inf_nan=False,
        description="Connect and read timeout of each HTTP request to Databento.",
    )
    # Retries are run by tenacity. A local disk error such as no space is never retried:
    # every retry of a download is billed again.
    retry_attempts: int = Field(
        default=5,
        ge=1,
        description="Attempts per API call for 429, 5xx, dropped connections and cut streams.",
    )
    retry_backoff_seconds: float = Field(
        default=1.0,
        ge=0,
        allow_inf_nan=False,
        description="First wait after a failed call; it doubles after each failed attempt.",
    )
    retry_backoff_max_seconds: float = Field(
        default=60.0, ge=0, allow_inf_nan=False, description="Cap of one backoff wait."
    )
    retry_jitter: float = Field(
        default=0.5,
        ge=0,
        allow_inf_nan=False,
        description="Each wait is shortened by a random fraction up to this (0 to 1).",
    )
    retry_after_max_seconds: float = Field(
        default=300.0,
        ge=0,
        allow_inf_nan=False,
        description="Cap on how long a 429's Retry-After is honoured.",
    )
    demo_activity: float = Field(
        default=1.0,
        ge=0,
        allow_inf_nan=False,
        description="Demo source: multiplier of the synthetic trading activity.",
    )
    demo_now: str | None = Field(
        default=None,
        description=(
            "Demo source: the instant taken as now (ISO date or instant, UTC), to play the "
            "life of a current month; unset: the clock."
        ),
    )
    vendor_check: Flag = Field(
        default=False,
        description=(
            "Databento source: also buy Databento's own ohlcv-1m of each partition (cached, "
            "under the same cost ceiling) and check bars_1min against it. The dbn source "
            "compares with the folder's ohlcv-1m files whatever this says: they cost nothing."
        ),
    )

    @field_validator("source", mode="before")
    @classmethod
    def _known_source(cls, value: object) -> str:
        name = str(value).strip().lower()
        origin_of(name)  # raises a SourceError listing the valid names
        return name

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
        if self.source == "demo":
            return DemoSource(activity=self.demo_activity, now=self.demo_instant())
        if self.source == "dbn":
            if not self.dbn_dir or not self.dbn_dir.strip():
                raise SourceError(
                    "DBENTO_SOURCE=dbn reads local DBN files: set DBENTO_DBN_DIR to the folder "
                    "holding your .dbn / .dbn.zst files"
                )
            return DbnFilesSource(self.dbn_dir.strip())
        return self.api_source(catalog_file)

    def declares_vendor_check(self) -> bool:
        """Whether this deployment has the vendor cross-check: when it buys Databento's
        1-minute bars (``DBENTO_VENDOR_CHECK`` with the Databento source) or reads a DBN folder,
        which may hold them. Elsewhere it could never be evaluated, and a check that a failed
        run planned and did not evaluate shows as failed to execute: in a batched run, on every
        good month of a run that one month failed."""
        return self.source == "dbn" or (self.vendor_check and self.source == "databento")

    def vendor_month(
        self, instrument: Instrument, month: Month, log: Logger
    ) -> tuple[VendorMonth | str, bool, float]:
        """Databento's own 1m bars of a partition from the source in force (or the reason there
        are none to compare), whether the user asked for the comparison, and what buying them
        now cost (a download refused included; 0 when they were bought before)."""
        try:
            source = self.month_source()
        except SourceError as exc:
            return f"no source to read Databento's 1-minute bars from ({exc})", False, 0.0
        before = source.paid_usd
        found = source.vendor_bars(FetchRequest(instrument, month), log)
        return found, source.vendor_requested, source.paid_usd - before

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

    def demo_instant(self) -> pd.Timestamp | None:
        """``demo_now`` as a UTC instant; None: the clock."""
        text = (self.demo_now or "").strip()
        if not text:
            return None
        try:
            stamp = pd.Timestamp(text)
        except ValueError:
            raise SourceError(
                f"DBENTO_DEMO_NOW={text!r} is not a date such as 2024-03-17"
            ) from None
        return stamp.tz_convert("UTC") if stamp.tzinfo else stamp.tz_localize("UTC")


def databento_resource_from_env() -> DatabentoResource:
    """The resource as the environment (and the settings file) configures it."""
    load_settings()  # first: the key may be in the settings file
    key = EnvVar(API_KEY_VARIABLE) if os.environ.get(API_KEY_VARIABLE, "").strip() else None
    return read(DatabentoResource, os.environ, SourceError, api_key=key)


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


def refuse_changed_settings(
    resource: str, pairs: list[tuple[str, object, object]], variables: str, stored: str = ""
) -> None:
    """Fail the run, before anything is fetched or written, when a ``resource`` config given in
    the launchpad changed a setting the code location loaded. Such a config replaces every
    setting, the ones it leaves out by their defaults rather than ``dbento.env``'s; the
    launchpad's own default config gives the loaded values, which pass. ``pairs``: (setting,
    this run's value, the loaded value); ``variables`` names where the settings belong."""
    changed = [f"{name} {mine} instead of {was}" for name, mine, was in pairs if mine != was]
    if not changed:
        return
    raise Failure(
        description=(
            f"The {resource} config of this run says {'; '.join(changed)}, the settings the "
            f"code location was loaded with{stored}, so nothing was fetched or written. A "
            f"{resource} config given in the launchpad replaces every setting, the ones it "
            f"leaves out by their defaults: set {variables} in dbento.env (or the "
            "environment) and reload the code location, instead of configuring the "
            f"{resource} resource in the launchpad."
        ),
        allow_retries=False,
    )
