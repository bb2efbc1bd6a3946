"""Every command in README.md, run as a user would run it, in a scratch copy of the project.

The README's ```bash and ```python blocks are read from the file itself, so a command that is
added, removed or changed there is tested as it is written. Each line of a bash block must be
known below (an unknown one fails :func:`test_every_readme_command_is_covered`); they run in
a sandbox folder with its own HOME, DAGSTER_HOME and data folder, against the fake Databento
gateway (the real client, over HTTPS on 127.0.0.1), and the gateway's request counts prove
what a command cost. The two set-up commands are covered elsewhere: the main one by
``test_dagster_assets.test_readme_main_command_runs``, the test one by comparing it with what
``.ci/run`` runs.
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

from dbento_assets_tests.gateway import TEST_KEY, FakeGateway, gateway_fixture  # noqa: F401

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


SETUP_MAIN = r"pip install -e \. && DBENTO_SOURCE=demo dagster asset materialize"
SETUP_TESTS = r"pip install -e '\.\[test,deploy\]' && pytest$"
COPY_ENV = r"^cp \.env\.example \.env$"
DAGSTER_HOME_SETUP = r"^mkdir -p ~/dagster_home && cp deploy/dagster\.yaml"
ESTIMATE = r"^python -m dbento_assets\.estimate "
DAGSTER_DEV = r"^dagster dev$"
MATERIALIZE_ONE = r"^dagster asset materialize -m dbento_assets --select '\*' --partition"
MATERIALIZE_FORCE = r"^dagster asset materialize .*\"force\": true"
BACKFILL = r"^python -m dbento_assets\.backfill --symbol ES --start 2024-01 --end 2024-03$"
BACKFILL_MISSING = r"^python -m dbento_assets\.backfill .* --missing-only$"
REPORT = r"^python -m dbento_assets\.report "
SCHEDULE_START = r"^dagster schedule start monthly_bars_schedule"
POOL_LIMIT = r"^dagster instance concurrency set databento \d+$"
BENCHMARK = r"^python benchmarks/bench_month\.py$"
KNOWN = [
    SETUP_MAIN,
    SETUP_TESTS,
    COPY_ENV,
    DAGSTER_HOME_SETUP,
    ESTIMATE,
    DAGSTER_DEV,
    MATERIALIZE_ONE,
    MATERIALIZE_FORCE,
    BACKFILL,
    BACKFILL_MISSING,
    REPORT,
    SCHEDULE_START,
    POOL_LIMIT,
    BENCHMARK,
]


def test_every_readme_command_is_covered():
    for line in bash_lines():
        matches = [p for p in KNOWN if re.search(p, line)]
        assert len(matches) == 1, f"README command not covered by a test: {line!r}"


def test_readme_test_command_is_what_ci_runs():
    command = line_matching(SETUP_TESTS)
    assert command.startswith("python3 -m venv .venv && . .venv/bin/activate && ")
    install_and_test = command.split(" && ", 2)[2]
    assert install_and_test in (REPO / ".ci" / "run").read_text()


class Sandbox:
    """A scratch copy of what a user has: the project files, a home, a DAGSTER_HOME."""

    def __init__(self, root: Path, gateway: FakeGateway) -> None:
        self.root = root
        self.gateway = gateway
        for name in ("pyproject.toml", "workspace.yaml", ".env.example"):
            shutil.copy(REPO / name, root / name)
        for folder in ("deploy", "benchmarks"):
            shutil.copytree(REPO / folder, root / folder)
        self.home = root / "home"
        self.home.mkdir()
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("DBENTO_", "DATABENTO_", "DAGSTER_"))
        }
        self.env.update(
            HOME=str(self.home),
            DAGSTER_HOME=str(self.home / "dagster_home"),
            DBENTO_GATEWAY=gateway.url,
            DBENTO_RETRY_BACKOFF_SECONDS="0",
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        )

    def run(self, command: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            ["bash", "-c", command],
            cwd=self.root,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done

    def data(self, *parts: str) -> Path:
        return self.root.joinpath("data", *parts)


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


def test_1_settings_files(sandbox):
    sandbox.run(line_matching(COPY_ENV))
    env_file = sandbox.root / ".env"
    assert "\nDATABENTO_API_KEY=\n" in env_file.read_text()
    # What the README asks next: put the key after DATABENTO_API_KEY= in a text editor.
    env_file.write_text(
        env_file.read_text().replace("\nDATABENTO_API_KEY=\n", f"\nDATABENTO_API_KEY={TEST_KEY}\n")
    )
    sandbox.run(line_matching(DAGSTER_HOME_SETUP))
    assert (sandbox.home / "dagster_home" / "dagster.yaml").is_file()


def test_2_estimate_costs_nothing_and_prints_a_total(sandbox):
    command = line_matching(ESTIMATE)
    out = sandbox.run(command).stdout
    assert "total" in out.lower()
    assert sandbox.gateway.count(GET_RANGE) == 0
    assert sandbox.gateway.count(GET_COST) == 6  # ES and NQ x 3 months, one free call each


def test_3_materialize_one_partition(sandbox):
    before = sandbox.gateway.count(GET_RANGE)
    sandbox.run(line_matching(MATERIALIZE_ONE))
    assert sandbox.gateway.count(GET_RANGE) == before + 1
    assert sandbox.data("raw_1s", "NQ", "NQ_2024_02.parquet").is_file()
    for label in ("15s", "30s", "1min"):
        assert sandbox.data("aggregated", label, f"NQ_2024_02_{label}.parquet").is_file()


def test_4_backfill_a_range_then_resume_costs_nothing(sandbox):
    before = sandbox.gateway.count(GET_RANGE)
    out = sandbox.run(line_matching(BACKFILL)).stdout
    assert sandbox.gateway.count(GET_RANGE) == before + 3
    for month in ("01", "02", "03"):
        assert sandbox.data("aggregated", "1min", f"ES_2024_{month}_1min.parquet").is_file()
    assert "2024-03-01|ES" in out
    sandbox.run(line_matching(BACKFILL_MISSING))
    assert sandbox.gateway.count(GET_RANGE) == before + 3


def test_5_force_downloads_again(sandbox):
    cached = sandbox.data("dbn", "ES", "ES_2024_01.ohlcv-1s.dbn.zst")
    assert cached.is_file()
    before = sandbox.gateway.count(GET_RANGE)
    sandbox.run(line_matching(MATERIALIZE_FORCE))
    assert sandbox.gateway.count(GET_RANGE) == before + 1


def test_6_report_and_schedule_and_pool(sandbox):
    command = line_matching(REPORT)
    sandbox.run(command)
    out_file = sandbox.root / command.split("--out", 1)[1].split()[0]
    text = out_file.read_text()
    assert "ES" in text and "NQ" in text and "2024-03" in text
    sandbox.run(line_matching(SCHEDULE_START))
    sandbox.run(line_matching(POOL_LIMIT))
    shown = sandbox.run("dagster instance concurrency get databento").stdout
    limit = line_matching(POOL_LIMIT).split()[-1]
    assert re.search(rf"\b{limit}\b", shown), shown


def test_7_python_snippets_read_the_bars(sandbox):
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


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_8_dagster_dev_serves_the_code_location(sandbox):
    if not _port_free(3000):
        pytest.skip("port 3000 is taken on this machine")
    process = subprocess.Popen(
        ["bash", "-c", line_matching(DAGSTER_DEV)],
        cwd=sandbox.root,
        env=sandbox.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        query = "{ repositoriesOrError { ... on RepositoryConnection { nodes { name "
        query += "location { name } assetNodes { assetKey { path } } } } } }"
        deadline = time.monotonic() + 180
        nodes: list[dict] = []
        while time.monotonic() < deadline and not nodes:
            time.sleep(2)
            try:
                answer = requests.post(
                    "http://127.0.0.1:3000/graphql", json={"query": query}, timeout=10
                ).json()
                nodes = answer["data"]["repositoriesOrError"].get("nodes", [])
            except (requests.RequestException, KeyError, TypeError, ValueError):
                continue
        assert nodes, "dagster dev did not serve the code location within 3 minutes"
        assert nodes[0]["location"]["name"] == "dbento_assets"
        keys = {"/".join(a["assetKey"]["path"]) for a in nodes[0]["assetNodes"]}
        assert {"raw_1s_bars", "bars_15s", "bars_30s", "bars_1min"} <= keys
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def test_9_benchmark_prints_its_ratios(sandbox):
    out = sandbox.run(line_matching(BENCHMARK), timeout=900).stdout
    assert "reference" in out and "x faster" in out and "validation rules" in out
