"""Run the validation rules on a month: :func:`run_raw_rules` and :func:`run_aggregated_rules`.

Results come in the order of :data:`~.rules.RAW_RULES` and :data:`~.rules.AGGREGATED_RULES`.
The vendor cross-check (:func:`~.comparison.check_vendor`) is not run here: it needs
Databento's 1-minute bars, which the asset step fetches. :func:`raw_rules_proof` is what a raw
file records once its blocking rules passed, so a later step need not run them again.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Literal

import pandas as pd

from dbento_assets.core.calendars import calendar_skipped, check_calendar
from dbento_assets.core.catalog import Instrument, calendar_for
from dbento_assets.core.comparison import check_reconciliation, expect_ahead
from dbento_assets.core.frame_rules import (
    check_alignment,
    check_inside_month,
    check_ohlc,
    check_schema,
    check_time_order,
)
from dbento_assets.core.months import Month
from dbento_assets.core.rolls import bins_in_raw, check_rolls, check_rolls_aggregated
from dbento_assets.core.rules import (
    RAW_BLOCKING_RULES,
    RAW_RULES,
    RULE_ALIGNED,
    RULE_CALENDAR,
    RULE_IN_MONTH,
    RULE_NO_ROLL_IN_BAR,
    RULE_OHLC,
    RULE_SCHEMA,
    RULE_TIME_ORDER,
    RuleResult,
)
from dbento_assets.core.storage import CODE_VERSION, FileIdentity, fingerprint
from dbento_assets.core.timeframes import Timeframe

ONE_SECOND = Timeframe(1)  # the raw bars' own timeframe, for the alignment rule
# Bump when a blocking raw rule changes what it accepts: proofs written before then no
# longer hold, and the bars step checks those files again.
RAW_RULES_VERSION = 1


def raw_rules_proof(raw: pd.DataFrame, month: Month) -> str:
    """What a raw file records once the blocking raw rules passed on ``raw`` as bars of
    ``month``: the rule set (code version, rules version, rule names), the month and the
    fingerprint of exactly these bars.

    The bars step recomputes it from the frame it loads for its partition's month; equal,
    the rules already passed on this content for this month, so they are not run again (an
    edited file, or one written by older code or by hand, has no matching proof and is
    checked).
    """
    return _proof(fingerprint(raw), month)


def raw_content(proof: str) -> str:
    """The fingerprint of the bars a raw rules proof was made on ("" when it has none):
    what an aggregated file records of the raw bars it was built from."""
    return proof[proof.index(_FP) :] if _FP in proof else ""


def built_from_older_raw(raw: FileIdentity | None, bars: FileIdentity | None) -> bool:
    """Whether ``bars`` (an aggregated file's identity) says it was built from other raw bars
    than the raw file's now (a raw month rebuilt alone since). Unknown either way: False."""
    if raw is None or bars is None or not bars.built_from:
        return False
    now = raw_content(raw.raw_rules)
    return bool(now) and now != bars.built_from


def _proof(content: str, month: Month) -> str:
    rules = ",".join(RAW_BLOCKING_RULES)
    return f"{CODE_VERSION}; raw rules v{RAW_RULES_VERSION} ({rules}); {month}; {_FP}{content}"


# Before the fingerprint, at the end of a proof: the scheme, so that a proof of another
# scheme (an earlier fingerprint) only makes the rules run again, never a refusal.
_FP = "fingerprint v2 xxh3-128 "

ProofStatus = Literal["proven", "changed", "unproven"]


def raw_proof_status(raw: pd.DataFrame, identity: FileIdentity | None, month: Month) -> ProofStatus:
    """What the identity of the file ``raw`` came from says of these bars (the fingerprint
    is recomputed, ~10 ms a month): ``proven``, the blocking raw rules passed on exactly
    them for ``month``; ``changed``, the file's bars are not those it was written with (its
    identity kept through an edit: nothing it says holds); ``unproven``, no proof, or one of
    other rules or another month (the rules must run)."""
    if identity is None or not identity.raw_rules:
        return "unproven"
    content = fingerprint(raw)
    if identity.raw_rules == _proof(content, month):
        return "proven"
    _, found, recorded = identity.raw_rules.rpartition(_FP)
    return "changed" if found and recorded != content else "unproven"


def raw_rules_proven(raw: pd.DataFrame, identity: FileIdentity | None, month: Month) -> bool:
    """True when the identity of the file ``raw`` came from proves that the blocking raw
    rules passed on exactly these bars for ``month``."""
    return raw_proof_status(raw, identity, month) == "proven"


def run_raw_rules(
    raw: pd.DataFrame,
    month: Month,
    instrument: Instrument,
    *,
    asof: pd.Timestamp | None = None,
    rules: Iterable[str] = RAW_RULES,
) -> list[RuleResult]:
    """The rules for a raw 1s partition (all of :data:`RAW_RULES` unless ``rules`` says which).

    ``rules=RAW_BLOCKING_RULES`` runs only those whose failure stops the data (what the
    aggregation step re-checks); ``asof`` skips calendar sessions not over yet.
    """
    wanted = set(rules)
    unknown = wanted - set(RAW_RULES)
    if unknown:
        raise ValueError(f"not raw rules: {', '.join(sorted(unknown))}")
    runners: dict[str, Callable[[], RuleResult]] = {
        RULE_SCHEMA: lambda: check_schema(raw, negative_prices=instrument.negative_prices),
        RULE_TIME_ORDER: lambda: check_time_order(raw),
        RULE_OHLC: lambda: check_ohlc(raw),
        RULE_IN_MONTH: lambda: check_inside_month(raw, month),
        RULE_ALIGNED: lambda: check_alignment(raw, ONE_SECOND),
        RULE_NO_ROLL_IN_BAR: lambda: check_rolls(raw),
        RULE_CALENDAR: lambda: (
            calendar_skipped(instrument, month)
            if (calendar := calendar_for(instrument)) is None
            else check_calendar(raw, month, calendar, asof=asof)
        ),
    }
    return [runners[name]() for name in RAW_RULES if name in wanted]


def reconcile_ahead(
    raw: pd.DataFrame,
    plan: Mapping[Timeframe, Timeframe | None],
    built: Mapping[Timeframe, pd.DataFrame] | None = None,
) -> None:
    """Begin, in a worker thread, what reconciliation recomputes for the timeframes of
    ``plan`` (see :func:`~.aggregate.built_from`): without ``built``, those built from
    ``raw`` itself, from ``raw``, so that it runs while the kernel aggregates; with
    ``built`` (the bars just aggregated), the others, each from the finer bars it was built
    from, so that it runs while the finer timeframe's rules do. :func:`run_aggregated_rules`
    of bars reconciled from that very frame takes it."""
    for timeframe, finer in plan.items():
        if built is None and finer is None:
            expect_ahead(raw, timeframe)
        elif built is not None and finer is not None and finer in built:
            expect_ahead(built[finer], timeframe)


def run_aggregated_rules(
    agg: pd.DataFrame,
    raw: pd.DataFrame,
    month: Month,
    timeframe: Timeframe,
    *,
    built_from: pd.DataFrame | None = None,
    negative_prices: bool = False,
) -> list[RuleResult]:
    """All rules for an aggregated partition, in :data:`AGGREGATED_RULES` order.

    Calendar completeness is a raw-only rule: reconciliation proves the aggregated frame
    covers the same sessions. ``built_from``: the finer bars ``agg`` was built from, already
    reconciled with ``raw`` (see :func:`~.comparison.check_reconciliation`);
    ``negative_prices``: the instrument's (see :class:`~.catalog.Instrument`).
    """
    # The (bin, contract) pairs of the bars it comes from, computed once for both rules (inside
    # the first that asks, so an unusable frame fails that rule, not the call).
    base = raw if built_from is None else built_from
    pairs = functools.cache(functools.partial(bins_in_raw, base, timeframe))
    return [
        check_schema(agg, negative_prices=negative_prices),
        check_time_order(agg),
        check_ohlc(agg),
        check_inside_month(agg, month),
        check_alignment(agg, timeframe),
        check_reconciliation(agg, raw, timeframe, built_from, pairs),
        check_rolls_aggregated(agg, raw, timeframe, built_from, pairs),
    ]
