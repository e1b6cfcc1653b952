"""Reading the deployment recipes of deploy/ in tests: systemd unit files and env files."""

from __future__ import annotations

import shlex
from pathlib import Path

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
UNITS = ("dicom-router.service", "dicom-router-migrate.service")

Unit = dict[str, dict[str, list[str]]]


def read_unit(path: Path) -> Unit:
    """Sections -> key -> every value given (systemd allows a key more than once)."""
    unit: Unit = {}
    section: dict[str, list[str]] | None = None
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], {})
            continue
        key, equals, value = line.partition("=")
        assert equals and section is not None, f"{path}:{number}: not a setting: {raw!r}"
        section.setdefault(key.strip(), []).append(value.strip())
    return unit


def exec_start(unit: Unit) -> list[str]:
    """The ExecStart command line, split as systemd splits it (no shell)."""
    [command] = unit["Service"]["ExecStart"]
    return shlex.split(command)


def read_env_file(path: Path) -> dict[str, str]:
    """NAME=value lines of an EnvironmentFile (comments and blank lines skipped)."""
    values: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values
