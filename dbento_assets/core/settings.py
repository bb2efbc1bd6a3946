"""Settings from the environment: each one declared once, as a field of a pydantic model.

The field gives the type, default, bounds and description; its environment variable is
derived from its name (``vendor_check`` is ``DBENTO_VENDOR_CHECK``), and pydantic turns the
text into the value. :func:`read` builds a model from those variables and turns a
validation error into one sentence naming the variable, its value and what to write instead.
The settings file ``dbento.env`` (then ``.env``) of the working folder is loaded when
settings are read, never over a variable already set, so a variable typed in the shell
always wins. It is not called ``.env`` because Dagster's own commands load ``.env`` over the
shell's variables.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

from dotenv import load_dotenv
from pydantic import BaseModel, BeforeValidator, ValidationError

PREFIX = "DBENTO_"
SETTINGS_FILE = "dbento.env"
DAGSTER_ENV_FILE = ".env"
TRUE_WORDS = frozenset({"true", "1", "yes"})
FALSE_WORDS = frozenset({"false", "0", "no"})
NON_NEGATIVE = frozenset({"greater_than_equal", "finite_number"})
NOT_A = {"float_parsing": "number", "int_parsing": "whole number", "int_from_float": "whole number"}

Model = TypeVar("Model", bound=BaseModel)


def load_settings(folder: Path | None = None) -> None:
    """Read ``dbento.env`` (then ``.env``) of ``folder`` (default: the current folder)
    without overriding a variable that is already set."""
    folder = folder or Path.cwd()
    for name in (SETTINGS_FILE, DAGSTER_ENV_FILE):
        path = folder / name
        if path.is_file():
            load_dotenv(path, override=False)


def variable(field: str) -> str:
    """The environment variable of a setting: ``DBENTO_`` and the field name in capitals."""
    return PREFIX + field.upper()


def _flag(value: object) -> object:
    # Stricter than pydantic's bool: "on", "t" or "y" are more likely typos than choices.
    if isinstance(value, str):
        word = value.strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
        raise ValueError(
            "is neither true nor false: write true, 1 or yes to turn it on, false, 0 or no "
            "to turn it off"
        )
    return value


Flag = Annotated[bool, BeforeValidator(_flag)]


def read(
    model: type[Model],
    environ: Mapping[str, str] | None = None,
    error: type[Exception] = ValueError,
    **given: Any,
) -> Model:
    """``model`` with every field not in ``given`` from its variable when that is set and not
    blank (default: the process environment, after loading the settings file); a value that
    does not fit raises ``error`` with one sentence."""
    if environ is None:
        load_settings()
        environ = os.environ
    found: dict[str, str] = {}
    for name in model.model_fields:
        text = environ.get(variable(name), "").strip()
        if name not in given and text:
            found[name] = text
    try:
        return model(**found, **given)
    except ValidationError as exc:
        raise error(_sentence(exc, found)) from None


def _sentence(exc: ValidationError, found: Mapping[str, str]) -> str:
    first = exc.errors()[0]
    name = str(first["loc"][0]) if first["loc"] else ""
    if name not in found:  # a value given in code, not from the environment
        return f"{name}: {first['msg']}"
    said = f"{variable(name)}={found[name]!r}"
    kind = first["type"]
    if kind == "value_error":  # our validators write what follows the variable
        return f"{said} {first['ctx']['error']}"
    if kind in NOT_A:
        return f"{said} is not a {NOT_A[kind]}"
    if kind == "greater_than_equal" and first["ctx"]["ge"] != 0:
        return f"{said} must be at least {first['ctx']['ge']}"
    if kind in NON_NEGATIVE:
        return f"{said} must be a non-negative number"
    return f"{said}: {first['msg']}"
