"""The compliance officer's path in Chromium (Playwright, Debian's /usr/bin/chromium) against
``dicom-router serve``: a CT arrives by storescu, a radiologist opens it in OHIF and then
downloads it over DICOMweb (dicomweb-client), and an auditor finds the patient by name in the
patient access report, sees the viewer session as one row with its count beside the
download, exports the CSV and checks its rows, and opens the print view; then finds a rule
change in the audit search (the row shows what changed) and compares the rule's two versions
side by side. Screenshots go to test-output/screenshots/.
"""

from __future__ import annotations

import csv
import io
import re
import subprocess
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from playwright.sync_api import Page, expect

from tests.conftest import ADMIN_PASSWORD, wait_for
from tests.e2e.conftest import DCMTK_ENV, ROUTER_AET, RouterProcess
from tests.e2e.test_ohif_viewer import CT, LIT_CANVASES, chromium, dist, start_router
from tests.web_harness import bearer
from web import viewer

__all__ = ["chromium", "dist"]  # fixtures of the OHIF test, used here too

SHOTS = Path(__file__).resolve().parents[2] / "test-output" / "screenshots"
RADIOLOGIST = ("rita", "radiologist password 1")
AUDITOR = ("otto", "auditor password 1")


def shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def add_users(base: str) -> None:
    admin = bearer(base, "admin", ADMIN_PASSWORD)
    for (name, password), role in ((RADIOLOGIST, "radiologist"), (AUDITOR, "auditor")):
        r = requests.post(base + "/api/v1/users", headers=admin, timeout=30,
                          json={"username": name, "role": role, "password": password})
        assert r.status_code == 201, r.text


def log_in(page: Page, base: str, who: tuple[str, str]) -> None:
    page.goto(base + "/login")
    page.fill("input[name=username]", who[0])
    page.fill("input[name=password]", who[1])
    page.click("button[type=submit]")
    page.wait_for_url(base + "/")


def receive_ct(router: RouterProcess) -> str:
    subprocess.run(["storescu", "-aet", "CT_SCANNER", "-aec", ROUTER_AET, "127.0.0.1",
                    str(router.dicom_port), str(CT)], env=DCMTK_ENV, check=True, timeout=60)
    wait_for(lambda: len(router.view("studies", "SELECT 1 FROM studies")) == 1, 30,
             "the CT in the studies view")
    return str(pydicom.dcmread(CT, stop_before_pixels=True).StudyInstanceUID)


def radiologist_views_and_downloads(chromium: Any, base: str, study: str) -> None:
    context = chromium.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    log_in(page, base, RADIOLOGIST)
    page.goto(f"{base}/viewer?StudyInstanceUIDs={study}")
    wait_for(lambda: page.evaluate(LIT_CANVASES) >= 1, 90, "the CT on a canvas")
    context.close()
    client = DICOMwebClient(url=f"{base}/dicom-web", headers=bearer(base, *RADIOLOGIST))
    assert len(client.retrieve_study(study)) == 1


def change_a_rule(base: str) -> None:
    """An admin creates a rule, then adds a condition and rewrites its description."""
    admin = bearer(base, "admin", ADMIN_PASSWORD)
    rule = {"name": "chest CT", "calling_aet": "CT_*", "modality": ["CT"],
            "description": "every CT", "stop": True}  # stop: needs no destination
    r = requests.post(base + "/api/v1/rules", json=rule, headers=admin, timeout=30)
    assert r.status_code == 201, r.text
    r = requests.put(base + "/api/v1/rules/chest CT", headers=admin, timeout=30, json={
        **rule, "description": "chest CT only",
        "match": [{"tag": "BodyPartExamined", "op": "eq", "value": "CHEST"}]})
    assert r.status_code == 200, r.text


def auditor_compares_rule_versions(page: Page, base: str) -> None:
    page.goto(base + "/audit")
    page.select_option("select[name=action]", label="Rule changed")
    page.click("form.filters button[type=submit]")
    row = page.locator("tr[data-action='Rule.Updated']")
    expect(row).to_have_count(1)
    expect(row.locator("table.changes tr[data-field='description']")).to_contain_text(
        "chest CT only")
    expect(row.locator("table.changes tr[data-field='match']")).to_contain_text("CHEST")
    shot(page, "compliance-rule-change")
    row.locator("a:has-text('compare versions')").click()
    changed = page.locator("table.versions tr.changed")
    expect(changed).to_have_count(2)
    expect(page.locator("table.versions tr[data-field='modality']")).not_to_have_class(
        "changed")
    shot(page, "compliance-rule-versions")


