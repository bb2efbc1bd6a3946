"""The project's one Dagster history and its settings file (:mod:`dbento_assets.project`).

Dagster's own commands read ``.env`` over the shell's variables; the line ``dbento`` writes
there must still let a ``DAGSTER_HOME`` set in the shell win, and fall back to the project's
``.dagster_home`` otherwise. Proven with the real ``dagster`` command line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dbento_assets.project import ProjectError, instance_home, load_settings

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def dagster_home_seen_by_dagster(folder: Path, env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "dagster", "instance", "info"],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (line,) = [ln for ln in done.stdout.splitlines() if ln.startswith("$DAGSTER_HOME: ")]
    return line.removeprefix("$DAGSTER_HOME: ")


def test_dagster_commands_use_the_project_history_unless_the_shell_says_otherwise(project):
    home = instance_home()
    assert home == project / ".dagster_home" and (home / "dagster.yaml").is_file()
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"}
    assert dagster_home_seen_by_dagster(project, env) == str(home)
    elsewhere = project / "elsewhere"
    elsewhere.mkdir()
    env["DAGSTER_HOME"] = str(elsewhere)
    assert dagster_home_seen_by_dagster(project, env) == str(elsewhere)


def test_the_env_line_is_written_once_and_a_users_own_line_is_kept(project, monkeypatch):
    (project / ".env").write_text("OTHER=1")  # no final newline
    instance_home()
    monkeypatch.delenv("DAGSTER_HOME")
    instance_home()
    text = (project / ".env").read_text()
    assert text.startswith("OTHER=1\n# Written by dbento")
    assert text.count("DAGSTER_HOME=") == 1
    mine = project / "mine"
    (project / ".env").write_text(f"DAGSTER_HOME={mine}\n")
    monkeypatch.delenv("DAGSTER_HOME")
    assert instance_home() == mine and (mine / "dagster.yaml").is_file()
    assert (project / ".env").read_text() == f"DAGSTER_HOME={mine}\n"


def test_a_relative_dagster_home_is_one_sentence(project, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", "relative/home")
    with pytest.raises(ProjectError, match=r"is a relative path and Dagster needs an absolute"):
        instance_home()


def test_the_settings_file_fills_in_and_never_overrides(project, monkeypatch):
    monkeypatch.setenv("DBENTO_SOURCE", "demo")
    monkeypatch.delenv("DBENTO_FORMAT", raising=False)
    (project / "dbento.env").write_text("DBENTO_SOURCE=databento\nDBENTO_FORMAT=csv\n")
    load_settings()
    assert os.environ["DBENTO_SOURCE"] == "demo"
    assert os.environ["DBENTO_FORMAT"] == "csv"
    # Not monkeypatch.delenv: it would record "csv" and put it back for the tests after this.
    os.environ.pop("DBENTO_FORMAT")


IMPORT_THEN_READ = """
import json, os
before = dict(os.environ)
import dbento_assets, dbento_assets.executors, dbento_assets.io_managers, dbento_assets.resources
changed = sorted(k for k in {*before, *os.environ} if before.get(k) != os.environ.get(k))
from dbento_assets.resources import databento_resource_from_env
print(json.dumps([changed, databento_resource_from_env().source]))
"""


def test_importing_reads_no_settings_file_and_sets_no_variable(project):
    # The settings file is read when settings are, and Arrow's pool is chosen as a run starts.
    (project / "dbento.env").write_text("DBENTO_SOURCE=demo\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DBENTO_", "ARROW_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_THEN_READ],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    changed, source = json.loads(done.stdout.strip().splitlines()[-1])
    # (pandera sets two pyspark variables of its own when imported; they are not ours)
    ours = ("DBENTO_", "DATABENTO_", "DAGSTER_", "ARROW_")
    assert [name for name in changed if name.startswith(ours)] == []
    assert source == "demo"  # read from dbento.env once settings were asked for
