"""The administrator's morning after an outage, in a real browser (Debian Chromium through
Playwright): a CT study arrives, the PACS (a DCMTK storescp) is down so its deliveries fail
and are dead-lettered after short retries, the PACS comes back, and the admin requeues every
dead delivery to it from the jobs page's bulk form, with a reason; everything is delivered.
Screenshots go to test-output/screenshots/ (admin-bulk-*.png).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect

from tests.conftest import ADMIN_PASSWORD, make_settings, wait_for
from tests.e2e.test_browser_admin import chromium, shot  # noqa: F401 - the fixture
from tests.integration.peers import StoreScp, free_port, require_tool
from tests.integration.test_faults import fast_retries
from tests.integration.test_pipeline import storescu
from tests.synthetic import make_ct_series

INSTANCES = 3


def outage_settings(tmp_path: Path, pacs_port: int) -> Any:
    (tmp_path / "archive").mkdir()
    settings = fast_retries(make_settings(tmp_path, f"sqlite:///{tmp_path / 'db'}"), 0.3, 0.3)
    return replace(
        settings,
        dispatch=replace(settings.dispatch, max_age=1.5),  # dead-lettered after ~1.5 s
        destinations=(
            {"name": "archive", "type": "file", "path": str(tmp_path / "archive")},
            {"name": "pacs", "type": "dicom", "host": "127.0.0.1", "port": pacs_port,
             "ae_title": "STORESCP"},
        ),
        rules=({"name": "CT to PACS and archive", "modality": ["CT"],
                "destinations": ["archive", "pacs"]},),
    )


def counts(router: Any, destination: str) -> dict[str, int]:
    router.runner.catch_up()
    rows = router.view_db("jobs").query(
        "SELECT status, count(*) AS n FROM deliveries WHERE destination = ? GROUP BY status",
        (destination,))
    return {r["status"]: int(r["n"]) for r in rows}


def log_in(page: Page, base: str) -> None:
    page.goto(base + "/login")
    page.fill("input[name=username]", "admin")
    page.fill("input[name=password]", ADMIN_PASSWORD)
    page.click("button[type=submit]")
    expect(page.locator("nav")).to_be_visible()


@pytest.mark.dcmtk
def test_the_admin_bulk_requeues_dead_deliveries_after_an_outage(
    chromium: Browser, web_router: Any, tmp_path: Path, dcmtk: None,  # noqa: F811
) -> None:
    pacs = StoreScp(tmp_path / "pacs")
    pacs.port = free_port()  # configured now, listening only once the PACS "comes back"
    server = web_router(outage_settings(tmp_path, pacs.port))
    base, router = server.url, server.router
    files = make_ct_series(tmp_path / "ct", count=INSTANCES, rows=32, cols=32)
    storescu(router.dicom.port, files)
    wait_for(lambda: counts(router, "pacs") == {"dead": INSTANCES}, 60,
             "the PACS deliveries to be dead-lettered")
    assert counts(router, "archive") == {"delivered": INSTANCES}

    context = chromium.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    try:
        log_in(page, base)
        page.goto(base + "/jobs?status=failed")  # transfers: one row for the study
        transfer = page.locator("tr.transfer")
        expect(transfer).to_have_count(1)
        expect(transfer.locator("div[data-destination=pacs]")).to_contain_text("failed")
        shot(page, "admin-bulk-dead")

        pacs.folder.mkdir(parents=True, exist_ok=True)
        assert pacs._start(require_tool("storescp")), "storescp did not start"  # PACS is back
        form = page.locator("#jobs-bulk")
        form.locator("select[name=operation]").select_option("requeue")
        form.locator("select[name=destination]").select_option("pacs")
        form.locator("select[name=status]").select_option("failed")
        form.locator("input[name=reason]").fill("PACS back after the night's outage")
        form.locator("button:has-text('Count matching')").click()
        expect(page.locator("#jobs-bulk-result")).to_contain_text(
            f"{INSTANCES} deliveries match; nothing was changed")
        assert counts(router, "pacs") == {"dead": INSTANCES}
        page.locator("#jobs-bulk button:has-text('Apply to all matching')").click()
        expect(page.locator("#jobs-bulk-result")).to_contain_text(
            f"Requeued {INSTANCES} of {INSTANCES} matching deliveries.")
        shot(page, "admin-bulk-requeue")

        wait_for(lambda: counts(router, "pacs") == {"delivered": INSTANCES}, 60,
                 "the requeued deliveries to arrive")
        assert pacs.wait_log("Association Received", 1, timeout=5)
        assert len([p for p in pacs.folder.iterdir() if p.is_file()]) == INSTANCES
        page.locator("#jobs-bulk-result a:has-text('Reload the list')").click()
        expect(page).to_have_url(base + "/jobs?status=failed")  # its filters kept
        expect(page.locator("tr.transfer")).to_have_count(0)
        page.goto(base + "/jobs?view=instances&status=delivered")
        expect(page.locator("table a[href^='/jobs/']")).to_have_count(INSTANCES)
        page.locator("table a[href^='/jobs/']").first.click()
        timeline = page.locator("ol.timeline")
        expect(timeline).to_contain_text("Delivery.Requeued")
        expect(timeline.locator("li[data-action='Delivery.Requeued']")).to_contain_text("admin")
        expect(page.locator("tr[data-destination=pacs]")).to_contain_text("delivered")
        shot(page, "admin-bulk-delivered")
        page.goto(base + "/audit?action=BulkAction.Requested")
        expect(page.locator("table")).to_contain_text("PACS back after the night")
        shot(page, "admin-bulk-audit")
    finally:
        pacs.stop()
        context.close()
    assert dialogs == []
