"""deploy/systemd's units pass ``systemd-analyze verify`` (which needs no running systemd):
every key known, every value parsed, the required unit found, ExecStart executable.

The shipped files are verified with only ExecStart's /opt/dicom-router/.venv pointed at this
test's interpreter folder, which exists here. Any warning counts as a failure: systemd merely
ignores an unknown key or a bad value, so a typo in a hardening option would go unnoticed.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.deploy_files import DEPLOY, UNITS

INSTALLED = "/opt/dicom-router/.venv/bin/dicom-router"


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    assert found, "systemd-analyze not found: run scripts/test, which installs systemd"
    return found


def verify(folder: Path, *units: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([systemd_analyze(), "verify", *(f"./{u}" for u in units)],
                          cwd=folder, capture_output=True, text=True, timeout=60)


def copy_units(folder: Path) -> None:
    here = str(Path(sys.executable).parent / "dicom-router")
    for unit in UNITS:
        text = (DEPLOY / "systemd" / unit).read_text()
        assert INSTALLED in text, f"{unit} no longer runs {INSTALLED}: update this test"
        (folder / unit).write_text(text.replace(INSTALLED, here))


def test_the_units_verify_without_a_warning(tmp_path: Path) -> None:
    copy_units(tmp_path)
    result = verify(tmp_path, *UNITS)
    assert result.returncode == 0 and result.stderr == "" and result.stdout == "", (
        f"exit {result.returncode}:\n{result.stdout}{result.stderr}")


def test_verify_reports_a_misspelt_option(tmp_path: Path) -> None:
    """The check above can fail: a typo in a hardening key is reported."""
    copy_units(tmp_path)
    unit = tmp_path / "dicom-router.service"
    unit.write_text(unit.read_text().replace("ProtectSystem=strict", "ProtectSytem=strict"))
    result = verify(tmp_path, *UNITS)
    assert "Unknown key" in result.stderr and "ProtectSytem" in result.stderr
