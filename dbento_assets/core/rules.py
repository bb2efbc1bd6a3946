"""The validation rules by name: severity, title, which month gets which, and their result.

A rule returns a :class:`RuleResult`: pass or fail, severity (``ERROR`` blocks the data,
``WARN`` only informs), a count, one plain-English line and the first violating rows. The
rules themselves live in :mod:`.frame_rules`, :mod:`.rolls`, :mod:`.comparison` and
:mod:`.calendars`; :mod:`.run_rules` runs them on a month. This module also holds what every
rule uses: the :func:`rule` decorator and the column readers that refuse unusable columns.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, ParamSpec

import numpy as np
import pandas as pd

from dbento_assets.core.rendering import SAMPLE_ROWS, frame_markdown

Severity = Literal["ERROR", "WARN"]
ERROR: Severity = "ERROR"
WARN: Severity = "WARN"

# Rule names: stable identifiers (valid Dagster check names), in the order the runners use.
RULE_SCHEMA = "schema"
RULE_TIME_ORDER = "timestamps_increasing"
RULE_OHLC = "ohlc_consistent"
RULE_IN_MONTH = "inside_month"
RULE_ALIGNED = "aligned_to_timeframe"
RULE_RECONCILED = "reconciles_with_raw"
RULE_NO_ROLL_IN_BAR = "no_roll_inside_bar"
RULE_CALENDAR = "calendar_complete"
RULE_VENDOR = "matches_vendor_1m"

RULE_SEVERITY: dict[str, Severity] = {
    RULE_SCHEMA: ERROR,
    RULE_TIME_ORDER: ERROR,
    RULE_OHLC: ERROR,
    RULE_IN_MONTH: ERROR,
    RULE_ALIGNED: ERROR,
    RULE_RECONCILED: ERROR,
    RULE_NO_ROLL_IN_BAR: ERROR,
    RULE_CALENDAR: WARN,
    RULE_VENDOR: ERROR,
}
RULE_TITLES: dict[str, str] = {
    RULE_SCHEMA: "Columns, types and value ranges",
    RULE_TIME_ORDER: "Timestamps strictly increasing, no duplicates",
    RULE_OHLC: "High/low consistent with open/close",
    RULE_IN_MONTH: "Every bar inside the month",
    RULE_ALIGNED: "Bars start on timeframe boundaries",
    RULE_RECONCILED: "Aggregated bars equal their recomputation from the 1s bars",
    RULE_NO_ROLL_IN_BAR: "No contract roll inside a bar",
    RULE_CALENDAR: "A bar in every trading session",
    RULE_VENDOR: "1-minute bars equal Databento's own 1-minute bars",
}
RAW_RULES: tuple[str, ...] = (
    RULE_SCHEMA,
    RULE_TIME_ORDER,
    RULE_OHLC,
    RULE_IN_MONTH,
    RULE_ALIGNED,  # on the 1-second grid: a raw bar opens on a whole second
    RULE_NO_ROLL_IN_BAR,
    RULE_CALENDAR,
)
AGGREGATED_RULES: tuple[str, ...] = (
    RULE_SCHEMA,
    RULE_TIME_ORDER,
    RULE_OHLC,
    RULE_IN_MONTH,
    RULE_ALIGNED,
    RULE_RECONCILED,
    RULE_NO_ROLL_IN_BAR,
)
# The raw rules whose failure stops the data (all but calendar completeness).
RAW_BLOCKING_RULES: tuple[str, ...] = tuple(r for r in RAW_RULES if RULE_SEVERITY[r] == ERROR)

LISTED = 50  # entries kept in a list inside RuleResult.extra (roll events, sessions)
NAT_NS = np.iinfo(np.int64).min  # how NaT looks as int64 nanoseconds


@dataclass(eq=False)
class RuleResult:
    """The outcome of one rule on one frame; ``extra`` holds JSON-friendly facts."""

    rule: str
    passed: bool
    severity: Severity
    violations: int
    description: str
    sample: pd.DataFrame = field(default_factory=pd.DataFrame)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def title(self) -> str:
        return RULE_TITLES.get(self.rule, self.rule)

    @property
    def blocking(self) -> bool:
        """True when this failed result must stop the data (a failed ERROR rule)."""
        return not self.passed and self.severity == ERROR

    def sample_markdown(self, max_rows: int = SAMPLE_ROWS) -> str:
        """The first violating rows as a small Markdown table ("" when there are none)."""
        return frame_markdown(self.sample, max_rows, total=self.violations)


def make_result(
    name: str,
    violations: int,
    ok_text: str,
    fail_text: str,
    sample: pd.DataFrame | None = None,
    extra: dict[str, Any] | None = None,
    passed: bool | None = None,
) -> RuleResult:
    """Rule ``name``'s result: passed when there are no violations unless ``passed`` says."""
    ok = violations == 0 if passed is None else passed
    return RuleResult(
        rule=name,
        passed=ok,
        severity=RULE_SEVERITY[name],
        violations=int(violations),
        description=ok_text if ok else fail_text,
        sample=(sample if sample is not None and not ok else pd.DataFrame()),
        extra=extra or {},
    )


class Unusable(Exception):
    """A column a rule needs is missing or of a type it cannot read (the schema rule says why)."""


_P = ParamSpec("_P")


def rule(name: str) -> Callable[[Callable[_P, RuleResult]], Callable[_P, RuleResult]]:
    """Turn an unreadable frame into a failed "not checked" result instead of an exception."""

    def wrap(func: Callable[_P, RuleResult]) -> Callable[_P, RuleResult]:
        @functools.wraps(func)
        def run(*args: _P.args, **kwargs: _P.kwargs) -> RuleResult:
            try:
                return func(*args, **kwargs)
            except Unusable as exc:
                return RuleResult(
                    rule=name,
                    passed=False,
                    severity=RULE_SEVERITY[name],
                    violations=0,
                    description=f"Not checked: {exc} (see the schema check).",
                    extra={"not_checked": str(exc)},
                )

        return run

    return wrap


def _column(frame: pd.DataFrame, name: str, kinds: str, what: str) -> pd.Series:
    """Column ``name`` if it exists and its dtype kind is one of ``kinds``, else Unusable."""
    if name not in frame.columns:
        raise Unusable(f"column {name} is missing")
    column = frame[name]
    if column.dtype.kind not in kinds:
        raise Unusable(f"column {name} is {column.dtype}, not {what}")
    return column


def ts_column(frame: pd.DataFrame, name: str = "ts_event") -> np.ndarray:
    """A timezone-aware timestamp column as int64 UTC nanoseconds (NaT -> :data:`NAT_NS`)."""
    column = _column(frame, name, "M", "a timezone-aware timestamp")
    if not isinstance(column.dtype, pd.DatetimeTZDtype):
        raise Unusable(f"column {name} is {column.dtype}, not a timezone-aware timestamp")
    array = column.array
    # as_unit copies even when the unit is already ns: 1-2 ms a call on a month, dozens of
    # calls per partition. The frame's own buffer is handed out read-only instead.
    values = (array if array.unit == "ns" else array.as_unit("ns")).asi8.view()
    values.flags.writeable = False
    return values


def int_column(frame: pd.DataFrame, name: str) -> np.ndarray:
    column = _column(frame, name, "iu", "integers")
    try:
        return column.to_numpy()
    except (ValueError, TypeError):  # a nullable integer column holding NA
        raise Unusable(f"column {name} has missing values") from None


def float_column(frame: pd.DataFrame, name: str) -> np.ndarray:
    column = _column(frame, name, "fiu", "numbers")
    return column.to_numpy(dtype="float64", na_value=np.nan)
