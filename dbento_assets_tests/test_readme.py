"""Every command in README.md, run as a newcomer would run it, in order, in a scratch folder.

The README's ```bash and ```python blocks are read from the file itself, so a command that is
added, removed or changed there is tested as it is written. Each line of a bash block must be
known below (an unknown one fails :func:`test_every_readme_command_is_covered`); they run in
a sandbox folder with its own HOME, no ``DAGSTER_HOME`` (so the project's own history,
``.dagster_home``, is what is tested) and a fresh data folder, against the fake Databento
gateway (the real client, over HTTPS on 127.0.0.1), and the gateway's request counts prove
what a command cost. The tests assert on what the terminal shows: the summary line of a build,
one-sentence errors, the report's line. The install part of the two set-up commands is not
run (the test environment is installed already); the first command's build part is, and the
test command is compared with what ``.ci/run`` runs.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from dagster import DagsterInstance

from dbento_assets_tests.gateway import TEST_KEY, FakeGateway

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
GET_RANGE = "timeseries.get_range"
GET_COST = "metadata.get_cost"

pytestmark = pytest.mark.slow


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def bash_lines() -> list[str]:
    return [
        line.strip()
        for block in blocks("bash")
        for line in block.splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]


def line_matching(pattern: str) -> str:
    found = [line for line in bash_lines() if re.search(pattern, line)]
    assert len(found) == 1, f"expected one README command matching {pattern!r}, got {found}"
    return found[0]


SETUP_MAIN = r"pip install -e \. && DBENTO_SOURCE=demo dbento build --symbol ES --start 2024-01$"
SETUP_TESTS = r"pip install -e '\.\[test,deploy\]' && pytest$"
ACTIVATE = r"^\. \.venv/bin/activate$"
STATUS = r"^dbento status$"
UI = r"^dbento ui$"
REPORT = r"^dbento report$"
RESUME_DEMO = r"^DBENTO_SOURCE=demo dbento build --symbol ES --start 2024-01 --missing-only$"
COPY_ENV = r"^cp \.env\.example dbento\.env$"
CHECK_KEY = r"^dbento check-key$"
FORGET_DEMO = r"^rm -rf data \.dagster_home$"
ESTIMATE = r"^dbento estimate "
BUILD = r"^dbento build --symbol ES,NQ --start 2024-01 --end 2024-03$"
BUILD_MISSING = r"^dbento build --symbol ES,NQ --start 2024-01 --end 2024-03 --missing-only$"
MATERIALIZE_ONE = r"^dagster asset materialize -m dbento_assets --select '\*' --partition"
MATERIALIZE_FORCE = r"^dagster asset materialize .*\"force\": true"
SCHEDULE_START = r"^dagster schedule start monthly_bars_schedule -m dbento_assets$"
POOL_LIMIT = r"^dbento dagster instance concurrency set databento \d+$"
BENCHMARK = r"^python benchmarks/bench_month\.py$"
KNOWN = [
    SETUP_MAIN,
    SETUP_TESTS,
    ACTIVATE,
    STATUS,
    UI,
    REPORT,
    RESUME_DEMO,
    COPY_ENV,
    CHECK_KEY,
    FORGET_DEMO,
    ESTIMATE,
    BUILD,
    BUILD_MISSING,
    MATERIALIZE_ONE,
    MATERIALIZE_FORCE,
    SCHEDULE_START,
    POOL_LIMIT,
    BENCHMARK,
]
SUMMARY = re.compile(
    r"^Done in [\d.]+ s: (?P<n>\d+) partition\(s\), (?P<built>\d+) built, (?P<skipped>\d+) "
    r"skipped \(already built\), (?P<failed>\d+) failed; (?P<rows>[\d,]+) rows in "
    r"(?P<files>\d+) file\(s\) in \./data; Databento cost \$(?P<cost>[\d.,]+)\.$",
    re.MULTILINE,
)


def test_every_readme_command_is_covered():
    for line in bash_lines():
        matches = [p for p in KNOWN if re.search(p, line)]
        assert len(matches) == 1, f"README command not covered by a test: {line!r}"


def test_readme_test_command_is_what_ci_runs():
    command = line_matching(SETUP_TESTS)
    assert command.startswith("python3 -m venv .venv && . .venv/bin/activate && ")
    install_and_test = command.split(" && ", 2)[2]
    assert install_and_test in (REPO / ".ci" / "run").read_text()


def summary_of(out: str) -> dict[str, str]:
    found = SUMMARY.search(out)
    assert found, f"no summary line in:\n{out}"
    return found.groupdict()


class Sandbox:
    """A scratch copy of what a user has: the project files, a home, no DAGSTER_HOME."""

    def __init__(self, root: Path, gateway: FakeGateway) -> None:
        self.root = root
        self.gateway = gateway
        for name in ("pyproject.toml", "workspace.yaml", ".env.example"):
            shutil.copy(REPO / name, root / name)
        for folder in ("deploy", "benchmarks"):
            shutil.copytree(REPO / folder, root / folder)
        self.home = root.parent / f"{root.name}-home"
        self.home.mkdir()
        # `pip install -e .` would put a `dbento` script on the PATH; the test environment may
        # have the package on PYTHONPATH instead, so an equivalent script stands in for it.
        bin_dir = self.home / "bin"
        bin_dir.mkdir()
        shim = bin_dir / "dbento"
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m dbento_assets.cli "$@"\n')
        shim.chmod(0o755)
        # And the virtual environment's activate script: the test's interpreter comes first.
        activate = root / ".venv" / "bin" / "activate"
        activate.parent.mkdir(parents=True)
        activate.write_text(f'export PATH="{bin_dir}:{Path(sys.executable).parent}:$PATH"\n')
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("DBENTO_", "DATABENTO_", "DAGSTER_"))
        }
        self.env.update(
            HOME=str(self.home),
            DBENTO_GATEWAY=gateway.url,
            DBENTO_RETRY_BACKOFF_SECONDS="0",
            PATH=os.pathsep.join(
                [str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]]
            ),
        )

    def run(
        self, command: str, timeout: float = 600, status: int = 0
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            ["bash", "-c", command],
            cwd=self.root,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert done.returncode == status, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done

    def data(self, *parts: str) -> Path:
        return self.root.joinpath("data", *parts)

    @property
    def history(self) -> Path:
        return self.root / ".dagster_home"


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, request) -> Iterator[Sandbox]:
    # The gateway fixture is function-scoped; a module needs its own long-lived one.
    gateway = FakeGateway()
    ca_file = gateway.start(tmp_path_factory.mktemp("readme-gateway"))
    box = Sandbox(tmp_path_factory.mktemp("readme-user"), gateway)
    box.env.update(REQUESTS_CA_BUNDLE=str(ca_file), NO_PROXY="127.0.0.1,localhost")
    try:
        yield box
    finally:
        gateway.stop()


def test_01_first_build_prints_a_summary_and_keeps_a_history(sandbox):
    command = line_matching(SETUP_MAIN)
    out = sandbox.run(command[command.index("DBENTO_SOURCE=demo") :]).stdout
    assert out.splitlines()[0].split()[:2] == ["2024-01-01|ES", "ok"]
    summary = summary_of(out)
    assert (summary["n"], summary["built"], summary["skipped"], summary["failed"]) == (
        "1",
        "1",
        "0",
        "0",
    )
    assert summary["files"] == "4" and int(summary["rows"].replace(",", "")) > 1_000_000
    assert sandbox.data("raw_1s", "ES", "ES_2024_01.parquet").is_file()
    for label in ("15s", "30s", "1min"):
        assert sandbox.data("aggregated", label, f"ES_2024_01_{label}.parquet").is_file()
    assert (sandbox.history / "dagster.yaml").read_text() == (
        REPO / "deploy" / "dagster.yaml"
    ).read_text()
    assert (
        f'DAGSTER_HOME="${{DAGSTER_HOME:-{sandbox.history}}}"'
        in (sandbox.root / ".env").read_text()
    )
    assert sandbox.gateway.count() == 0  # the demo asks Databento nothing


def test_02_status_shows_the_month_and_its_checks(sandbox):
    sandbox.run(line_matching(ACTIVATE))  # a stand-in: the test environment is installed
    out = sandbox.run(line_matching(STATUS)).stdout
    assert re.search(r"^2024-01\s+4/4 files, pass\s+-", out, re.MULTILINE), out
    assert f"history in {sandbox.history}" in out


def _graphql(port: int, query: str) -> dict:
    return requests.post(
        f"http://127.0.0.1:{port}/graphql", json={"query": query}, timeout=10
    ).json()


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PARTITIONS = """{ assetNodes { assetKey { path } partitionStats { numMaterialized numFailed } } }"""


def test_03_ui_shows_the_first_build_as_materialized(sandbox):
    # The README's command, on a free port: port 3000 may be taken on a shared machine.
    port = _free_port()
    process = subprocess.Popen(
        ["bash", "-c", f"{line_matching(UI)} --port {port}"],
        cwd=sandbox.root,
        env=sandbox.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        stats: dict[str, dict] = {}
        while time.monotonic() < deadline and not stats:
            time.sleep(2)
            try:
                nodes = _graphql(port, PARTITIONS)["data"]["assetNodes"]
                stats = {"/".join(n["assetKey"]["path"]): n["partitionStats"] for n in nodes}
            except (requests.RequestException, KeyError, TypeError, ValueError):
                continue
        assert stats, "dbento ui did not serve the code location within 3 minutes"
        assert set(stats) == {"raw_1s_bars", "bars_15s", "bars_30s", "bars_1min"}
        for asset, counts in stats.items():
            assert counts == {"numMaterialized": 1, "numFailed": 0}, (asset, counts)
        # A second UI on the same port: one sentence, what to do.
        busy = sandbox.run(f"{line_matching(UI)} --port {port}", status=2)
        assert busy.stderr.strip().splitlines() == [
            f"error: port {port} is already in use, probably by a dagster dev started earlier: "
            f"stop it with Ctrl-C in its terminal, or run dbento ui --port {port + 1}."
        ]
    finally:
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C, as the README says
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
    # Nothing sends the user to a tool this project does not install (Dagster's `dg dev`).
    said = process.stderr.read() if process.stderr else ""
    assert "dg dev" not in said and "superseded" not in said, said[-3000:]


def test_04_report_lists_the_month(sandbox):
    out = sandbox.run(line_matching(REPORT)).stdout
    assert out.strip() == (
        "logs/validation_report.md: 1 partitions checked, 0 with failed ERROR checks, "
        "0 with warnings only."
    )
    text = (sandbox.root / "logs" / "validation_report.md").read_text()
    assert "| 2024-01 | pass | - | - | - | - |" in text


def test_05_resume_skips_the_first_build(sandbox):
    out = sandbox.run(line_matching(RESUME_DEMO)).stdout
    assert out.splitlines()[0].split()[:3] == ["2024-01-01|ES", "skipped", "already"]
    summary = summary_of(out)
    assert (summary["built"], summary["skipped"], summary["files"]) == ("0", "1", "0")


@pytest.mark.parametrize(
    ("command", "words"),
    [
        (
            "DBENTO_SOURCE=demo dbento build --partition '2024-01|ES'",
            "error: '2024-01|ES' is not a partition of this code location: a partition key is "
            "YYYY-MM-01|SYMBOL, for example 2024-01-01|ES",
        ),
        (
            "dbento build --symbol ES --start 2024-02",
            "error: DBENTO_SOURCE=databento needs a Databento API key and none is set.",
        ),
        (
            "DATABENTO_API_KEY=db-x dbento build --symbol ES --start 2024-02",
            "error: The data folder ",
        ),
        (
            "DBENTO_SOURCE=dbn DBENTO_DBN_DIR=./no-such-folder dbento build --symbol ES "
            "--start 2024-02",
            "error: DBENTO_DBN_DIR='no-such-folder' is not a folder",
        ),
        (
            "echo 'timeframes = [' > bad.toml && DBENTO_CATALOG=bad.toml DBENTO_SOURCE=demo "
            "dbento build --symbol ES --start 2024-02",
            "error: ",
        ),
        (
            "DBENTO_SOURCE=demo dbento estimate --start 2024-01",
            "error: the estimate prices downloads from Databento, and DBENTO_SOURCE=demo "
            "downloads nothing and costs nothing",
        ),
    ],
)
def test_06_mistakes_end_in_one_sentence(sandbox, command, words):
    done = sandbox.run(command, status=2)
    assert done.stderr.startswith(words), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Traceback" not in done.stderr and "--missing-only" not in done.stderr
    assert done.stdout == ""
    assert sandbox.gateway.count() == 0


def test_07_settings_file_and_key(sandbox):
    sandbox.run(line_matching(COPY_ENV))
    settings = sandbox.root / "dbento.env"
    assert "\nDATABENTO_API_KEY=\n" in settings.read_text()
    # What the README asks next: put the key after DATABENTO_API_KEY= in a text editor.
    settings.write_text(
        settings.read_text().replace("\nDATABENTO_API_KEY=\n", f"\nDATABENTO_API_KEY={TEST_KEY}\n")
        + "DBENTO_SOURCE=databento\n"  # and, uncommented, the real source
    )
    out = sandbox.run(line_matching(CHECK_KEY)).stdout
    assert out.startswith("The key works: Databento answered (ES ") and "would cost $" in out
    assert sandbox.gateway.count(GET_RANGE) == 0
    # The shell's DBENTO_SOURCE=demo wins over dbento.env's databento: with the file's source
    # the demo folder would refuse real data in one sentence (exit status 2).
    out = sandbox.run(line_matching(RESUME_DEMO)).stdout
    assert summary_of(out)["skipped"] == "1"
    sandbox.run(line_matching(FORGET_DEMO))
    assert not sandbox.data().exists() and not sandbox.history.exists()


def test_08_estimate_costs_nothing_and_prints_a_total(sandbox):
    out = sandbox.run(line_matching(ESTIMATE)).stdout
    assert "total" in out.lower()
    assert sandbox.gateway.count(GET_RANGE) == 0
    assert sandbox.gateway.count(GET_COST) == 7  # check-key's one, then ES and NQ x 3 months


def test_09_build_a_range_then_resume_costs_nothing(sandbox):
    out = sandbox.run(line_matching(BUILD)).stdout
    assert sandbox.gateway.count(GET_RANGE) == 6
    summary = summary_of(out)
    assert (summary["n"], summary["built"], summary["failed"], summary["files"]) == (
        "6",
        "6",
        "0",
        "24",
    )
    assert float(summary["cost"]) > 0
    for month in ("01", "02", "03"):
        assert sandbox.data("aggregated", "1min", f"NQ_2024_{month}_1min.parquet").is_file()
    out = sandbox.run(line_matching(BUILD_MISSING)).stdout
    assert (summary_of(out)["skipped"], summary_of(out)["cost"]) == ("6", "0.0000")
    assert sandbox.gateway.count(GET_RANGE) == 6


def test_10_dagster_asset_materialize_uses_the_same_history(sandbox):
    done = sandbox.run(line_matching(MATERIALIZE_ONE))
    assert "BackfillPolicies" not in done.stderr  # a mix of policies on purpose, see batches
    assert sandbox.gateway.count(GET_RANGE) == 7
    assert sandbox.data("aggregated", "1min", "ES_2024_04_1min.parquet").is_file()
    out = sandbox.run(line_matching(STATUS)).stdout
    assert re.search(r"^2024-04\s+4/4 files, pass", out, re.MULTILINE), out
    sandbox.run(line_matching(MATERIALIZE_FORCE))
    assert sandbox.gateway.count(GET_RANGE) == 8
    with DagsterInstance.from_config(str(sandbox.history)) as instance:
        assert len(instance.get_run_records()) == 6 + 2


def test_11_schedule_and_pool(sandbox):
    sandbox.run(line_matching(SCHEDULE_START))
    sandbox.run(line_matching(POOL_LIMIT))
    shown = sandbox.run("dbento dagster instance concurrency get databento").stdout
    limit = line_matching(POOL_LIMIT).split()[-1]
    assert re.search(rf"\b{limit}\b", shown), shown
    with DagsterInstance.from_config(str(sandbox.history)) as instance:
        states = instance.all_instigator_state()
        assert [s.name for s in states if s.is_running] == ["monthly_bars_schedule"]


def test_12_python_snippets_read_the_bars(sandbox):
    snippets = blocks("python")
    assert any("read_parquet" in s for s in snippets) and any("duckdb" in s for s in snippets)
    for code in snippets:
        done = subprocess.run(
            [sys.executable, "-c", code],
            cwd=sandbox.root,
            env=sandbox.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, code + done.stderr
        assert "ES" in done.stdout


def test_13_benchmark_prints_its_ratios(sandbox):
    out = sandbox.run(line_matching(BENCHMARK), timeout=900).stdout
    assert "reference" in out and "x faster" in out and "validation rules" in out
    # The floor of the whole-month design: in one process, and through Dagster twice.
    assert len(re.findall(r"floor: .* = \d+ MB = 0\.\d\d of the seed's peak", out)) == 3
