"""Pandera models of the bar frame, for the schema rule (:func:`~.frame_rules.check_schema`).

They spell out :data:`dbento_assets.core.bars.DTYPES` with the value ranges a bar must keep.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pandera.pandas as pa
from pandera.typing import Series


class BarsSchema(pa.DataFrameModel):
    """A bar frame, raw or aggregated: exactly the columns and dtypes of ``core.bars.DTYPES``
    (alignment to the timeframe is its own rule).

    One model for both: a model inheriting this one would name its custom checks by their
    method names (``_prices_finite``) once another model had been built in the process
    (pandera 0.35), and the schema rule words each check by its name.
    """

    ts_event: Series[pd.DatetimeTZDtype] = pa.Field(
        nullable=False, dtype_kwargs={"unit": "ns", "tz": "UTC"}
    )
    symbol: Series[pd.StringDtype] = pa.Field(nullable=False)
    instrument_id: Series[np.uint32] = pa.Field(nullable=False)
    open: Series[np.float64] = pa.Field(nullable=False, gt=0)
    high: Series[np.float64] = pa.Field(nullable=False, gt=0)
    low: Series[np.float64] = pa.Field(nullable=False, gt=0)
    close: Series[np.float64] = pa.Field(nullable=False, gt=0)
    volume: Series[np.uint64] = pa.Field(nullable=False, ge=0)

    @pa.check("open", "high", "low", "close", name="finite")
    @classmethod
    def _prices_finite(cls, series: pd.Series) -> pd.Series:
        # Nulls are dropped before checks run (they are reported as not_nullable instead).
        return pd.Series(~np.isinf(series.to_numpy(dtype="float64")), index=series.index)

    @pa.check("symbol", name="text_dtype")
    @classmethod
    def _symbol_is_text(cls, series: pd.Series) -> bool:
        # Pandera's own string dtype test also accepts object columns; the bar frame is `str`.
        return isinstance(series.dtype, pd.StringDtype)

    class Config:
        strict = True  # no extra columns
        coerce = False  # report wrong dtypes, never fix them silently
