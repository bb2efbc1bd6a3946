"""Dagster partitions: one partition per (UTC month, catalog symbol), keyed ``2024-01-01|ES``.

Dagster orders the dimensions of a multi-partition key by name, so ``month`` comes before
``symbol``. Months start at the catalog's ``start_month`` and end with the current month
(``end_offset=1``), which grows until it closes and is stored partial meanwhile; symbols
are the catalog's symbols, in catalog order.
"""

from __future__ import annotations

from dataclasses import dataclass

from dagster import (
    MonthlyPartitionsDefinition,
    MultiPartitionKey,
    MultiPartitionsDefinition,
    StaticPartitionsDefinition,
)

from dbento_assets.core.catalog import Catalog
from dbento_assets.core.months import Month

MONTH_DIM = "month"
SYMBOL_DIM = "symbol"
PARTITION_TAG = "dagster/partition"  # the tag Dagster gives a run of one partition


def build_partitions(catalog: Catalog) -> MultiPartitionsDefinition:
    """The month x symbol partitions for a catalog."""
    return MultiPartitionsDefinition(
        {
            MONTH_DIM: MonthlyPartitionsDefinition(
                start_date=catalog.start_month.key, timezone="UTC", fmt="%Y-%m-%d", end_offset=1
            ),
            SYMBOL_DIM: StaticPartitionsDefinition(catalog.symbols),
        }
    )


@dataclass(frozen=True)
class Partition:
    """One symbol-month, parsed once from its key and handed to whatever needs it."""

    month: Month
    symbol: str

    @classmethod
    def from_key(cls, key: str | MultiPartitionKey) -> Partition:
        """``2024-01-01|ES`` (or a MultiPartitionKey) to ``Partition(Month(2024, 1), "ES")``."""
        if isinstance(key, MultiPartitionKey):
            dims = key.keys_by_dimension
            return cls(Month.parse(dims[MONTH_DIM]), dims[SYMBOL_DIM])
        month_text, sep, symbol = str(key).partition("|")
        if not sep or not symbol:
            raise ValueError(f"partition key {key!r} is not '<YYYY-MM-01>|<SYMBOL>'")
        return cls(Month.parse(month_text), symbol)

    @property
    def key(self) -> MultiPartitionKey:
        """The Dagster key; ``str()`` of it is ``2024-01-01|ES``."""
        return MultiPartitionKey({MONTH_DIM: self.month.key, SYMBOL_DIM: self.symbol})

    def __str__(self) -> str:
        return str(self.key)


def partition_key(month: Month, symbol: str) -> MultiPartitionKey:
    """The partition key of one symbol-month."""
    return Partition(month, symbol).key
