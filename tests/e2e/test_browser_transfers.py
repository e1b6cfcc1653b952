"""An administrator's view of the jobs page in a real browser (Debian Chromium through
Playwright): a CT study of 6 instances in 2 series arrives over DICOM (storescu); the jobs page
shows one row for it with per-destination progress; expanding it shows its 2 series, and
expanding a series its instances. Screenshots go to test-output/screenshots/.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
import pytest
from playwright.sync_api import Browser, expect

from tests.conftest import ADMIN_PASSWORD, wait_for
from tests.e2e.test_browser_admin import chromium, shot  # noqa: F401 (fixture)
from tests.integration.test_web_jobs import delivery_counts, routed_settings, storescu
from tests.synthetic import make_ct_series


def two_series_study(folder: Path) -> list[Path]:
    """3 + 3 CT slices of one study (two series), patient DOE^JANE."""
    first = make_ct_series(folder / "s1", count=3, rows=32, cols=32, patient_id="E2E-T1")
    study = str(pydicom.dcmread(first[0]).StudyInstanceUID)
    second = make_ct_series(folder / "s2", count=3, rows=32, cols=32, patient_id="E2E-T1",
                            study_uid=study)
    for path in [*first, *second]:
        ds = pydicom.dcmread(path)
        ds.PatientName = "DOE^JANE"
        ds.StudyDescription = "CT CHEST"
        ds.save_as(path)
    return [*first, *second]


@pytest.mark.dcmtk
def test_the_jobs_page_shows_a_study_as_one_expandable_row(
    chromium: Browser, web_router: Any, tmp_path: Path, dcmtk: None,  # noqa: F811
) -> None:
    server = web_router(routed_settings(tmp_path, server_database(tmp_path)))
    files = two_series_study(tmp_path / "in")
    assert storescu(server.router.dicom.port, files, "CT_SCANNER").returncode == 0
    wait_for(lambda: delivery_counts(server.router) == {
        ("archive", "delivered"): 6, ("down", "retrying"): 6}, 30, "deliveries to settle")

    context = chromium.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(server.url + "/login?next=/jobs")
    page.fill("input[name=username]", "admin")
    page.fill("input[name=password]", ADMIN_PASSWORD)
    page.click("button[type=submit]")
    expect(page).to_have_url(server.url + "/jobs")

    rows = page.locator("tr.transfer")
    expect(rows).to_have_count(1)  # one study from one sender: one row, not 6
    row = rows.first
    expect(row).to_contain_text("DOE^JANE")
    expect(row).to_contain_text("CT CHEST")
    expect(row).to_contain_text("CT_SCANNER")
    expect(row.locator("[data-instances]")).to_contain_text("6 in 2 series")
    expect(row.locator("[data-destination=archive]")).to_have_text("archive: 6/6 delivered")
    expect(row.locator("[data-destination=down]")).to_have_text(
        "down: 0/6 delivered, 6 retrying")
    expect(row.locator(".badge")).to_have_text("retrying")
    shot(page, "admin-transfers")

    row.locator("button:has-text('Series')").click()
    series = page.locator("tr.series")
    expect(series).to_have_count(2)
    expect(series.first).to_contain_text("3/3 delivered")
    series.first.locator("button:has-text('Instances')").click()
    instances = page.locator("tr.instance")
    expect(instances).to_have_count(3)
    expect(instances.first).to_contain_text("CT Image Storage")
    expect(instances.first.locator("abbr").first).to_have_attribute(
        "title", "1.2.840.10008.5.1.4.1.1.2")
    expect(instances.first).to_contain_text("archive: delivered")
    shot(page, "admin-transfer-expanded")

    instances.first.locator("a").first.click()  # one instance's job, one click away
    expect(page.locator("h1")).to_contain_text("Job")
    page.go_back()
    page.click("nav.tabs a:has-text('Per instance')")
    expect(page.locator("table.jobs tbody tr")).to_have_count(6)
    shot(page, "admin-jobs-per-instance")
    assert dialogs == []
    context.close()


def server_database(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'db'}"
