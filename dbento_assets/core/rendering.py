"""How rule results read: small Markdown tables of violating rows, and the words around counts.

The asset checks and the validation report show these tables; descriptions use the helpers
for counts, lists and UTC times.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

SAMPLE_ROWS = 10  # violating rows kept in a rule result's sample


def frame_markdown(frame: pd.DataFrame, max_rows: int = SAMPLE_ROWS, total: int = 0) -> str:
    """A small DataFrame as a Markdown table, timestamps in UTC, "" for an empty frame.

    When ``total`` exceeds the rows shown, a last line says "first N of TOTAL".
    """
    if frame is None or len(frame) == 0 or len(frame.columns) == 0:
        return ""
    head = frame.head(max_rows)
    cells = [[_cell(v) for v in head[c].tolist()] for c in head.columns]
    lines = [
        "| " + " | ".join(_escape(str(c)) for c in head.columns) + " |",
        "|" + "|".join("---" for _ in head.columns) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in zip(*cells, strict=True)]
    total = max(total, len(frame))
    if total > len(head):
        lines.append(f"\n(first {len(head)} of {total})")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NaT:
        return ""
    if isinstance(value, pd.Timestamp):
        if value.tzinfo is not None:
            value = value.tz_convert("UTC")
        text = value.strftime("%Y-%m-%d %H:%M:%S")
        if value.microsecond or value.nanosecond:
            text = value.isoformat()
        return text
    return _escape(str(value))


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def sample_rows(
    frame: pd.DataFrame, positions: np.ndarray, limit: int = SAMPLE_ROWS
) -> pd.DataFrame:
    """The first ``limit`` rows at ``positions`` with their row number in a ``row`` column."""
    picked = frame.iloc[np.asarray(positions[:limit], dtype=np.int64)]
    return picked.reset_index(names="row")


def utc_text(ns: int) -> str:
    """UTC nanoseconds as ``YYYY-MM-DD HH:MM:SS``."""
    return pd.Timestamp(int(ns), tz="UTC").strftime("%Y-%m-%d %H:%M:%S")


def few(items: list[str], limit: int = 5) -> str:
    """The first ``limit`` items, then "and N more"."""
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def plural(n: int, word: str, plural_word: str | None = None) -> str:
    """``1 bar``, ``2 bars``."""
    return f"{n} {word if n == 1 else (plural_word or word + 's')}"
