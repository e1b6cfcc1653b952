"""The dashboard and /api/v1/stats against a real router: storescu sends CT instances routed to
a folder (delivered), to a DICOM peer nobody listens on (dead-lettered at once: maximum age
1 s) and to a paused folder (waiting); a changed resend under the reject policy is refused.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests

from router.application.commands import Actor
from tests.conftest import ADMIN_PASSWORD, make_settings, wait_for
from tests.integration.peers import free_port
from tests.integration.test_web_jobs import delivery_counts, storescu, write_instances
from tests.web_harness import Browser, bearer

pytestmark = pytest.mark.dcmtk


def dashboard_settings(tmp_path: Path, database_url: str) -> Any:
    for folder in ("archive", "held"):
        (tmp_path / folder).mkdir()
    settings = make_settings(tmp_path, database_url)
    return replace(
        settings,
        dispatch=replace(settings.dispatch, max_age=1.0),
        ingest=replace(settings.ingest, changed_duplicate_policy="reject"),
        destinations=(
            {"name": "archive", "type": "file", "path": str(tmp_path / "archive")},
            {"name": "gone", "type": "dicom", "host": "127.0.0.1", "port": free_port(),
             "ae_title": "NOBODY"},
            {"name": "held", "type": "file", "path": str(tmp_path / "held")},
        ),
        rules=({"name": "ct", "calling_aet": "CT_*",
                "destinations": ["archive", "gone", "held"]},),
    )


def send_traffic(server: Any, tmp_path: Path) -> None:
    """3 CT instances, then one of them again with other content (refused: policy reject)."""
    server.router.commands.pause_destination("held", Actor("admin"))
    ct = write_instances(tmp_path / "ct", "CT", 3)
    port = server.router.dicom.port
    assert storescu(port, ct, "CT_SCANNER").returncode == 0
    changed = pydicom.dcmread(ct[0])
    changed.SeriesDescription = "CHANGED"
    changed.save_as(tmp_path / "changed.dcm")
    storescu(port, [tmp_path / "changed.dcm"], "CT_SCANNER")  # refused with 0xC001
    wait_for(lambda: delivery_counts(server.router) == {
        ("archive", "delivered"): 3, ("gone", "dead"): 3, ("held", "pending"): 3}, 30,
        "deliveries to settle")
    jobs = server.router.view_db("jobs")
    wait_for(lambda: jobs.query("SELECT failure_id FROM receipt_failures"), 10,
             "the refused receipt")
    server.router.runner.catch_up()


def test_stats_show_throughput_queues_failures_and_health(database_url: str, web_router: Any,
                                                          tmp_path: Path) -> None:
    server = web_router(dashboard_settings(tmp_path, database_url))
    before = time.time()
    send_traffic(server, tmp_path)
    r = requests.get(server.url + "/api/v1/stats",
                     headers=bearer(server.url, "admin", ADMIN_PASSWORD), timeout=30)
    assert r.status_code == 200
    stats = r.json()
    minutes = stats["throughput"]["minutes"]
    assert len(minutes) == 60 and minutes[-1]["start_at"].endswith(":00.000Z")
    assert stats["throughput"]["received_last_hour"] == 3
    assert stats["throughput"]["delivered_last_hour"] == 3
    assert sum(m["received"] for m in minutes[-2:]) == 3  # this minute or the one before
    assert stats["queue_depth"] == 3

    by_name = {d["destination"]: d for d in stats["destinations"]}
    assert set(by_name) == {"archive", "gone", "held"}
    archive, gone, held = by_name["archive"], by_name["gone"], by_name["held"]
    assert archive["health"] == "healthy" and archive["last_success_at"]
    assert archive["consecutive_failures"] == 0 and archive["type"] == "file"
    assert gone["health"] == "failing" and gone["consecutive_failures"] == 3
    assert gone["last_success_at"] is None and gone["last_failure_at"] and gone["dead"] == 3
    assert held["health"] == "paused" and held["paused"] is True
    assert held["queue_depth"] == 3 and held["oldest_pending_at"]
    assert held["oldest_pending_age"] >= 0 and held["oldest_pending_age"] < time.time() - before + 5

    failures = stats["failures"]
    assert failures["dead_lettered"] == 3 and failures["dead_lettered_last_hour"] == 3
    assert {d["destination"] for d in failures["recent_dead_letters"]} == {"gone"}
    assert failures["receipt_failures"] == 1 and failures["receipt_failures_last_hour"] == 1
    refused = failures["recent_receipt_failures"][0]
    assert refused["calling_aet"] == "CT_SCANNER" and refused["status_hex"] == "0xC001"

    # Resuming the paused destination empties its queue.
    server.router.commands.pause_destination("held", Actor("admin"), paused=False)
    wait_for(lambda: delivery_counts(server.router).get(("held", "delivered")) == 3, 20,
             "the resumed destination to deliver")
    server.router.runner.catch_up()
    again = requests.get(server.url + "/api/v1/stats",
                         headers=bearer(server.url, "admin", ADMIN_PASSWORD), timeout=30).json()
    assert again["queue_depth"] == 0
    assert again["throughput"]["delivered_last_hour"] == 6


def test_dashboard_page_and_live_fragment(web_router: Any, tmp_path: Path) -> None:
    server = web_router(dashboard_settings(tmp_path, f"sqlite:///{tmp_path / 'db'}"))
    send_traffic(server, tmp_path)
    server.router.users.add("aud", "auditor", "auditor password 1", Actor("admin"))
    browser = Browser(server.url)
    browser.login("aud", "auditor password 1")
    page = browser.get(browser.url("/dashboard"))  # an auditor lands on the audit trail
    assert page.status_code == 200 and "<h1>Dashboard</h1>" in page.text
    assert 'hx-get="/dashboard/live"' in page.text and 'hx-trigger="every 5s"' in page.text
    assert '<div class="stat" data-stat="received">3</div>' in page.text
    assert '<div class="stat" data-stat="queue">3</div>' in page.text
    assert 'class="badge failing"' in page.text and 'class="badge paused"' in page.text
    assert "0xC001" in page.text
    assert 'href="/jobs' not in page.text  # an auditor may not open jobs: no links to them
    assert page.text.count('<rect class="received"') == 60
    fragment = browser.get(browser.url("/dashboard/live"))
    assert fragment.status_code == 200 and "<html" not in fragment.text
    assert fragment.text.lstrip().startswith('<div id="dashboard-live"')
    # An auditor reads stats too; an unauthenticated client does not.
    api = bearer(server.url, "aud", "auditor password 1")
    assert requests.get(server.url + "/api/v1/stats", headers=api, timeout=30).ok
    assert requests.get(server.url + "/api/v1/stats", timeout=30).status_code == 401
    admin = Browser(server.url)
    admin.login("admin", ADMIN_PASSWORD)
    assert 'href="/jobs?destination=gone"' in admin.get(admin.url("/")).text
