"""The HIPAA audit trail against a running router: real DICOM from DCMTK storescu, a file
destination that works and a DICOM destination that is down, logins through the form and
bearer tokens; search, paging, exports (CSV neutralised), study history, state as of a time
and the CLI export, each of which is itself recorded.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests

from projections import audit_queries as queries
from router.application.commands import Actor
from router.application.sessions import AccessRecord
from router.domain.users import user_id
from tests.conftest import make_settings, wait_for
from tests.integration.peers import free_port
from tests.synthetic import make_ct_series
from tests.web_harness import Browser, WebServer, bearer

EVIL = '=HYPERLINK("http://evil.test","open")'
PATIENT = "PAT001"
AUDITOR = ("auditor1", "auditor password 1")
RADIOLOGIST = ("rad1", "radiologist pass 1")
SECRET = "wJalrXUtnFEMI-K7MDENG-not-a-real-key"


@dataclass
class Scene:
    """A router that received two studies and delivered (or tried to) each instance twice."""

    server: WebServer
    tmp_path: Path
    study: str  # PATIENT's study, 3 instances
    evil_study: str  # EVIL's study, 2 instances
    between: float  # after PATIENT's study was handled, before EVIL's arrived
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def router(self) -> Any:
        return self.server.router

    def audit(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        return list(self.router.view_db("audit").query(sql, params))

    def count(self, where: str, params: tuple[Any, ...] = ()) -> int:
        return int(self.audit(f"SELECT count(*) AS n FROM audit WHERE {where}", params)[0]["n"])

    def api(self, path: str, **params: Any) -> Any:
        """GET an API path as the auditor (one bearer session per scene)."""
        if not self.headers:
            self.headers.update(bearer(self.server.url, *AUDITOR))
        r = requests.get(self.server.url + path, params=params, timeout=30,
                         headers=self.headers)
        assert r.status_code == 200, r.text
        return r


def storescu(port: int, files: list[Path]) -> None:
    result = subprocess.run(
        ["storescu", "-aet", "CT_SCANNER", "-aec", "DICOMROUTER", "127.0.0.1", str(port),
         *map(str, files)], env={**os.environ, "TCP_NODELAY": "1"}, capture_output=True,
        text=True, timeout=120)
    assert result.returncode == 0 and "E:" not in result.stderr, result.stderr[-2000:]


def start_scene(web_router: Any, tmp_path: Path, database_url: str) -> Scene:
    (tmp_path / "archive").mkdir()
    base = make_settings(tmp_path, database_url)
    # One failed attempt per instance to "down" during the test: the next is an hour away.
    dispatch = replace(base.dispatch, retry_delays=(3600.0,), retry_every_after=3600.0)
    settings = replace(base, dispatch=dispatch, destinations=(
        {"name": "archive", "type": "file", "path": str(tmp_path / "archive")},
        {"name": "down", "type": "dicom", "host": "127.0.0.1", "port": free_port(),
         "ae_title": "NOBODY"},
        {"name": "cloud", "type": "s3", "bucket": "imaging", "region": "us-east-1",
         "endpoint_url": "http://127.0.0.1:9", "access_key_id": "AKIDEXAMPLE",
         "secret_access_key": SECRET},
    ), rules=({"name": "everything", "calling_aet": "CT_*", "destinations": ["archive", "down"]},))
    server = web_router(settings)
    router = server.router
    router.users.add(AUDITOR[0], "auditor", AUDITOR[1], Actor("admin", "127.0.0.1"))
    router.users.add(RADIOLOGIST[0], "radiologist", RADIOLOGIST[1], Actor("admin", "127.0.0.1"))
    first = make_ct_series(tmp_path / "p1", count=3, rows=16, cols=16, patient_id=PATIENT)
    evil = make_ct_series(tmp_path / "evil", count=2, rows=16, cols=16, patient_id=EVIL)
    scene = Scene(server, tmp_path, study_of(first[0]), study_of(evil[0]), 0.0)
    storescu(router.dicom.port, first)
    wait_handled(scene, 3)
    scene.between = time.time()
    time.sleep(0.01)
    storescu(router.dicom.port, evil)
    wait_handled(scene, 5)
    return scene


def study_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def wait_handled(scene: Scene, instances: int) -> None:
    """Each instance delivered to the archive and refused once by the destination that is down."""
    wait_for(lambda: scene.count("action = 'Delivery.Succeeded'") == instances
             and scene.count("action = 'Delivery.AttemptFailed'") == instances, 60,
             f"{instances} deliveries and failed attempts in the audit view")


def wait_access(scene: Scene, action: str, actor: str, count: int = 1) -> list[dict[str, Any]]:
    def found() -> list[dict[str, Any]]:
        rows = scene.audit("SELECT * FROM audit WHERE action = ? AND actor = ?"
                           " ORDER BY occurred_at", (action, actor))
        return rows if len(rows) >= count else []
    rows: list[dict[str, Any]] = wait_for(found, 20, f"{action} by {actor} in the audit view")
    return rows


@pytest.mark.dcmtk
@pytest.mark.slow
def test_search_filters_paging_and_each_search_is_recorded(
    database_url: str, web_router: Any, tmp_path: Path, dcmtk: None,
) -> None:
    scene = start_scene(web_router, tmp_path, database_url)
    r = requests.post(scene.server.url + "/api/v1/auth/token", timeout=30,
                      json={"username": AUDITOR[0], "password": "wrong password 12"})
    assert r.status_code == 401
    scene.headers.update(bearer(scene.server.url, *AUDITOR))
    wait_access(scene, "Session.Started", AUDITOR[0])
    # First search of the trail: its own access row cannot be in its result.
    first = scene.api("/api/v1/audit", user=AUDITOR[0]).json()
    assert first["total"] == len(first["items"]) == 2  # the failed login and the session
    assert not [i for i in first["items"] if i["action"].startswith("audit.")]
    wait_access(scene, "audit.search", AUDITOR[0])
    again = scene.api("/api/v1/audit", user="auditor1").json()
    assert len([i for i in again["items"] if i["action"] == "audit.search"]) == 1

    # Searches by patient are recorded with the patient: count only what came before them.
    between = queries.iso(scene.between)
    by_patient = scene.api("/api/v1/audit", patient=PATIENT, to=between, limit=100).json()
    # Per instance: receipt, routing decision, instance registration, and two deliveries
    # (each created with the outcome of its first attempt).
    assert by_patient["total"] == 3 * 7 == len(by_patient["items"])
    assert {i["study_instance_uid"] for i in by_patient["items"]} == {scene.study}
    times = [i["time"] for i in by_patient["items"]]
    assert times == sorted(times, reverse=True)
    assert scene.api("/api/v1/audit", patient=PATIENT, action="Delivery.*").json()["total"] == 12
    assert scene.api("/api/v1/audit", study=scene.evil_study,
                     action="Job.Received").json()["total"] == 2
    failed = scene.api("/api/v1/audit", patient=PATIENT, outcome="failure").json()["items"]
    assert {i["action"] for i in failed} == {"Delivery.AttemptFailed"} and len(failed) == 3
    # Receipt, routing decision and instance registration; case-insensitive.
    scanner = scene.api("/api/v1/audit", user="ct_scanner").json()
    assert scanner["total"] == 5 * 3 and {i["actor"] for i in scanner["items"]} == {"CT_SCANNER"}
    login = scene.api("/api/v1/audit", user=AUDITOR[0], outcome="failure").json()["items"]
    assert [(i["action"], i["detail"]["reason"]) for i in login] == [
        ("LoginFailure.Recorded", "wrong password")]
    assert scene.api("/api/v1/audit", patient=PATIENT, action="Job.*",
                     **{"from": between}).json()["total"] == 0
    assert scene.api("/api/v1/audit", action="Job.Received",
                     **{"from": between}).json()["total"] == 2

    pages = [scene.api("/api/v1/audit", patient=PATIENT, to=between, limit=5, offset=o).json()
             for o in (0, 5, 10, 15, 20)]
    assert [len(p["items"]) for p in pages] == [5, 5, 5, 5, 1]
    assert {p["total"] for p in pages} == {21}
    assert [i for p in pages for i in p["items"]] == by_patient["items"]

    # The recorded search names the patient it was for, who ran it and from where.
    rows = wait_access(scene, "audit.search", AUDITOR[0], count=4)
    patient_searches = [r for r in rows if r["patient_id"] == PATIENT]
    assert patient_searches and patient_searches[0]["source_ip"] == "127.0.0.1"
    assert {r["outcome"] for r in rows} == {"success"}

    # Keyset pages of the export read the same rows in time order (row-value comparison).
    flt = queries.AuditFilter(patient_id=PATIENT, until=scene.between)  # not the searches
    paged = [row for page in queries.export_pages(scene.router.view_db("audit"), flt,
                                                  page_size=4) for row in page]
    assert [queries.public_row(r) for r in paged] == list(reversed(by_patient["items"]))


@pytest.mark.dcmtk
@pytest.mark.slow
def test_bad_filters_and_roles_without_the_permission_are_refused(
    web_router: Any, tmp_path: Path, dcmtk: None,
) -> None:
    scene = start_scene(web_router, tmp_path, f"sqlite:///{tmp_path / 'db'}")
    url = scene.server.url
    headers = bearer(url, *AUDITOR)
    r = requests.get(url + "/api/v1/audit", params={"from": "last tuesday", "outcome": "meh"},
                     headers=headers, timeout=10)
    assert r.status_code == 422 and set(r.json()["error"]["fields"]) == {"from", "outcome"}
    r = requests.get(url + "/api/v1/audit", params={"from": "2024-02-01", "to": "2024-01-01"},
                     headers=headers, timeout=10)
    assert r.status_code == 422 and "to" in r.json()["error"]["fields"]
    assert requests.get(url + "/api/v1/audit/export", params={"format": "xml"},
                        headers=headers, timeout=10).status_code == 422
    assert requests.get(url + "/api/v1/audit", timeout=10).status_code == 401
    radiologist = bearer(url, *RADIOLOGIST)
    for path in ("/api/v1/audit", "/api/v1/audit/export", "/api/v1/audit/history?study=1",
                 "/api/v1/audit/state", "/audit", "/audit/state"):
        assert requests.get(url + path, headers=radiologist, timeout=10).status_code == 403
    denied = wait_access(scene, "access.denied", RADIOLOGIST[0], count=6)
    assert {r["outcome"] for r in denied} == {"denied"}
    r = requests.get(url + "/audit", allow_redirects=False, timeout=10)
    assert r.status_code == 302 and r.headers["Location"].startswith("/login")


@pytest.mark.dcmtk
@pytest.mark.slow
def test_csv_and_json_exports_follow_the_filters_and_csv_is_neutralised(
    web_router: Any, tmp_path: Path, dcmtk: None,
) -> None:
    scene = start_scene(web_router, tmp_path, f"sqlite:///{tmp_path / 'db'}")
    scene.router.sessions.record(Actor("@SUM(A1)", "10.0.0.9"), AccessRecord(
        action="study.view", object_type="study", object_id="-2+3\r\n=cmd|' /C calc'!A0",
        detail='+1, "quoted", \t=tab'))
    browser = Browser(scene.server.url)
    browser.login(*AUDITOR)
    r = browser.get(browser.url("/api/v1/audit/export"), params={"patient": EVIL}, timeout=30)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/csv")
    assert r.headers["Content-Disposition"].startswith("attachment; filename=")
    assert r.headers["Cache-Control"] == "no-store"
    assert '"\'=HYPERLINK(""http://evil.test"",""open"")"' in r.text
    table = list(csv.reader(io.StringIO(r.text, newline="")))
    assert tuple(table[0]) == queries.COLUMNS
    patient = queries.COLUMNS.index("patient_id")
    assert len(table) - 1 == 2 * 7
    assert {row[patient] for row in table[1:]} == {"'" + EVIL}
    detail = queries.COLUMNS.index("detail")
    assert all(isinstance(json.loads(row[detail]), dict) for row in table[1:])

    wait_access(scene, "study.view", "@SUM(A1)")
    r = browser.get(browser.url("/api/v1/audit/export"), params={"user": "@SUM(A1)"}, timeout=30)
    [header, row] = list(csv.reader(io.StringIO(r.text, newline="")))
    cells = dict(zip(header, row, strict=True))
    assert cells["actor"] == "'@SUM(A1)"
    assert cells["object_id"] == "'-2+3\r\n=cmd|' /C calc'!A0"  # quoted: CR LF kept inside
    assert json.loads(cells["detail"]) == {"detail": '+1, "quoted", \t=tab'}

    r = browser.get(browser.url("/api/v1/audit/export"), timeout=30,
                    params={"patient": EVIL, "format": "json", "action": "Job.*"})
    assert r.headers["Content-Type"].startswith("application/json")
    items = r.json()
    assert len(items) == 4 and {i["patient_id"] for i in items} == {EVIL}  # JSON is not a sheet
    assert [i["time"] for i in items] == sorted(i["time"] for i in items)
    exports = wait_access(scene, "audit.export", AUDITOR[0], count=3)
    assert [r["patient_id"] for r in exports] == [EVIL, None, EVIL]
    assert "format=json rows=4" in exports[2]["detail"]


@pytest.mark.dcmtk
@pytest.mark.slow
def test_study_history_shows_receipts_routing_deliveries_and_accesses_in_order(
    web_router: Any, tmp_path: Path, dcmtk: None,
) -> None:
    scene = start_scene(web_router, tmp_path, f"sqlite:///{tmp_path / 'db'}")
    scene.router.sessions.record(Actor(RADIOLOGIST[0], "10.0.0.7"), AccessRecord(
        action="study.view", object_type="study", object_id=scene.study,
        study_instance_uid=scene.study, patient_id=PATIENT))
    wait_access(scene, "study.view", RADIOLOGIST[0])
    body = scene.api("/api/v1/audit/history", study=scene.study).json()
    actions = [i["action"] for i in body["items"]]
    assert body["total"] == len(actions) == 3 * 7 + 1
    for action in ("Job.Received", "Job.Routed", "Instance.Registered", "Delivery.Created",
                   "Delivery.Succeeded", "Delivery.AttemptFailed"):
        assert action in actions
    times = [i["time"] for i in body["items"]]
    assert times == sorted(times) and actions[-1] == "study.view"
    assert body["items"][-1]["actor"] == RADIOLOGIST[0]
    summary = {(s["action"], s["outcome"]): s["count"] for s in body["summary"]}
    assert summary[("Delivery.AttemptFailed", "failure")] == 3
    routed = next(i for i in body["items"] if i["action"] == "Job.Routed")
    assert routed["detail"]["destinations"] == ["archive", "down"]
    assert routed["detail"]["matched_rules"][0]["name"] == "everything"

    wait_access(scene, "audit.history", AUDITOR[0])
    later = scene.api("/api/v1/audit/history", study=scene.study).json()
    assert [i["action"] for i in later["items"]][-1] == "audit.history"
    assert later["total"] == body["total"] + 1

    browser = Browser(scene.server.url)
    browser.login(*AUDITOR)
    page = browser.get(browser.url("/audit/history"), params={"study": scene.study})
    assert page.status_code == 200
    for text in ("Job.Received", "Delivery.Succeeded", "study.view", PATIENT, "10.0.0.7"):
        assert text in page.text
    listing = browser.get(browser.url("/audit"), params={"patient": PATIENT})
    assert f'href="/audit/history?study={scene.study}"' in listing.text


@pytest.mark.dcmtk
@pytest.mark.slow
def test_audit_pages_filter_page_and_escape_hostile_values(
    web_router: Any, tmp_path: Path, dcmtk: None,
) -> None:
    scene = start_scene(web_router, tmp_path, f"sqlite:///{tmp_path / 'db'}")
    scene.router.sessions.record(Actor("<script>alert(1)</script>", "10.0.0.8"), AccessRecord(
        action="study.view", object_type="study", object_id="<img src=x onerror=alert(2)>",
        detail="</td><script>alert(3)</script>"))
    wait_access(scene, "study.view", "<script>alert(1)</script>")
    browser = Browser(scene.server.url)
    browser.login(*AUDITOR)
    page = browser.get(browser.url("/audit"))
    assert page.status_code == 200 and "<script>alert" not in page.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
    assert "<img src=x" not in page.text
    evil = browser.get(browser.url("/audit"), params={"patient": EVIL})
    assert EVIL not in evil.text and "=HYPERLINK(&#34;http://evil.test&#34;" in evil.text
    assert "1 to 14 of 14 rows" in evil.text
    assert 'href="/api/v1/audit/export?patient=%3DHYPERLINK' in evil.text

    first = browser.get(browser.url("/audit"), params={"patient": PATIENT, "limit": 10})
    assert "1 to 10 of 21 rows" in first.text
    older = re.search(r'href="(/audit\?[^"]*offset=10)"', first.text)
    assert older, "no link to the next page"
    second = browser.get(browser.url(older.group(1).replace("&amp;", "&")),
                         headers={"HX-Request": "true", "HX-Target": "audit-results"})
    # Now also the first page's own search: a query sees every write acknowledged before it.
    assert "11 to 20 of 22 rows" in second.text and "<html" not in second.text
    assert "offset=20" in second.text and "offset=0" in second.text
    bad = browser.get(browser.url("/audit"), params={"to": "not a time"})
    assert bad.status_code == 400 and "expected ISO 8601" in bad.text


@pytest.mark.dcmtk
@pytest.mark.slow
def test_state_as_of_shows_a_rule_and_a_role_as_they_were(
    database_url: str, web_router: Any, tmp_path: Path, dcmtk: None,
) -> None:
    scene = start_scene(web_router, tmp_path, database_url)
    router = scene.router
    before = time.time()
    time.sleep(0.01)
    admin = Actor("admin", "127.0.0.1")
    router.commands.put_rule({"name": "everything", "calling_aet": "MR_*", "priority": 7,
                              "destinations": ["archive"]}, admin)
    router.users.set_role(RADIOLOGIST[0], "operator", admin)
    router.commands.pause_destination("cloud", admin)

    then = scene.api("/api/v1/audit/state", at=queries.iso(before)).json()
    rule = next(r for r in then["rules"] if r["name"] == "everything")
    assert (rule["version"], rule["spec"]["calling_aet"], rule["spec"]["destinations"]) == (
        1, ["CT_*"], ["archive", "down"])
    assert rule["changed"]["actor"] == "config"
    assert {u["name"]: u["role"] for u in then["users"]}[RADIOLOGIST[0]] == "radiologist"
    cloud = next(d for d in then["destinations"] if d["name"] == "cloud")
    assert cloud["config"]["secret_access_key"] == "********" and not cloud["paused"]
    now = scene.api("/api/v1/audit/state").json()
    rule = next(r for r in now["rules"] if r["name"] == "everything")
    assert (rule["version"], rule["spec"]["calling_aet"], rule["changed"]["actor"]) == (
        2, ["MR_*"], "admin")
    assert {u["name"]: u["role"] for u in now["users"]}[RADIOLOGIST[0]] == "operator"
    assert next(d for d in now["destinations"] if d["name"] == "cloud")["paused"]

    browser = Browser(scene.server.url)
    browser.login(*AUDITOR)
    page = browser.get(browser.url("/audit/state"), params={"at": queries.iso(before)})
    assert page.status_code == 200
    row = re.search(r'<tr data-user="rad1">.*?</tr>', page.text, re.S)
    assert row and '<td class="role">radiologist</td>' in row.group(0)
    # Each user (like each rule and destination) links to its versions, compared side by side
    versions = f'/audit/versions?object={user_id(RADIOLOGIST[0])}'
    assert versions in row.group(0)
    compared = browser.get(browser.url(versions))
    assert compared.status_code == 200 and "radiologist" in compared.text
    assert "operator" in compared.text  # the latest version beside the one before
    assert "CT_*" in page.text and "MR_*" not in page.text
    for text in (page.text, json.dumps(then), json.dumps(now)):
        assert SECRET not in text and "enc:v1:" not in text and "$2b$" not in text
        assert "password_hash" not in text and "token_hash" not in text
    states = wait_access(scene, "audit.state", AUDITOR[0], count=3)
    assert states[0]["object_id"] == queries.iso(before)
    r = requests.get(scene.server.url + "/api/v1/audit/state", params={"at": "yesterday"},
                     headers=bearer(scene.server.url, *AUDITOR), timeout=10)
    assert r.status_code == 422 and "at" in r.json()["error"]["fields"]


@pytest.mark.dcmtk
@pytest.mark.slow
def test_cli_export_reads_the_view_and_is_recorded_as_cli(
    web_router: Any, tmp_path: Path, dcmtk: None,
) -> None:
    database_url = f"sqlite:///{tmp_path / 'db'}"
    scene = start_scene(web_router, tmp_path, database_url)
    env = {**os.environ, "DICOM_ROUTER_DATABASE_URL": database_url,
           "DICOM_ROUTER_DATA_DIR": str(tmp_path / "data"),
           "DICOM_ROUTER_SECRET_KEY": "0" * 64, "DICOM_ROUTER_LOG_LEVEL": "WARNING"}
    out = tmp_path / "export.csv"
    result = subprocess.run(
        [sys.executable, "-m", "router.cli", "audit", "export", "--study", scene.evil_study,
         "--from", "2000-01-01", "--to", queries.iso(time.time() + 60), "--format", "csv",
         "--output", str(out)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    table = list(csv.reader(io.StringIO(out.read_text(encoding="utf-8"), newline="")))
    assert tuple(table[0]) == queries.COLUMNS and len(table) - 1 == 2 * 7
    assert {row[queries.COLUMNS.index("patient_id")] for row in table[1:]} == {"'" + EVIL}

    result = subprocess.run(
        [sys.executable, "-m", "router.cli", "audit", "export", "--patient", PATIENT,
         "--user", "CT_SCANNER", "--format", "json"],
        env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    items = json.loads(result.stdout)
    assert {i["action"] for i in items} == {"Job.Received", "Job.Routed", "Instance.Registered"}
    assert len(items) == 9

    exports = wait_access(scene, "audit.export", "cli", count=2)
    assert exports[0]["study_instance_uid"] == scene.evil_study
    assert "format=csv rows=14" in exports[0]["detail"]
    assert exports[1]["patient_id"] == PATIENT

    bad = subprocess.run([sys.executable, "-m", "router.cli", "audit", "export", "--from",
                          "soon"], env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "from" in bad.stderr