@pytest.mark.slow
@pytest.mark.dcmtk
def test_an_auditor_reports_who_viewed_and_downloaded_a_patients_study(
        serve_router: Any, monkeypatch: pytest.MonkeyPatch, chromium: Any, dcmtk: None,
        dist: viewer.Dist, tmp_path: Path) -> None:
    router = start_router(serve_router, monkeypatch)
    base = f"http://127.0.0.1:{router.http_port}"
    add_users(base)
    study = receive_ct(router)
    radiologist_views_and_downloads(chromium, base, study)
    patient = str(pydicom.dcmread(CT, stop_before_pixels=True).PatientID)
    wait_for(lambda: router.view("audit", "SELECT 1 FROM audit WHERE action = ?",
                                 ("dicomweb.retrieve",)), 20, "the download in the audit view")

    context = chromium.new_context(viewport={"width": 1400, "height": 900},
                                   accept_downloads=True, timezone_id="Europe/Berlin")
    page = context.new_page()
    log_in(page, base, AUDITOR)
    page.goto(base + "/audit/access")
    page.fill("input[name=q]", "compressedsamples")  # part of the name, any case
    page.click("form.filters button[type=submit]")
    page.click(f"tr[data-patient='{patient}'] a:has-text('Report')")
    table = page.locator("table.access-report")
    viewer_row = table.locator("tr[data-kind='Viewer session']")
    expect(viewer_row).to_have_count(1)
    viewer_count = int(viewer_row.locator("td.count").inner_text())
    assert viewer_count >= 3, viewer_count  # the open, metadata and frames: one row
    download_row = table.locator("tr[data-kind='DICOMweb retrieval']")
    expect(download_row).to_have_count(1)
    expect(download_row.locator("td.count")).to_have_text("1")
    expect(viewer_row).to_contain_text("radiologist")
    expect(viewer_row).to_contain_text("dicomweb.frames")
    # Times in the browser's zone (the page script ran under the CSP), UTC on hover.
    first = viewer_row.locator("time.ts").first
    expect(first).to_have_attribute("data-local", "1")
    assert re.search(r"GMT\+1|CET", first.inner_text()), first.inner_text()
    assert first.get_attribute("title", timeout=5000).endswith("Z (UTC)")
    shot(page, "compliance-access-report")

    with page.expect_download() as info:
        page.click("a:has-text('Export CSV')")
    saved = tmp_path / "report.csv"
    info.value.save_as(saved)
    rows = list(csv.DictReader(io.StringIO(saved.read_text("utf-8"))))
    by_kind = {r["what"]: r for r in rows}
    assert int(by_kind["Viewer session"]["count"]) == viewer_count
    assert by_kind["DICOMweb retrieval"]["count"] == "1"
    assert {by_kind[k]["user"] for k in ("Viewer session", "DICOMweb retrieval")} == {"rita"}
    assert by_kind["Viewer session"]["role"] == "radiologist"
    assert by_kind["Viewer session"]["study_instance_uid"] == study
    assert not any(r["what"].startswith(("Delivery", "Job")) for r in rows)

    page.click("a:has-text('Print view')")
    expect(page.locator("table.access-report tr[data-kind='Viewer session']")).to_have_count(1)
    page.emulate_media(media="print")
    shot(page, "compliance-access-report-print")
    page.emulate_media(media="screen")

    page.goto(base + "/audit")
    page.select_option("select[name=action]", label="Study opened in the viewer")
    page.click("form.filters button[type=submit]")
    expect(page.locator("tr[data-action='viewer.open']")).to_have_count(1)
    shot(page, "compliance-audit-search")
    change_a_rule(base)
    auditor_compares_rule_versions(page, base)
    recorded = router.view("audit", "SELECT action FROM audit WHERE actor = ? ORDER BY"
                                    " occurred_at", (AUDITOR[0],))
    assert {"audit.patient_search", "audit.access_report",
            "audit.access_report_export"} <= {r["action"] for r in recorded}
    context.close()
