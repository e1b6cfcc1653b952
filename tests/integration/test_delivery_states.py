"""One vocabulary of delivery states (router/domain/delivery_states.py) in the API and the CLI,
against a real router: CT instances are dead-lettered at once (maximum age 1 s) at a DICOM
peer nobody listens on, and are shown as ``failed``; the old names still filter.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ADMIN_PASSWORD, wait_for
from tests.integration.test_faults import write_cli_config
from tests.integration.test_web_jobs import (
    delivery_counts,
    get,
    routed_settings,
    storescu,
    write_instances,
)
from tests.web_harness import bearer

pytestmark = pytest.mark.dcmtk
CLI = str(Path(sys.executable).parent / "dicom-router")


def test_failed_deliveries_are_named_failed_and_found_by_old_names(
        database_url: str, web_router: Any, tmp_path: Path) -> None:
    base = routed_settings(tmp_path, database_url)
    settings = replace(base, dispatch=replace(base.dispatch, max_age=1.0))
    server = web_router(settings)
    files = write_instances(tmp_path / "ct", "CT", 2)
    assert storescu(server.router.dicom.port, files, "CT_SCANNER").returncode == 0
    wait_for(lambda: delivery_counts(server.router) == {
        ("archive", "delivered"): 2, ("down", "dead"): 2}, 30, "dead letters")
    server.router.runner.catch_up()

    api = bearer(server.url, "admin", ADMIN_PASSWORD)
    jobs = get(server, api, "/api/v1/jobs", status="failed").json()["items"]
    assert len(jobs) == 2
    assert {d["status"] for j in jobs for d in j["deliveries"]} == {"failed", "delivered"}
    for old in ("dead", "dead-lettered"):
        assert len(get(server, api, "/api/v1/jobs", status=old).json()["items"]) == 2
    assert get(server, api, "/api/v1/jobs", status="pending").json()["items"] == []
    detail = get(server, api, f"/api/v1/jobs/{jobs[0]['job_id']}").json()
    assert {d["destination"]: d["status"] for d in detail["deliveries"]} == {
        "archive": "delivered", "down": "failed"}
    transfers = get(server, api, "/api/v1/transfers", status="dead").json()["items"]
    assert len(transfers) == 1 and transfers[0]["status"] == "failed"
    assert transfers[0]["progress"]["down"]["summary"] == "0/2 delivered, 2 failed"

    config = write_cli_config(tmp_path / "cli.toml", settings)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([CLI, "--config", str(config), "deliveries", "list", *args],
                              capture_output=True, text=True, timeout=120)

    for name in ("failed", "dead"):
        listed = cli("--status", name)
        assert listed.returncode == 0, listed.stderr
        lines = listed.stdout.splitlines()
        assert len(lines) == 2 and all(" down " in ln and " failed " in ln for ln in lines)
    assert cli("--status", "queued").stdout == ""
    bogus = cli("--status", "lost")
    assert bogus.returncode == 2 and "--status" in bogus.stderr and "failed" in bogus.stderr
