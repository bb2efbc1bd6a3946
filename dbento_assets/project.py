"""The project folder's settings file and its one Dagster history, shared by every command.

Settings live in ``dbento.env`` (not ``.env``, which Dagster's commands load over the shell's
variables), read when settings are read (:mod:`dbento_assets.core.settings`), never over a
variable already set. The history is ``DAGSTER_HOME`` or ``.dagster_home/`` in the project
folder; :func:`instance_home` records it in ``.env`` so Dagster's own commands use the same
instance.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from dotenv import dotenv_values

from dbento_assets.core.settings import DAGSTER_ENV_FILE, load_settings

if TYPE_CHECKING:
    from dagster import DagsterInstance

HOME_FOLDER = ".dagster_home"
HOME_VARIABLE = "DAGSTER_HOME"
# The instance settings the project ships (run queue, pool limits, retries); in a source
# checkout (pip install -e .) they sit next to the package.
SHIPPED_YAML = Path(__file__).resolve().parent.parent / "deploy" / "dagster.yaml"
FALLBACK_YAML = "telemetry:\n  enabled: false\n"


class ProjectError(ValueError):
    """A setting that stops every command; its message says what to do."""


def instance_home(folder: Path | None = None) -> Path:
    """The Dagster instance folder of this project, ready to use, exported as DAGSTER_HOME.

    ``DAGSTER_HOME`` when set (created if missing), else ``<folder>/.dagster_home``, which is
    then also written into ``<folder>/.env`` for Dagster's own commands.
    """
    folder = (folder or Path.cwd()).resolve()
    load_settings(folder)
    given = os.environ.get(HOME_VARIABLE, "").strip()
    if given:
        home = Path(given).expanduser()
        if not home.is_absolute():
            raise ProjectError(
                f"DAGSTER_HOME={given!r} is a relative path and Dagster needs an absolute "
                f"one: set it to {(folder / given).resolve()} or unset it to use "
                f"{folder / HOME_FOLDER}."
            )
    else:
        home = folder / HOME_FOLDER
        _remember_in_dagster_env(folder, home)
    try:
        home.mkdir(parents=True, exist_ok=True)
        settings = home / "dagster.yaml"
        if not settings.exists():
            shipped = SHIPPED_YAML.read_text() if SHIPPED_YAML.is_file() else FALLBACK_YAML
            settings.write_text(shipped)
    except OSError as exc:
        raise ProjectError(
            f"cannot prepare the Dagster history folder {home}: {exc.strerror or exc}; "
            "set DAGSTER_HOME to a folder you can write to."
        ) from exc
    os.environ[HOME_VARIABLE] = str(home)
    return home


@contextmanager
def project_instance(given: DagsterInstance | None = None) -> Iterator[DagsterInstance]:
    """``given``, else the project's instance (:func:`instance_home`), closed on exit."""
    if given is not None:
        yield given
        return
    from dagster import DagsterInstance  # the settings helpers above stay import-light

    with DagsterInstance.from_config(str(instance_home())) as instance:
        yield instance


def dagster_env_line(home: Path) -> str:
    """The ``.env`` line that gives Dagster's commands ``home`` unless the shell says otherwise."""
    return f'{HOME_VARIABLE}="${{{HOME_VARIABLE}:-{home}}}"'


def _remember_in_dagster_env(folder: Path, home: Path) -> None:
    env_file = folder / DAGSTER_ENV_FILE
    text = env_file.read_text() if env_file.is_file() else ""
    if HOME_VARIABLE in dotenv_values(stream=io.StringIO(text), interpolate=False):
        return  # the user's own choice (or ours from an earlier command) is kept
    header = (
        "# Written by dbento: Dagster's own commands (dagster dev, dagster asset materialize, "
        "...)\n# read this file; this line gives them the project's run history unless "
        "DAGSTER_HOME is set.\n"
    )
    prefix = text if not text or text.endswith("\n") else text + "\n"
    with contextlib.suppress(OSError):  # a read-only folder: our own commands still work
        env_file.write_text(prefix + header + dagster_env_line(home) + "\n")
