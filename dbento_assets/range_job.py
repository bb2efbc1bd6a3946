"""The ``build_range`` job: a range of partitions in one run, each partition still its own run.

A UI backfill starts one run per partition (for the bars, one per ``DBENTO_BACKFILL_BATCH``
partitions, see :mod:`dbento_assets.batches`), and each run pays Dagster's start-up again (a
new process, the code location loaded, about 4-6 s), which dwarfs a month's work when the
raw months are already stored. This job, which builds the downloads too, is launched once
(the launchpad, or ``dagster job launch``). Its run splits the range into
``DBENTO_RANGE_WORKERS`` shares (default: one per CPU core), each a step in a process of its
own (Dagster's multiprocess executor), and each share builds its partitions with the
``dbento build`` loop: every partition is a run of its own in the same instance (its
materializations, files and check results as in any run).
"""

from dagster import (
    Config,
    DagsterRunStatus,
    Definitions,
    Failure,
    JobDefinition,
    OpDefinition,
    OpExecutionContext,
    RunConfig,
    config_mapping,
    job,
    multiprocess_executor,
    op,
)
from pydantic import Field

from dbento_assets import backfill

JOB_NAME = "build_range"


class BuildRangeConfig(Config):
    """Which partitions to build, as ``dbento build`` takes them."""

    start: str = Field(description="First month, YYYY-MM.")
    end: str | None = Field(default=None, description="Last month, YYYY-MM (default: start).")
    symbols: list[str] = Field(
        default_factory=list, description="Catalog symbols (default: every symbol)."
    )
    select: str | None = Field(
        default=None,
        description="Assets to build, such as 'bars_15s,bars_1min' (default: all).",
    )
    force: bool = Field(
        default=False, description="Download again even months already cached (costs money)."
    )
    missing_only: bool = Field(
        default=False, description="Skip partitions where every selected asset is built."
    )


class ShareConfig(BuildRangeConfig):
    """One share of the range: every ``shares``-th partition from the ``share``-th."""

    share: int = Field(ge=0)
    shares: int = Field(ge=1)


class _LogLines:
    """A text stream whose lines go to the run's log (one line per partition)."""

    def __init__(self, context: OpExecutionContext) -> None:
        self.context = context

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if line.strip():
                self.context.log.info(line)
        return len(text)

    def flush(self) -> None:
        pass


def build_range_job(defs: Definitions) -> JobDefinition:
    """The ``build_range`` job over ``defs`` (the code location's assets and resources)."""
    workers = backfill.range_workers()
    shares = [_share_op(defs, index) for index in range(workers)]

    @config_mapping
    def one_config_for_every_share(config: BuildRangeConfig) -> RunConfig:
        given = config.model_dump()
        return RunConfig(
            ops={
                share.name: ShareConfig(**given, share=index, shares=workers)
                for index, share in enumerate(shares)
            }
        )

    @job(
        name=JOB_NAME,
        description=(
            "Build a range of symbol-months in one run (start-up paid once per share); each "
            "partition is still a run of its own, with its materializations and check results."
        ),
        config=one_config_for_every_share,
        executor_def=multiprocess_executor.configured({"max_concurrent": workers}),
    )
    def build_range() -> None:
        for share in shares:
            share()

    return build_range


def _share_op(defs: Definitions, index: int) -> OpDefinition:
    @op(
        name=f"build_share_{index}",
        description="Build this share's partitions, each as a run of its own, in this process.",
    )
    def build_share(context: OpExecutionContext, config: ShareConfig) -> None:
        lines = _LogLines(context)
        try:
            partitions = backfill.plan_partitions(
                backfill.month_symbol_partitions(defs), config.symbols, config.start, config.end
            )
            text = backfill.build_range(
                defs,
                context.instance,
                partitions[config.share :: config.shares],
                select=config.select,
                force=config.force,
                missing_only=config.missing_only,
                tags={backfill.RANGE_TAG: context.run_id},
                out=lines,
                progress=lines,
                stop=lambda: _cancelling(context),
            )
        except (backfill.UsageError, backfill.RangeFailed) as exc:
            raise Failure(str(exc)) from None
        context.log.info(text)

    return build_share


def _cancelling(context: OpExecutionContext) -> bool:
    # A cancelled run's interrupt reaches the partition's own run, which fails, and the loop
    # would go on: so the job's run is asked before each partition (its status, in the
    # instance) and nothing new starts once it is being cancelled.
    run = context.instance.get_run_by_id(context.run_id)
    return run is not None and run.status in (
        DagsterRunStatus.CANCELING,
        DagsterRunStatus.CANCELED,
    )
