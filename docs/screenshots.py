"""Refresh the README's screenshots of the Dagster UI: ``python docs/screenshots.py``.

It builds two demo partitions (ES and NQ, January 2024) in a scratch project folder with
``dbento build``, starts ``dbento ui`` there on a free port, waits until the code location has
loaded, and has headless Chromium (``chromium`` or ``chromium-browser`` on the PATH, or
``CHROMIUM``) save each page of :data:`PAGES` as a PNG in ``docs/``. Everything it starts is
stopped on the way out, and the scratch folder is deleted.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

DOCS = Path(__file__).resolve().parent
REPO = DOCS.parent
# (file, page): the lineage of the raw asset (every asset, unfolded), its partitions with one
# selected, and its checks.
PAGES = (
    ("asset_graph.png", "/assets/raw_1s_bars?view=lineage&lineageScope=downstream"),
    ("partitions.png", "/assets/raw_1s_bars?view=partitions&partition=2024-01-01%7CES"),
    ("checks.png", "/assets/raw_1s_bars?view=checks"),
)
# The UI greets a new user with a "Join the Dagster community" dialog until it has been
# dismissed once; dismissing it is this mutation (it writes a file under $HOME/.dagster).
DISMISS_WELCOME = "mutation { setNuxSeen }"
WINDOW = "1400,850"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
)


def chromium() -> str:
    for name in (os.environ.get("CHROMIUM", ""), "chromium", "chromium-browser"):
        if name and shutil.which(name):
            return str(shutil.which(name))
    raise SystemExit(
        "no chromium on the PATH: install it (apt-get install chromium) or set CHROMIUM"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_ui(port: int, timeout: float = 180) -> None:
    query = "{ assetNodes { assetKey { path } } }"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            answer = requests.post(
                f"http://127.0.0.1:{port}/graphql", json={"query": query}, timeout=10
            ).json()
            if answer["data"]["assetNodes"]:
                return
        except (requests.RequestException, KeyError, TypeError, ValueError):
            pass
        time.sleep(2)
    raise SystemExit(f"the UI did not answer on port {port} within {timeout:.0f} s")


def shoot(browser: str, url: str, target: Path) -> None:
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    try:
        subprocess.run(
            [
                browser,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={profile}",
                f"--window-size={WINDOW}",
                "--virtual-time-budget=20000",
                f"--screenshot={target}",
                url,
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    print(f"{target.relative_to(REPO)} <- {url}")


def main() -> None:
    browser = chromium()
    with tempfile.TemporaryDirectory(prefix="dbento-screenshots-") as scratch:
        folder = Path(scratch)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DBENTO_", "DAGSTER_"))}
        env["DBENTO_SOURCE"] = "demo"
        env["HOME"] = str(folder)  # the UI's "seen the welcome" file stays in the scratch folder
        cli = [sys.executable, "-m", "dbento_assets.cli"]
        build = [*cli, "build", "--symbol", "ES,NQ", "--start", "2024-01"]
        subprocess.run(build, cwd=folder, env=env, check=True)
        port = free_port()
        ui = subprocess.Popen(
            [*cli, "ui", "--port", str(port)],
            cwd=folder,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            wait_for_ui(port)
            requests.post(
                f"http://127.0.0.1:{port}/graphql", json={"query": DISMISS_WELCOME}, timeout=10
            ).raise_for_status()
            for name, page in PAGES:
                shoot(browser, f"http://127.0.0.1:{port}{page}", DOCS / name)
        finally:
            os.killpg(ui.pid, signal.SIGINT)
            try:
                ui.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(ui.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
