"""The ``build_range`` job: a range of partitions in one run, each partition still its own run.

A UI backfill starts one run per partition, and each run pays Dagster's start-up again (a new
process, the code location loaded, about 4-6 s), which dwarfs a month's work when the raw
months are already stored. Batching partitions into one ranged run
(``BackfillPolicy.multi_run``) would lose each partition's check status in Dagster 1.13. This
job is launched once (the launchpad, or ``dagster job launch``); its one op builds the range
with the ``dbento build`` loop: every partition is a run of its own in the same instance (its
materializations, files and check results as in any run), in this run's process.
"""


from dagster import Config, Definitions, Failure, JobDefinition, OpExecutionContext, job, op
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

    @op(description="Build each partition of the range as a run of its own, in this process.")
    def build_each_partition(context: OpExecutionContext, config: BuildRangeConfig) -> None:
        lines = _LogLines(context)
        try:
            partitions = backfill.plan_partitions(
                backfill.month_symbol_partitions(defs), config.symbols, config.start, config.end
            )
            text = backfill.build_range(
                defs,
                context.instance,
                partitions,
                select=config.select,
                force=config.force,
                missing_only=config.missing_only,
                tags={backfill.RANGE_TAG: context.run_id},
                out=lines,  # type: ignore[arg-type]
                progress=lines,  # type: ignore[arg-type]
            )
        except (backfill.UsageError, backfill.RangeFailed) as exc:
            raise Failure(str(exc)) from None
        context.log.info(text)

    @job(name=JOB_NAME, description=__doc__.split("\n\n")[1].replace("\n", " "))
    def build_range() -> None:
        build_each_partition()

    return build_range
