"""The patient access report and the audit search's new parts against a running router:
real DICOM from DCMTK storescu, a radiologist who opens a study page, the viewer and its
DICOMweb reads and downloads the study; an auditor who finds the patient by name, reads the
report (the viewer's reads folded into one row), exports it, prints it, and compares two
versions of a rule. Every read of the report is itself recorded.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests

from router.application.commands import Actor
from tests.conftest import make_settings, wait_for
from tests.integration.test_web_audit import storescu, study_of
from tests.synthetic import make_ct_series
from tests.web_harness import Browser, WebServer, bearer
from web import viewer

PATIENT = "PAT-ACCESS-1"
HOSTILE = "<img src=x onerror=alert(1)>"
AUDITOR = ("auditor1", "auditor password 1")
RADIOLOGIST = ("rad1", "radiologist pass 1")
OPERATOR = ("op1", "operator password 1")


def audit_rows(server: WebServer, where: str, params: tuple[Any, ...] = ()) -> list[Any]:
    return list(server.router.view_db("audit").query(
        f"SELECT * FROM audit WHERE {where} ORDER BY occurred_at", params))


def start(web_router: Any, tmp_path: Path, database_url: str) -> tuple[WebServer, list[Path],
                                                                           list[Path]]:
    (tmp_path / "archive").mkdir()
    settings = make_settings(tmp_path, database_url)
    settings = settings.__class__(**{**settings.__dict__, "destinations": (
        {"name": "archive", "type": "file", "path": str(tmp_path / "archive")},),
        "rules": ({"name": "everything", "calling_aet": "CT_*", "destinations": ["archive"],
                   "description": "all CT to the archive"},)})
    server = web_router(settings)
    admin = Actor("admin", "127.0.0.1")
    for name, role, password in ((*AUDITOR[:1], "auditor", AUDITOR[1]),
                                 (RADIOLOGIST[0], "radiologist", RADIOLOGIST[1]),
                                 (OPERATOR[0], "operator", OPERATOR[1])):
        server.router.users.add(name, role, password, admin)
    files = make_ct_series(tmp_path / "p1", count=4, rows=16, cols=16, patient_id=PATIENT)
    evil = make_ct_series(tmp_path / "p2", count=1, rows=16, cols=16, patient_id=HOSTILE)
    storescu(server.router.dicom.port, files + evil)
    wait_for(lambda: len(audit_rows(server, "action = 'Delivery.Succeeded'")) == 5, 60,
             "five deliveries in the audit view")
    return server, files, evil


def radiologist_reads(server: WebServer, files: list[Path]) -> None:
    """A study page, the viewer with its metadata and frame reads, then a download."""
    study = study_of(files[0])
    rad = Browser(server.url)
    rad.login(*RADIOLOGIST)
    assert rad.get(rad.url(f"/studies/{study}")).status_code == 200
    opened = rad.get(rad.url(f"/viewer?StudyInstanceUIDs={study}"), allow_redirects=False)
    assert opened.status_code == 302, opened.text[:300]
    base = f"/dicom-web/studies/{study}"
    assert rad.get(rad.url(base + "/metadata")).status_code == 200
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        frames = rad.get(rad.url(f"{base}/series/{ds.SeriesInstanceUID}/instances/"
                                 f"{ds.SOPInstanceUID}/frames/1"),
                         headers={"Accept": "multipart/related; type=application/octet-stream"})
        assert frames.status_code == 200
    download = requests.get(server.url + base, timeout=30, headers={
        **bearer(server.url, *RADIOLOGIST),
        "Accept": 'multipart/related; type="application/dicom"'})
    assert download.status_code == 200


def requires_dist() -> None:
    if viewer.load_dist()[0] is None:
        pytest.fail("the OHIF dist is missing: run scripts/fetch-ohif (scripts/test does)")


@pytest.mark.dcmtk
@pytest.mark.slow
def test_the_report_folds_a_viewer_session_and_lists_the_download_and_the_study_page(
        database_url: str, web_router: Any, tmp_path: Path, dcmtk: None) -> None:
    requires_dist()
    server, files, _ = start(web_router, tmp_path, database_url)
    radiologist_reads(server, files)
    study = study_of(files[0])
    # The viewer's row names the study only; the view gives it the study's patient.
    wait_for(lambda: audit_rows(server, "action = 'dicomweb.retrieve'"), 20, "the download")
    assert [r["patient_id"] for r in audit_rows(server, "action = 'viewer.open'")] == [PATIENT]

    auditor = Browser(server.url)
    auditor.login(*AUDITOR)
    found = auditor.get(auditor.url("/audit/access"), params={"q": "synthetic^ct^pat-access"})
    assert found.status_code == 200 and f'data-patient="{PATIENT}"' in found.text
    as_shown = auditor.get(auditor.url("/audit/access"), params={"q": "Synthetic, CT"})
    assert f'data-patient="{PATIENT}"' in as_shown.text  # the name as the pages write it
    page = auditor.get(auditor.url("/audit/access"), params={"patient": PATIENT})
    assert page.status_code == 200
    kinds = re.findall(r'<tr data-kind="([^"]+)" data-actor="([^"]+)">.*?'
                       r'<td class="count">(\d+)</td>', page.text, re.S)
    assert kinds == [("Study page", "rad1", "1"), ("Viewer session", "rad1", "6"),
                     ("DICOMweb retrieval", "rad1", "1")], kinds
    assert "radiologist" in page.text and "Delivery" not in page.text
    assert '<time class="ts" datetime="' in page.text

    export = auditor.get(auditor.url("/audit/access.csv"), params={"patient": PATIENT})
    assert export.status_code == 200 and export.headers["Content-Type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(export.text)))
    assert [(r["what"], r["count"], r["role"], r["study_instance_uid"]) for r in rows] == [
        ("Study page", "1", "radiologist", study), ("Viewer session", "6", "radiologist", study),
        ("DICOMweb retrieval", "1", "radiologist", study),
        ("Access report", "1", "auditor", "")]  # the page read just before: an access too
    assert "dicomweb.frames x4" in rows[1]["actions"] and rows[1]["client_ip"] == "127.0.0.1"
    printed = auditor.get(auditor.url("/audit/access/print"), params={"patient": PATIENT})
    assert printed.status_code == 200 and "@media print" not in printed.text
    assert 'class="topbar"' not in printed.text and "Viewer session" in printed.text

    def reads() -> list[Any]:
        # (Not audit.search: an auditor lands on the audit search after logging in.)
        rows = audit_rows(server, "actor = ? AND action LIKE ? AND action != ?",
                          (AUDITOR[0], "audit.%", "audit.search"))
        return rows if len(rows) >= 5 else []
    recorded = wait_for(reads, 20, "the auditor's reads")
    assert [(r["action"], r["patient_id"]) for r in recorded] == [
        ("audit.patient_search", None), ("audit.patient_search", None),
        ("audit.access_report", PATIENT),
        ("audit.access_report_export", PATIENT), ("audit.access_report", PATIENT)]

    headers = bearer(server.url, *AUDITOR)
    api = requests.get(server.url + "/api/v1/audit/access-report", headers=headers,
                       params={"patient": PATIENT, "to": "2099-01-01"}, timeout=30)
    assert api.status_code == 200, api.text
    viewed = api.json()["accesses"][1]
    assert (viewed["what"], viewed["count"], viewed["role"], viewed["client_ips"]) == (
        "Viewer session", 6, "radiologist", ["127.0.0.1"])
    assert viewed["actions"] == {"dicomweb.frames": 4, "viewer.open": 1,
                                 "dicomweb.metadata": 1}
    missing = requests.get(server.url + "/api/v1/audit/access-report", headers=headers,
                           params={"from": "yesterday"}, timeout=30)
    assert missing.status_code == 422
    assert set(missing.json()["error"]["fields"]) == {"from"}
    missing = requests.get(server.url + "/api/v1/audit/access-report", headers=headers,
                           timeout=30)
    assert missing.json()["error"]["fields"] == {"patient": "give the Patient ID"}
    again = list(csv.DictReader(io.StringIO(auditor.get(
        auditor.url("/audit/access.csv"), params={"patient": PATIENT}).text)))
    assert [r["what"] for r in again[3:]] == [
        "Access report", "Access report export", "Access report", "Access report"]


@pytest.mark.dcmtk
@pytest.mark.slow
def test_bad_input_roles_and_hostile_patient_ids(
        database_url: str, web_router: Any, tmp_path: Path, dcmtk: None) -> None:
    server, _, evil = start(web_router, tmp_path, database_url)
    auditor = Browser(server.url)
    auditor.login(*AUDITOR)
    for params, field in (({}, "patient"), ({"patient": PATIENT, "from": "last week"}, "from"),
                          ({"patient": "x" * 300}, "patient"),
                          ({"patient": PATIENT, "from": "2024-02-01", "to": "2024-01-01"},
                           "to")):
        r = auditor.get(auditor.url("/audit/access.csv"), params=params)
        assert r.status_code == 400 and r.text.startswith(f"{field}:"), (params, r.text)
    page = auditor.get(auditor.url("/audit/access"), params={"patient": PATIENT, "to": "soon"})
    assert page.status_code == 400 and "to: expected ISO 8601" in page.text
    for who in (RADIOLOGIST, OPERATOR):
        other = Browser(server.url)
        other.login(*who)
        for path in ("/audit/access?patient=x", "/audit/access.csv?patient=x",
                     "/audit/versions?object=x"):
            assert other.get(other.url(path), allow_redirects=False).status_code == 403
    # A patient ID with markup is shown as text, never as markup.
    found = auditor.get(auditor.url("/audit/access"), params={"q": "<img"})
    assert HOSTILE not in found.text and "&lt;img src=x onerror=alert(1)&gt;" in found.text
    study = study_of(evil[0])
    rad = Browser(server.url)
    rad.login(*RADIOLOGIST)
    rad.get(rad.url(f"/studies/{study}"))
    wait_for(lambda: audit_rows(server, "action = 'study.view'"), 20, "the study view")
    page = auditor.get(auditor.url("/audit/access"), params={"patient": HOSTILE})
    assert page.status_code == 200 and HOSTILE not in page.text and "Study page" in page.text
    export = auditor.get(auditor.url("/audit/access.csv"), params={"patient": HOSTILE})
    assert next(csv.DictReader(io.StringIO(export.text)))["what"] == "Study page"


@pytest.mark.dcmtk
@pytest.mark.slow
def test_audit_search_picker_changes_and_a_side_by_side_rule_diff(
        database_url: str, web_router: Any, tmp_path: Path, dcmtk: None) -> None:
    server, _, _ = start(web_router, tmp_path, database_url)
    admin = Actor("admin", "127.0.0.1")
    server.router.commands.put_rule({
        "name": "everything", "calling_aet": "CT_*", "destinations": ["archive"],
        "match": [{"tag": "BodyPartExamined", "op": "eq", "value": "HEAD"}],
        "description": "head CT only"}, admin)
    wait_for(lambda: audit_rows(server, "action = 'Rule.Updated'"), 20, "the rule change")
    auditor = Browser(server.url)
    auditor.login(*AUDITOR)
    page = auditor.get(auditor.url("/audit"), params={"action": "Rule.Updated"})
    assert page.status_code == 200
    assert '<optgroup label="Access to patient data">' in page.text
    assert '<option value="Rule.Updated" selected>Rule changed</option>' in page.text
    row = re.search(r'<tr data-action="Rule.Updated">.*?</tr>\s*</tbody>\s*</table>\s*'
                    r'(?:<dl.*?</dl>)?\s*</td>\s*</tr>', page.text, re.S)
    assert row, page.text[-3000:]
    changed = dict(re.findall(r'<tr data-field="([^"]+)"><th>[^<]+</th><td>([^<]*)</td>',
                              row.group(0)))
    assert set(changed) == {"match", "description"} and changed["match"] == ""
    assert "head CT only" in row.group(0) and "all CT to the archive" in row.group(0)
    link = re.search(r'href="(/audit/versions\?object=[^"]+)"', row.group(0))
    assert link
    diff = auditor.get(auditor.url(link.group(1).replace("&amp;", "&")))
    assert diff.status_code == 200
    highlighted = re.findall(r'<tr data-field="([^"]+)" class="changed">', diff.text)
    assert set(highlighted) == {"match", "description"}
    assert '<tr data-field="calling_aet"><th>' in diff.text  # unchanged: shown, not marked
    # The API's action filter keeps working, and takes lists.
    headers = bearer(server.url, *AUDITOR)
    api = requests.get(server.url + "/api/v1/audit", timeout=30, headers=headers,
                       params={"action": "Rule.Updated,Delivery.Succeeded"}).json()
    assert {i["action"] for i in api["items"]} == {"Rule.Updated", "Delivery.Succeeded"}
    assert requests.get(server.url + "/api/v1/audit", timeout=30, headers=headers,
                        params={"action": "Delivery.*"}).json()["total"] == 10  # 5 + 5
    bad = auditor.get(auditor.url("/audit/versions"), params={"object": "../../etc"})
    assert bad.status_code == 400 and "object:" in bad.text
    assert auditor.get(auditor.url("/audit/versions"), params={
        "object": "00000000-0000-0000-0000-000000000000"}).status_code == 404
    assert wait_for(lambda: audit_rows(server, "action = 'audit.versions'"), 20, "the diff read")
