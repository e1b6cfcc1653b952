"""A radiologist's day in a real browser (Debian Chromium through Playwright): a study arrives
by storescu; the radiologist logs in and lands on Studies (names and dates written for
people), opens the study and sees its series thumbnails load, opens the OHIF viewer in a new
tab (the router's tab stays), opens an instance's tags and downloads the study as a ZIP.
An admin uploads files from the Studies page. Screenshots go to
test-output/screenshots/radiologist-*.png.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from router.application.commands import Actor
from tests.conftest import ADMIN_PASSWORD, wait_for
from tests.e2e.test_ohif_viewer import LIT_CANVASES
from tests.integration.test_web_jobs import storescu, write_instances
from web import viewer

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
SHOTS = Path(__file__).resolve().parents[2] / "test-output" / "screenshots"
PASSWORD = "radiologist password"
# Every thumbnail's naturalWidth (0 while loading or when it failed).
THUMB_WIDTHS = "() => Array.from(document.querySelectorAll('img.thumb')).map(i => i.naturalWidth)"


@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    assert Path(CHROMIUM).exists(), "Debian chromium is missing: run scripts/test"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


def shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"radiologist-{name}.png"), full_page=True)


def arrive(server: Any, tmp_path: Path) -> dict[str, Any]:
    """Two CT series of one study (64 x 64 images) from a modality."""
    first = write_instances(tmp_path / "a", "CT", 3, PatientID="RAD-1",
                            PatientName="DOE^JANE^^^", StudyDate="20240115",
                            StudyDescription="CT CHEST")
    study = str(pydicom.dcmread(first[0]).StudyInstanceUID)
    second = write_instances(tmp_path / "b", "CT", 2, PatientID="RAD-1",
                             PatientName="DOE^JANE^^^", StudyDate="20240115",
                             StudyInstanceUID=study, SeriesNumber=2)
    files = [*first, *second]
    assert storescu(server.router.dicom.port, files, "CT_SCANNER").returncode == 0
    wait_for(lambda: server.router.view_db("studies").query(
        "SELECT number_of_instances AS n FROM studies")[0]["n"] == 5, 30, "the study indexed")
    return {"study": study, "sops": {str(pydicom.dcmread(p).SOPInstanceUID) for p in files},
            "series": {str(pydicom.dcmread(p).SeriesInstanceUID) for p in files}}


def log_in(page: Page, base: str) -> None:
    page.goto(base + "/login")
    page.fill("input[name=username]", "rad")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    expect(page).to_have_url(base + "/studies")  # a radiologist's work starts here


def open_viewer_in_new_tab(page: Page, base: str, study: str) -> None:
    with page.context.expect_page() as opened:
        page.click("a:has-text('Open in the viewer')")
    tab = opened.value
    tab.wait_for_load_state()
    assert tab.url == f"{base}/ohif/viewer?StudyInstanceUIDs={study}"
    wait_for(lambda: tab.evaluate(LIT_CANVASES) >= 1, 90, "the study on a viewer canvas")
    shot(tab, "viewer")
    tab.close()
    assert page.url == f"{base}/studies/{study}"  # the router's tab stayed where it was


@pytest.mark.slow
@pytest.mark.dcmtk
def test_a_radiologist_reads_a_study_from_the_browser(
        chromium: Browser, web_router: Any, tmp_path: Path, dcmtk: None) -> None:
    assert viewer.load_dist()[0] is not None, "run scripts/fetch-ohif (scripts/test does)"
    server = web_router()
    server.router.users.add("rad", "radiologist", PASSWORD, Actor("admin"))
    sent = arrive(server, tmp_path)
    base = server.url
    context = chromium.new_context(accept_downloads=True, viewport={"width": 1280,
                                                                    "height": 900})
    page = context.new_page()
    failed: list[str] = []
    page.on("response", lambda r: r.status >= 400 and failed.append(f"{r.status} {r.url}"))

    log_in(page, base)
    row = page.locator("table.studies tbody tr").first
    expect(row).to_contain_text("DOE, JANE")
    expect(row).to_contain_text("2024-01-15")
    expect(row).not_to_contain_text("DOE^JANE")
    shot(page, "studies")

    page.click("table.studies a:has-text('DOE, JANE')")
    expect(page).to_have_url(f"{base}/studies/{sent['study']}")
    expect(page.locator("img.thumb")).to_have_count(2)
    wait_for(lambda: all(w > 0 for w in page.evaluate(THUMB_WIDTHS)), 30,
             "both series thumbnails loaded")
    assert page.evaluate(THUMB_WIDTHS) == [96, 96]
    shot(page, "study")

    open_viewer_in_new_tab(page, base, sent["study"])

    page.locator("details.series summary").first.click()
    instance = page.locator("table.instances a[href*='/instances/']").first
    instance.click()
    expect(page).to_have_url(re.compile(r"/studies/[0-9.]+/series/[0-9.]+/instances/[0-9.]+$"))
    expect(page.locator("table.tags")).to_contain_text("Patient's Name")
    expect(page.locator("table.tags")).to_contain_text("pixel data")
    shot(page, "instance")

    page.goto(f"{base}/studies/{sent['study']}")
    with page.expect_download() as download:
        page.click("a:has-text('Download study (ZIP)')")
    saved = tmp_path / "study.zip"
    download.value.save_as(saved)
    assert download.value.suggested_filename == f"study-{sent['study']}.zip"
    with zipfile.ZipFile(saved) as archive:
        names = archive.namelist()
    assert {name.split("/")[1].removesuffix(".dcm") for name in names} == sent["sops"]
    assert {name.split("/")[0] for name in names} == sent["series"]
    assert failed == []

    server.router.runner.catch_up()
    actions = {r["action"] for r in server.router.view_db("audit").query(
        "SELECT action FROM audit WHERE actor = 'rad'")}
    assert {"studies.search", "study.view", "viewer.open", "instance.view",
            "study.export", "dicomweb.thumbnail"} <= actions


@pytest.mark.dcmtk
def test_files_uploaded_from_the_studies_page_are_listed_one_by_one(
        chromium: Browser, web_router: Any, tmp_path: Path) -> None:
    server = web_router()
    dicom = write_instances(tmp_path / "up", "CT", 1, PatientID="UP-1")[0]
    text = tmp_path / "notes.txt"
    text.write_text("not DICOM")
    page = chromium.new_context().new_page()
    page.goto(server.url + "/login")
    page.fill("input[name=username]", "admin")
    page.fill("input[name=password]", ADMIN_PASSWORD)
    page.click("button[type=submit]")
    page.goto(server.url + "/studies")
    page.set_input_files("form.upload input[type=file]", [str(dicom), str(text)])
    page.click("form.upload button[type=submit]")
    results = page.locator("#upload-results")
    expect(results).to_contain_text("1 of 2 file(s) stored.", timeout=30_000)
    expect(results.locator("tr[data-result=stored]")).to_contain_text(dicom.name)
    expect(results.locator("tr[data-result=refused]")).to_contain_text(
        "the file is not a DICOM Part 10 file")
    expect(page).to_have_url(server.url + "/studies")  # HTMX: the page stayed
    shot(page, "upload")
    jobs = server.router.view_db("jobs").query("SELECT source, actor FROM jobs")
    assert [(j["source"], j["actor"]) for j in jobs] == [("stow", "admin")]
