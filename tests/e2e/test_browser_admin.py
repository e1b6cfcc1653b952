"""An administrator runs the router from a real browser (Debian Chromium through Playwright):
log in, create a destination and a rule, send a file with storescu, see it delivered on the
dashboard, make the destination fail and requeue the job, and find the access in the audit
trail. Screenshots of the main pages go to test-output/screenshots/.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.conftest import ADMIN_PASSWORD, wait_for
from tests.integration.peers import StoreScp, require_tool
from tests.integration.test_pipeline import storescu
from tests.synthetic import make_ct_series

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
SHOTS = Path(__file__).resolve().parents[2] / "test-output" / "screenshots"
HOSTILE_NAME = "<script>alert('pwned')</script>^Evil"


@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    assert Path(CHROMIUM).exists(), "Debian chromium is missing: run scripts/test"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


def hostile_ct(folder: Path, count: int) -> list[Path]:
    files = make_ct_series(folder, count=count, rows=64, cols=64, patient_id="E2E-001")
    for path in files:
        ds = pydicom.dcmread(path)
        ds.PatientName = HOSTILE_NAME
        ds.save_as(path)
    return files


def shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def log_in(page: Page, base: str) -> None:
    page.goto(base + "/jobs")
    expect(page).to_have_url(re.compile(r"/login\?next="))
    page.fill("input[name=username]", "admin")
    page.fill("input[name=password]", "not the password")
    page.click("button[type=submit]")
    expect(page.locator(".flash.error")).to_contain_text("Wrong user name or password")
    page.fill("input[name=username]", "admin")
    page.fill("input[name=password]", ADMIN_PASSWORD)
    page.click("button[type=submit]")
    expect(page).to_have_url(base + "/jobs")  # back where the login started


def create_destination(page: Page, base: str, port: int) -> None:
    page.goto(base + "/destinations")
    page.click("a[href='/destinations/new?type=dicom']")
    page.fill("input[name=name]", "pacs")
    page.fill("input[name=host]", "127.0.0.1")
    page.fill("input[name=port]", str(port))
    page.fill("input[name=ae_title]", "PACS")
    page.click("button.primary:has-text('Save')")
    expect(page.locator("body")).to_contain_text("pacs")
    shot(page, "destinations")


def create_rule(page: Page, base: str) -> None:
    page.goto(base + "/rules/new")
    page.fill("input[name=name]", "CT to PACS")
    page.check("input[name=destinations][value=pacs]")
    page.click("button.primary:has-text('Save')")
    page.goto(base + "/rules")
    expect(page.locator("body")).to_contain_text("CT to PACS")
    shot(page, "rules")


def delivered_on_dashboard(page: Page, base: str, count: int) -> None:
    page.goto(base + "/")
    # The figures refresh themselves (HTMX polling): wait without reloading the page.
    expect(page.locator("[data-stat=delivered]")).to_have_text(str(count), timeout=30_000)
    shot(page, "dashboard")


def job_row_link(page: Page, base: str, status: str) -> str:
    page.goto(base + f"/jobs?view=instances&status={status}")
    link = page.locator("table a[href^='/jobs/']").first
    expect(link).to_be_visible(timeout=15_000)
    return str(link.get_attribute("href"))


@pytest.mark.dcmtk
def test_an_admin_runs_the_router_from_the_browser(
    chromium: Browser, web_router: Any, tmp_path: Path, dcmtk: None,
) -> None:
    server = web_router()
    base, router = server.url, server.router
    context = chromium.new_context()
    page = context.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    files = hostile_ct(tmp_path / "ct", 2)
    with StoreScp(tmp_path / "pacs") as pacs:
        log_in(page, base)
        create_destination(page, base, pacs.port)
        create_rule(page, base)
        storescu(router.dicom.port, files[:1])
        delivered_on_dashboard(page, base, 1)
        job = job_row_link(page, base, "delivered")
        page.goto(base + job)
        expect(page.locator("body")).to_contain_text("CT to PACS")  # routed by which rule
        shot(page, "job-delivered")

        pacs.stop()  # the destination fails
        storescu(router.dicom.port, files[1:])
        wait_for(lambda: router.view_db("jobs").query(
            "SELECT 1 FROM deliveries WHERE status = 'retrying'"), 30, "a failed attempt")
        failed_job = job_row_link(page, base, "retrying")
        assert pacs._start(require_tool("storescp"))  # back up, same port
        page.goto(base + failed_job)
        shot(page, "job-retrying")
        page.click("button:has-text('Requeue')")
        expect(page.locator("#job-live")).to_contain_text("delivered", timeout=30_000)
        delivered_on_dashboard(page, base, 2)

    page.goto(base + "/studies")
    shot(page, "studies")
    # Shown as text: an unescaped <script> element would not be part of the visible text.
    expect(page.locator("main")).to_contain_text("<script>alert('pwned')</script>")
    page.goto(base + "/audit?user=admin&action=job.view")
    rows = page.locator("table tbody tr")
    expect(rows.first).to_be_visible()
    expect(page.locator("table")).to_contain_text(failed_job.rsplit("/", 1)[1])
    shot(page, "audit")
    for name in ("users", "settings", "storage", "jobs"):
        page.goto(f"{base}/{name}")
        shot(page, name)
    assert dialogs == [], "a received tag value ran as script"
    context.close()
