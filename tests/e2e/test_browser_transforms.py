"""The transform dry run in a real browser (Debian Chromium through Playwright): from a study
page, open the dry run of an instance, pick a de-identification and a morph, and see the
header before and after side by side with the changes highlighted; a hostile patient name is
shown as text. The screenshot goes to test-output/screenshots/transform-dry-run.png.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from playwright.sync_api import Browser, expect

from tests.conftest import ADMIN_PASSWORD, wait_for
from tests.e2e.test_browser_admin import HOSTILE_NAME, chromium, log_in, shot  # noqa: F401
from tests.integration.test_pipeline import storescu
from tests.synthetic import make_ct_series
from tests.web_harness import bearer


@pytest.mark.dcmtk
def test_dry_run_from_a_study_page_highlights_the_changes(
    chromium: Browser, web_router: Any, tmp_path: Path, dcmtk: None,  # noqa: F811
) -> None:
    server = web_router()
    base, router = server.url, server.router
    auth = bearer(base, "admin", ADMIN_PASSWORD)
    for body in ({"name": "deid-research", "kind": "deidentify", "project": "trial-7"},
                 {"name": "north-institution", "kind": "morph", "ops": [
                     {"op": "set", "tag": "InstitutionName", "value": "North Clinic",
                      "when": [{"calling_aet": "CT_*"}]}]}):
        r = requests.post(base + "/api/v1/transforms", headers=auth, json=body, timeout=10)
        assert r.status_code == 201, r.text
    [path] = make_ct_series(tmp_path / "ct", count=1, rows=32, cols=32, patient_id="E2E-7")
    ds = pydicom.dcmread(path)
    ds.PatientName = HOSTILE_NAME
    ds.save_as(path)
    storescu(router.dicom.port, [path])
    studies = router.view_db("studies")
    wait_for(lambda: studies.query("SELECT 1 FROM instances"), 20, "the study indexed")

    page = chromium.new_context().new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    log_in(page, base)
    page.goto(f"{base}/studies/{ds.StudyInstanceUID}")
    page.locator("details summary").first.click()  # the series' instances
    page.click("text=dry run")
    expect(page.locator("input[name=sop_instance_uid]")).to_have_value(ds.SOPInstanceUID)
    page.select_option("select[name=transform]", "deid-research")
    page.click("button:has-text('Show before and after')")
    result = page.locator("#preview-result")
    expect(result).to_contain_text("element(s) differ")
    rows = "table.transform-diff tr"
    patient_id = page.locator(rows, has=page.locator("td", has_text="(0010,0020)"))
    expect(patient_id).to_have_class("changed")
    expect(patient_id.locator("td.before")).to_have_text("E2E-7")
    assert patient_id.locator("td.after").inner_text() not in ("", "E2E-7")
    name = page.locator("table.transform-diff tr", has=page.locator("td", has_text="(0010,0010)"))
    expect(name.locator("td.before")).to_have_text(HOSTILE_NAME)  # text, not markup
    assert page.locator("table.transform-diff tr.changed").count() > 5
    assert page.locator("table.transform-diff tr.removed").count() >= 1
    assert page.locator("table.transform-diff tr.added").count() >= 1
    shot(page, "transform-dry-run")

    page.select_option("select[name=transform]", "north-institution")
    page.click("button:has-text('Show before and after')")
    institution = page.locator("table.transform-diff tr",
                               has=page.locator("td", has_text="(0008,0080)"))
    expect(institution.locator("td.after")).to_have_text("North Clinic")
    assert page.locator(f"{rows}.changed, {rows}.added").count() == 1
    assert dialogs == []

    router.runner.catch_up()
    rows = router.view_db("audit").query(
        "SELECT actor, detail FROM audit WHERE action = 'transform.preview' ORDER BY position")
    assert [r["actor"] for r in rows] == ["admin", "admin"]
    assert "transform deid-research" in rows[0]["detail"]
