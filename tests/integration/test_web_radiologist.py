"""The radiologist's daily path in the web UI against a real router (storescu sends a study):
each role's landing page, names and dates written for people, series thumbnails from the
rendered WADO endpoint, the instance page with its tags, ZIP downloads (streamed, names from
UIDs), browser uploads through the STOW-RS path, the favicon; each access in the audit trail.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import tracemalloc
import zipfile
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from PIL import Image

from router.application.commands import Actor
from tests.conftest import ADMIN_PASSWORD, wait_for
from tests.integration.test_web_jobs import accesses, routed_settings, storescu, write_instances
from tests.synthetic import make_ct_series
from tests.web_harness import Browser

pytestmark = pytest.mark.dcmtk

PASSWORD = "a long enough password"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
PIXEL_KEYWORDS = ("PixelData", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit",
                  "PixelRepresentation", "SamplesPerPixel", "PhotometricInterpretation",
                  "RescaleIntercept", "RescaleSlope", "WindowCenter", "WindowWidth")


def users(server: Any) -> None:
    for name, role in (("rad", "radiologist"), ("aud", "auditor"), ("ops", "operator")):
        server.router.users.add(name, role, PASSWORD, Actor("admin"))


def logged_in(server: Any, name: str) -> Browser:
    browser = Browser(server.url)
    browser.login(name, ADMIN_PASSWORD if name == "admin" else PASSWORD)
    return browser


def report_without_pixels(source: Path, target: Path) -> Path:
    """A Basic Text SR in the study of ``source``, in its own series: nothing to render."""
    ds = pydicom.dcmread(source)
    for keyword in PIXEL_KEYWORDS:
        if keyword in ds:
            delattr(ds, keyword)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = BASIC_TEXT_SR
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.Modality, ds.SeriesNumber = "SR", 99
    ds.save_as(target, enforce_file_format=True)
    return target


def send_study(server: Any, tmp_path: Path) -> dict[str, Any]:
    """Three CT images of DOE^JOHN (a private tag each) and an SR without pixels."""
    ct = write_instances(tmp_path / "ct", "CT", 3, PatientID="PID-7", PatientName="DOE^JOHN^^^",
                         StudyDate="20240115", StudyTime="140322.25",
                         PatientBirthDate="19700304", StudyDescription="<b>CHEST</b>")
    for path in ct:
        ds = pydicom.dcmread(path)
        block = ds.private_block(0x0029, "ACME 1.0", create=True)
        block.add_new(0x01, "LO", "PRIVATE-SECRET")
        ds.save_as(path)
    report = report_without_pixels(ct[0], tmp_path / "sr.dcm")
    assert storescu(server.router.dicom.port, [*ct, report], "CT_SCANNER").returncode == 0
    server.router.runner.catch_up()
    first = pydicom.dcmread(ct[0])
    return {"study": str(first.StudyInstanceUID), "series": str(first.SeriesInstanceUID),
            "sr_series": str(pydicom.dcmread(report).SeriesInstanceUID),
            "sops": {str(pydicom.dcmread(p).SOPInstanceUID) for p in ct},
            "sr_sop": str(pydicom.dcmread(report).SOPInstanceUID), "files": [*ct, report]}


def test_each_role_lands_where_its_work_is(web_router: Any) -> None:
    server = web_router()
    users(server)
    for name, landing, heading in (("admin", "/", "<h1>Dashboard</h1>"),
                                   ("ops", "/", "<h1>Dashboard</h1>"),
                                   ("rad", "/studies", "<h1>Studies</h1>"),
                                   ("aud", "/audit", "<h1>Audit")):
        browser = Browser(server.url)
        response = browser.login(name, ADMIN_PASSWORD if name == "admin" else PASSWORD)
        assert response.url == server.url + landing, name
        assert response.status_code == 200 and heading in response.text, name
        assert 'href="/dashboard"' in response.text  # every role may still open it
        root = browser.get(server.url + "/", allow_redirects=False)
        assert (root.status_code, root.headers.get("Location")) == (
            (200, None) if landing == "/" else (302, landing)), name
    dashboard = logged_in(server, "rad").get(server.url + "/dashboard")
    assert dashboard.status_code == 200 and "<h1>Dashboard</h1>" in dashboard.text
    assert re.search(r'<a href="/dashboard" class="active"', dashboard.text)


def test_favicon_is_served_and_linked(web_router: Any) -> None:
    server = web_router()
    icon = requests.get(server.url + "/favicon.ico", timeout=10)
    assert icon.status_code == 200 and icon.headers["Content-Type"] == "image/x-icon"
    assert icon.content[:4] == b"\x00\x00\x01\x00"  # an ICO directory
    assert Image.open(io.BytesIO(icon.content)).size == (32, 32)
    svg = requests.get(server.url + "/static/favicon.svg", timeout=10)
    assert svg.status_code == 200 and svg.text.startswith("<svg")
    login = requests.get(server.url + "/login", timeout=10).text
    assert '<link rel="icon" href="/favicon.ico"' in login
    assert '<link rel="icon" href="/static/favicon.svg"' in login


def test_study_pages_show_people_dates_thumbnails_and_instance_tags(
        database_url: str, web_router: Any, tmp_path: Path) -> None:
    server = web_router(routed_settings(tmp_path, database_url))
    users(server)
    sent = send_study(server, tmp_path)
    rad = logged_in(server, "rad")
    studies = rad.get(server.url + "/studies").text
    assert "DOE, JOHN" in studies and "DOE^JOHN" not in studies
    assert "2024-01-15" in studies and "20240115" not in studies and "1970-03-04" in studies
    assert re.search(r'href="/viewer\?StudyInstanceUIDs=[0-9.]+" target="_blank" '
                     r'rel="noopener"', studies)

    page = rad.get(f"{server.url}/studies/{sent['study']}").text
    assert "2024-01-15 14:03:22" in page and "DOE, JOHN" in page
    assert "&lt;b&gt;CHEST&lt;/b&gt;" in page and "<b>CHEST" not in page
    assert 'target="_blank" rel="noopener">Open in the viewer' in page
    thumbs = re.findall(r'<img class="thumb" src="([^"]+)" loading="lazy"', page)
    assert thumbs == [f"/dicom-web/studies/{sent['study']}/series/{sent['series']}"
                      "/thumbnail?viewport=96,96"]
    assert page.count('class="thumb placeholder"') == 1  # the SR
    thumb = rad.get(server.url + thumbs[0].replace("&amp;", "&"))
    assert thumb.status_code == 200 and thumb.headers["Content-Type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) == 96

    sop = sorted(sent["sops"])[0]
    link = f"/studies/{sent['study']}/series/{sent['series']}/instances/{sop}"
    assert f'href="{link}"' in page
    instance = rad.get(server.url + link)
    assert instance.status_code == 200
    assert "(0010,0010)" in instance.text and "DOE^JOHN" in instance.text  # the raw value
    # SOP class and transfer syntax by name, the UID on hover (the job page's way)
    assert re.search(r'<dd><abbr title="[0-9.]+">[A-Z][A-Za-z ]+ Storage</abbr></dd>',
                     instance.text)
    assert re.search(r'<dd><abbr title="1\.2\.840\.10008\.1\.2[.0-9]*">[A-Z][A-Za-z ]+'
                     r'</abbr></dd>', instance.text)
    assert "private tag: value not shown" in instance.text
    assert "PRIVATE-SECRET" not in instance.text
    assert "pixel data: 512 bytes, not shown" in instance.text  # 16 x 16 x 2 bytes
    assert "&lt;b&gt;CHEST&lt;/b&gt;" in instance.text
    assert f'src="/dicom-web/studies/{sent["study"]}' in instance.text  # a preview
    sr = rad.get(f"{server.url}/studies/{sent['study']}/series/{sent['sr_series']}"
                 f"/instances/{sent['sr_sop']}")
    assert sr.status_code == 200 and 'class="preview"' not in sr.text
    for bad in (f"/studies/{sent['study']}/series/{sent['series']}/instances/1.2.3",
                f"/studies/{sent['study']}/series/..%2F..%2Fetc/instances/{sop}"):
        assert rad.get(server.url + bad).status_code == 404, bad

    views = accesses(server.router, "instance.view")
    assert [(a["actor"], a["object_id"], a["patient_id"], a["outcome"]) for a in views[:2]] == [
        ("rad", sop, "PID-7", "success"), ("rad", sent["sr_sop"], "PID-7", "success")]
    assert views[-1]["outcome"] == "not_found"
    assert any(a["actor"] == "rad" for a in accesses(server.router, "dicomweb.thumbnail"))


def said(access: dict[str, Any]) -> str:
    """The detail text of an access row (the audit view keeps the event's fields as JSON)."""
    return str(json.loads(access["detail"])["detail"])


def zip_entries(response: requests.Response) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        assert archive.testzip() is None
        return {name: archive.read(name) for name in archive.namelist()}


def test_study_series_and_instance_downloads_are_streamed_zips(
        database_url: str, web_router: Any, tmp_path: Path) -> None:
    server = web_router(routed_settings(tmp_path, database_url))
    users(server)
    sent = send_study(server, tmp_path)
    rad = logged_in(server, "rad")
    base = f"{server.url}/studies/{sent['study']}"

    study = rad.get(base + "/download")
    assert study.status_code == 200 and study.headers["Content-Type"] == "application/zip"
    assert study.headers["Transfer-Encoding"] == "chunked"  # streamed, no length known ahead
    assert study.headers["Content-Disposition"] == (
        f'attachment; filename="study-{sent["study"]}.zip"')
    entries = zip_entries(study)
    saved = tmp_path / "study.zip"
    saved.write_bytes(study.content)
    tested = subprocess.run(["unzip", "-t", str(saved)], capture_output=True, text=True,
                            timeout=60)  # Info-ZIP reads it too (data descriptors, zip64)
    assert tested.returncode == 0 and "No errors detected" in tested.stdout, tested.stdout
    expected = {f"{sent['series']}/{sop}.dcm" for sop in sent["sops"]}
    assert set(entries) == expected | {f"{sent['sr_series']}/{sent['sr_sop']}.dcm"}
    originals = {str(pydicom.dcmread(p).SOPInstanceUID): pydicom.dcmread(p)
                 for p in sent["files"]}
    for name, data in entries.items():
        ds = pydicom.dcmread(io.BytesIO(data))
        original = originals[str(ds.SOPInstanceUID)]
        assert name.endswith(f"/{ds.SOPInstanceUID}.dcm")
        assert ds.get("PixelData") == original.get("PixelData")
        assert ds.PatientName == "DOE^JOHN^^^"

    series = zip_entries(rad.get(f"{base}/series/{sent['series']}/download"))
    assert set(series) == expected
    sop = sorted(sent["sops"])[0]
    one = zip_entries(rad.get(f"{base}/series/{sent['series']}/instances/{sop}/download"))
    assert list(one) == [f"{sent['series']}/{sop}.dcm"]
    for bad in ("/studies/1.2.3/download", f"/studies/{sent['study']}/series/9.9/download",
                "/studies/..%2F..%2Fetc/download"):
        assert rad.get(server.url + bad).status_code == 404, bad

    exports = accesses(server.router, "study.export")
    assert [(a["actor"], a["outcome"], said(a)) for a in exports[:3]] == [
        ("rad", "success", "ZIP download: 4 of 4 instance(s) sent"),
        ("rad", "success", "ZIP download: 3 of 3 instance(s) sent"),
        ("rad", "success", "ZIP download: 1 of 1 instance(s) sent")]
    assert all(a["patient_id"] == "PID-7" and a["study_instance_uid"] == sent["study"]
               for a in exports[:3])
    assert [a["outcome"] for a in exports[3:]] == ["not_found"] * 3


def upload(browser: Browser, files: list[tuple[str, bytes]], htmx: bool = False
           ) -> requests.Response:
    headers = {"HX-Request": "true"} if htmx else {}
    if not htmx:  # a plain form: the CSRF token travels in the form, not in a header
        browser.csrf, token = "", browser.csrf
        try:
            return browser.post(browser.url("/studies/upload"), headers=headers,
                                data={"csrf_token": token},
                                files=[("files", f) for f in files])
        finally:
            browser.csrf = token
    return browser.post(browser.url("/studies/upload"), headers=headers,
                        files=[("files", f) for f in files])


def test_browser_uploads_go_through_stow_with_a_result_per_file(
        web_router: Any, tmp_path: Path) -> None:
    server = web_router(routed_settings(tmp_path, f"sqlite:///{tmp_path / 'db'}"))
    users(server)
    admin = logged_in(server, "admin")
    studies = admin.get(server.url + "/studies").text
    assert 'action="/studies/upload"' in studies and 'type="file" name="files" multiple' in studies
    assert 'type="file"' not in logged_in(server, "rad").get(server.url + "/studies").text

    mr = write_instances(tmp_path / "mr", "MR", 2, PatientID="PID-UP")
    hostile = "<img src=x onerror=alert(1)>.dcm"
    files = [(p.name, p.read_bytes()) for p in mr] + [
        ("notes.txt", b"not DICOM at all"), (hostile, b"\x00" * 300)]
    page = upload(admin, files)
    assert page.status_code == 200, page.text
    assert "2 of 4 file(s) stored." in page.text
    assert page.text.count('data-result="stored"') == 2
    assert page.text.count('data-result="refused"') == 2
    assert "the file is not a DICOM Part 10 file" in page.text
    assert hostile not in page.text and "&lt;img src=x onerror=alert(1)&gt;.dcm" in page.text
    # STOW-RS answers once its instances are in the studies view; the jobs view may trail.
    def uploaded_jobs() -> list[dict[str, Any]]:
        rows = server.router.view_db("jobs").query(
            "SELECT source, actor, sop_instance_uid FROM jobs ORDER BY received_at")
        return rows if len(rows) >= len(mr) else []

    jobs = wait_for(uploaded_jobs, 10, "both uploaded jobs in the jobs view")
    assert {(j["source"], j["actor"]) for j in jobs} == {("stow", "admin")}
    assert {j["sop_instance_uid"] for j in jobs} == {
        str(pydicom.dcmread(p).SOPInstanceUID) for p in mr}
    stored = accesses(server.router, "study.store")
    assert any(said(a) == "STOW-RS: stored 2, failed 0" and a["patient_id"] == "PID-UP"
               for a in stored)
    assert any(said(a) == "browser upload: 2 file(s) refused, not DICOM Part 10"
               for a in stored)

    again = upload(admin, files[:1], htmx=True)  # HTMX: the fragment only, streamed form
    assert again.status_code == 200 and "<html" not in again.text
    assert 'data-result="stored"' in again.text  # a duplicate is stored (not re-routed)

    bad = admin.post(server.url + "/studies/upload", data={"files": "x"})
    assert bad.status_code == 400 and "multipart/form-data" in bad.text
    empty = upload(admin, [("", b"")])  # what a browser sends when no file was chosen
    assert empty.status_code == 400 and "choose at least one file" in empty.text
    rad = logged_in(server, "rad")
    assert rad.post(server.url + "/studies/upload", files=[("files", files[0])]
                    ).status_code == 403


@pytest.mark.slow
def test_a_big_study_downloads_without_being_held_in_memory(web_router: Any,
                                                            tmp_path: Path) -> None:
    """40 CT images of 512 x 512 (about 21 MB): the server's Python allocations while the ZIP
    streams stay a small fraction of it (the client drops each chunk as it comes)."""
    server = web_router(routed_settings(tmp_path, f"sqlite:///{tmp_path / 'db'}"))
    files = make_ct_series(tmp_path / "big", count=40, rows=512, cols=512)
    assert storescu(server.router.dicom.port, files, "CT_SCANNER").returncode == 0
    server.router.runner.catch_up()
    study = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    admin = logged_in(server, "admin")
    total = sum(p.stat().st_size for p in files)
    tracemalloc.start()
    try:
        received = 0
        with admin.get(f"{server.url}/studies/{study}/download", stream=True) as response:
            assert response.status_code == 200
            for chunk in response.iter_content(256 * 1024):
                received += len(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert received > total // 4  # the pixel data is compressible, not absent
    assert peak < total // 3, f"peak {peak} bytes of Python memory for {total} bytes"
