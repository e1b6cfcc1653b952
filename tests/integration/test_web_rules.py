"""Rules through the REST API and the pages, against the real web application: CRUD with field
errors and 404s, reordering (checked on real receipts from storescu), dry runs on pydicom's
bundled files and on a job that arrived over DICOM, the editor and "test this rule", and
escaping of hostile names. A representative part also runs on PostgreSQL.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pydicom
import pytest
import requests
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from router.application.commands import Actor
from router.config_types import docs_of
from router.domain.admin import rule_id
from router.domain.rules import RuleSpec
from tests.conftest import ADMIN_PASSWORD, make_settings, wait_for
from tests.web_harness import Browser, bearer

API = "/api/v1/rules"
HOSTILE = "<img src=x onerror=alert(1)>"
CT_SMALL = Path(get_testdata_file("CT_small.dcm", download=False))
MR_SMALL = Path(get_testdata_file("MR_small.dcm", download=False))


def setup(server: Any, *names: str) -> dict[str, str]:
    """Admin bearer headers, and file destinations (nothing is listening: nothing is sent)."""
    auth = bearer(server.url, "admin", ADMIN_PASSWORD)
    for name in names:
        r = requests.post(server.url + "/api/v1/destinations", headers=auth, timeout=10,
                          json={"name": name, "type": "file",
                                "path": str(server.router.settings.data_dir / "exports"
                                            / f"unused-{name}")})
        assert r.status_code == 201, r.text
    return auth


def storescu(server: Any, path: Path, calling: str = "CT_SCANNER") -> str:
    """Send one file with DCMTK storescu; the id of the job it became."""
    result = subprocess.run(
        ["storescu", "-aet", calling, "-aec", "DICOMROUTER", "127.0.0.1",
         str(server.router.dicom.port), str(path)],
        env={**os.environ, "TCP_NODELAY": "1"}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    jobs = server.router.view_db("jobs")
    rows = wait_for(lambda: jobs.query(
        "SELECT job_id, routing, destinations FROM jobs WHERE calling_aet = ?"
        " AND routing <> 'received' ORDER BY received_at DESC", (calling,)), 20, "the job")
    return str(rows[0]["job_id"])


def job_destinations(server: Any, job_id: str) -> list[str]:
    rows = server.router.view_db("jobs").query(
        "SELECT destinations FROM jobs WHERE job_id = ?", (job_id,))
    return list(json.loads(rows[0]["destinations"] or "[]"))


def copy_of(path: Path, target: Path) -> Path:
    """The file as a new instance (new SOP Instance UID): not a duplicate of earlier sends."""
    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(target)
    return target


def dry_run_file(server: Any, auth: dict[str, str], path: Path, **fields: str) -> Any:
    with path.open("rb") as f:
        r = requests.post(server.url + API + "/dry-run/file", headers=auth, timeout=30,
                          files={"file": (path.name, f, "application/dicom")}, data=fields)
    assert r.status_code == 200, r.text
    return r.json()


def test_crud_through_the_api(web_router: Any) -> None:
    server = web_router()
    auth = setup(server, "pacs", "cloud")
    name = "CT chest / 50%? #1"  # every character that means something in a URL
    rule = {"name": name, "priority": 10, "calling_aet": "CT_*", "modality": ["CT"],
            "match": [{"tag": "BodyPartExamined", "op": "eq", "value": "CHEST"}],
            "destinations": ["pacs", "cloud"]}
    r = requests.post(server.url + API, json=rule, headers=auth, timeout=10)
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["calling_aet"] == ["CT_*"] and body["version"] == 1
    assert body["from_config"] is False and body["position"] == 1
    assert requests.post(server.url + API, json=rule, headers=auth,
                         timeout=10).status_code == 409
    path = API + "/" + quote(name, safe="")
    r = requests.put(server.url + path, headers=auth, timeout=10,
                     json={**rule, "enabled": False, "stop": True})
    assert r.status_code == 200 and r.json()["enabled"] is False and r.json()["version"] == 2
    got = requests.get(server.url + path, headers=auth, timeout=10).json()
    assert got["stop"] is True and got["match"][0] == {"tag": "BodyPartExamined", "op": "eq",
                                                       "value": "CHEST"}
    events = list(server.router.stores.admin.events.get(rule_id(name)))
    assert [e.actor for e in events] == ["admin", "admin"]
    assert requests.delete(server.url + path, headers=auth, timeout=10).status_code == 200
    assert requests.get(server.url + path, headers=auth, timeout=10).status_code == 404
    assert requests.get(server.url + API, headers=auth, timeout=10).json() == {"items": []}


def test_invalid_rules_get_field_errors_and_unknown_names_404(web_router: Any) -> None:
    server = web_router()
    auth = setup(server, "pacs")
    cases = [
        ({"name": "r", "match": [{"tag": "Modality", "op": "like", "value": "CT"}],
          "destinations": ["pacs"]}, "match[0].op", "unknown operator"),
        ({"name": "r", "match": [{"tag": "NoSuchKeyword", "op": "eq", "value": "x"}],
          "destinations": ["pacs"]}, "match[0].tag", "unknown tag"),
        ({"name": "r", "destinations": ["pacs", "nowhere"]}, "destinations", "nowhere"),
        ({"name": "r", "priority": "high", "destinations": ["pacs"]}, "priority", "integer"),
        ({"name": "r", "calling_aet": ["ok", "bad\\ae"], "destinations": ["pacs"]},
         "calling_aet[1]", "AE title pattern"),
        ({"name": "r"}, "destinations", "at least one destination"),
        ({"name": "r", "destinatons": ["pacs"]}, "destinatons", "did you mean"),
        ({"priority": 1}, "name", "required"),
    ]
    for body, field, text in cases:
        r = requests.post(server.url + API, json=body, headers=auth, timeout=10)
        assert r.status_code == 422, (body, r.text)
        fields = r.json()["error"]["fields"]
        assert text in fields.get(field, ""), (body, fields)
    r = requests.put(server.url + API + "/nope", json={"destinations": ["pacs"]}, headers=auth,
                     timeout=10)
    assert r.status_code == 404
    assert requests.delete(server.url + API + "/nope", headers=auth, timeout=10).status_code == 404
    requests.post(server.url + API, json={"name": "a", "destinations": ["pacs"]}, headers=auth,
                  timeout=10)
    r = requests.put(server.url + API + "/a", json={"name": "b", "destinations": ["pacs"]},
                     headers=auth, timeout=10)
    assert r.status_code == 422 and "name" in r.json()["error"]["fields"]
    r = requests.post(server.url + API + "/reorder", json={"names": ["a", "zzz"]},
                      headers=auth, timeout=10)
    assert r.status_code == 422 and "zzz" in r.json()["error"]["fields"]["names"]
    r = requests.post(server.url + API + "/dry-run", json={"job_id": "no-such-job"},
                      headers=auth, timeout=10)
    assert r.status_code == 404
    document = requests.get(server.url + "/api/v1/openapi.json", timeout=10).json()
    schemas = document["components"]["schemas"]
    assert {"RuleBody", "ReorderBody", "DryRunBody"} <= set(schemas)
    # Made from RuleSpec: its keys, and the descriptions written once, with the fields.
    rule = schemas["RuleBody"]["properties"]
    assert set(rule) == set(RuleSpec.__dataclass_fields__) - {
        "_calling", "_called", "_networks", "_modalities"}
    assert "lower runs first" in rule["priority"]["description"]
    assert "(* and ?)" in rule["calling_aet"]["description"]
    assert "eq" in rule["match"]["items"]["properties"]["op"]["enum"]
    assert schemas["RuleBody"]["additionalProperties"] is False


@pytest.mark.dcmtk
def test_reorder_changes_the_evaluation_order(web_router: Any, tmp_path: Path,
                                              dcmtk: None) -> None:
    server = web_router()
    auth = setup(server, "first", "second")
    for name in ("a-first", "b-second"):
        r = requests.post(server.url + API, headers=auth, timeout=10, json={
            "name": name, "modality": "CT", "stop": True,
            "destinations": [name.split("-")[1]]})
        assert r.status_code == 201
    # Same priority: by name, "a-first" runs first and stops evaluation.
    before = dry_run_file(server, auth, CT_SMALL)
    assert before["destinations"] == ["first"] and before["stopped_by"] == "a-first"
    assert job_destinations(server, storescu(server, copy_of(CT_SMALL, tmp_path / "1.dcm"),
                                             "CT_ONE")) == ["first"]

    r = requests.post(server.url + API + "/reorder", json={"names": ["b-second", "a-first"]},
                      headers=auth, timeout=10)
    assert r.status_code == 200
    assert [(i["name"], i["priority"]) for i in r.json()["items"]] == [
        ("b-second", 10), ("a-first", 20)]
    after = dry_run_file(server, auth, CT_SMALL)
    assert after["destinations"] == ["second"] and after["stopped_by"] == "b-second"
    notes = {rule["name"]: rule["note"] for rule in after["rules"]}
    assert "stopped evaluation before it" in notes["a-first"]
    assert job_destinations(server, storescu(server, copy_of(CT_SMALL, tmp_path / "2.dcm"),
                                             "CT_TWO")) == ["second"]


def test_dry_run_on_uploaded_files_explains_each_condition(web_router: Any) -> None:
    server = web_router()
    auth = setup(server, "pacs", "research")
    rules = [
        {"name": "CT from scanners", "priority": 10, "calling_aet": "CT_*", "modality": "CT",
         "match": [{"tag": "SliceThickness", "op": "le", "value": 5},
                   {"tag": "Manufacturer", "op": "startswith", "value": "ge",
                    "case_sensitive": False}],
         "destinations": ["pacs"]},
        {"name": "research", "priority": 20,
         "match": [{"tag": "StudyDate", "op": "ge", "value": "2004-06-01"}],
         "destinations": ["research"]},
    ]
    for rule in rules:
        assert requests.post(server.url + API, json=rule, headers=auth,
                             timeout=10).status_code == 201
    ct = dry_run_file(server, auth, CT_SMALL, calling_aet="CT_SCANNER")
    assert ct["destinations"] == ["pacs"] and ct["input"]["called_aet"] == "DICOMROUTER"
    first, second = ct["rules"]
    assert first["matched"] and first["applied"]
    assert [c["matched"] for c in first["conditions"]] == [True] * 7
    assert first["conditions"][5]["actual"] == "5.000000"
    assert first["conditions"][6]["actual"] == "GE MEDICAL SYSTEMS"
    assert not second["matched"] and second["conditions"][5]["actual"] == "20040119"
    assert second["note"] == "did not match"

    mr = dry_run_file(server, auth, MR_SMALL, calling_aet="MR_1")
    assert mr["destinations"] == ["research"]
    failed = [c["label"] for c in mr["rules"][0]["conditions"] if not c["matched"]]
    assert failed == ["calling_aet: CT_*", "modality: CT", "match[1]: Manufacturer startswith"
                      ' "ge" (case-insensitive)']
    r = requests.post(server.url + API + "/dry-run/file", headers=auth, timeout=10,
                      files={"file": ("x.dcm", b"not dicom at all", "application/dicom")})
    assert r.status_code == 422 and "file" in r.json()["error"]["fields"]
    candidate = json.dumps({"name": "research", "modality": "MR", "destinations": ["pacs"]})
    with MR_SMALL.open("rb") as f:
        r = requests.post(server.url + API + "/dry-run/file", headers=auth, timeout=10,
                          files={"file": ("mr.dcm", f)}, data={"candidate": candidate})
    assert r.json()["destinations"] == ["pacs"]  # the unsaved version replaces the stored one


def run_job_dry_run(server: Any) -> None:
    """A job that arrived over DICOM is dry-run from its stored object; the access is logged."""
    auth = setup(server, "pacs")
    r = requests.post(server.url + API, headers=auth, timeout=10, json={
        "name": "from CT", "calling_aet": "CT_*", "destinations": ["pacs"]})
    assert r.status_code == 201
    job_id = storescu(server, CT_SMALL, "CT_SCANNER")
    r = requests.post(server.url + API + "/dry-run", json={"job_id": job_id}, headers=auth,
                      timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["input"]["job_id"] == job_id and body["input"]["calling_aet"] == "CT_SCANNER"
    assert body["input"]["recorded_destinations"] == ["pacs"]
    assert body["destinations"] == ["pacs"]
    assert body["rules"][0]["conditions"][0] == {"label": "calling_aet: CT_*", "matched": True,
                                                 "actual": "CT_SCANNER"}
    candidate = {"name": "from CT", "calling_aet": "MR_*", "destinations": ["pacs"]}
    r = requests.post(server.url + API + "/dry-run", headers=auth, timeout=30,
                      json={"job_id": job_id, "candidate": candidate})
    assert r.json()["destinations"] == [] and r.json()["unrouted"] is True
    accesses = [n for n in server.router.stores.access.recorder.select_notifications(0, 1000)
                if n.topic.endswith("Access.Recorded")]
    events = [server.router.stores.access.mapper.to_domain_event(n) for n in accesses]
    dry = [e for e in events if e.action == "job.dry_run"]
    assert len(dry) == 2 and dry[0].object_id == job_id and dry[0].actor == "admin"
    assert dry[0].study_instance_uid


@pytest.mark.dcmtk
def test_dry_run_of_a_job_received_over_dicom(web_router: Any, dcmtk: None) -> None:
    run_job_dry_run(web_router())


@pytest.mark.dcmtk
@pytest.mark.postgres
def test_crud_and_job_dry_run_on_postgres(pg_url: str, web_router: Any, tmp_path: Path,
                                          dcmtk: None) -> None:
    # pg_url first: its database is dropped only after the router has stopped.
    server = web_router(make_settings(tmp_path, pg_url))
    run_job_dry_run(server)
    auth = bearer(server.url, "admin", ADMIN_PASSWORD)
    r = requests.post(server.url + API, json={"name": "x", "destinations": ["nowhere"]},
                      headers=auth, timeout=10)
    assert r.status_code == 422 and "nowhere" in r.json()["error"]["fields"]["destinations"]
    # Every problem of a body at once, each under its path, in the file's words.
    r = requests.post(server.url + API, headers=auth, timeout=10, json={
        "name": "x", "priority": "high", "modality": ["CT", "C*"], "destinations": ["pacs"],
        "match": [{"tag": "Modality", "op": "eq", "value": "CT"},
                  {"tag": "Modalty", "op": "like", "value": "CT"}],
        "granularity": "patient", "destination": "pacs"})
    assert r.status_code == 422
    assert r.json()["error"]["fields"] == {
        "priority": "expected an integer, got 'high'",
        "modality[1]": "'C*' is not a modality code such as 'CT'",
        "match[1].tag": "unknown tag 'Modalty' (expected a DICOM keyword such as 'Modality', "
                        "'(gggg,eeee)' or 'ai.<destination>.<key>')",
        "match[1].op": "unknown operator 'like' (expected one of eq, ne, in, contains, "
                       "startswith, regex, exists, lt, gt, le, ge)",
        "granularity": "expected one of instance, series, study, got 'patient'",
        "destination": "unknown key (did you mean 'destinations'?)"}


def editor_form(browser: Browser, **values: Any) -> dict[str, Any]:
    return {"csrf_token": browser.csrf, "priority": "50", "enabled": "on", **values}


CT_FORM = {"calling_aet": "CT_*, CT?", "modality": "CT",
           "match_tag": ["BodyPartExamined", "", "Modality"], "match_op": ["in", "eq", "eq"],
           "match_value": ["CHEST, ABDOMEN", "", "ct"],
           "match_case": ["sensitive", "sensitive", "insensitive"],
           "destinations": ["pacs", "cloud"], "action": "save"}


def test_editor_saves_every_criterion_and_shows_field_errors(web_router: Any) -> None:
    server = web_router()
    setup(server, "pacs", "cloud")
    browser = Browser(server.url)
    browser.login("admin", ADMIN_PASSWORD)
    assert browser.get(browser.url("/rules/new")).status_code == 200
    form = editor_form(browser, name=HOSTILE, **CT_FORM)
    r = browser.post(browser.url("/rules"), data=form)
    assert r.url.endswith("/rules?ok=created"), r.text[-500:]
    assert HOSTILE not in r.text and "&lt;img src=x onerror=alert(1)&gt;" in r.text
    spec = server.router.admin.refresh().rules[0].spec
    assert spec.calling_aet == ("CT_*", "CT?") and spec.destinations == ("pacs", "cloud")
    assert [c.to_dict() for c in spec.match] == [
        {"tag": "BodyPartExamined", "op": "in", "value": ["CHEST", "ABDOMEN"]},
        {"tag": "Modality", "op": "eq", "value": "ct", "case_sensitive": False}]

    edit_url = browser.url("/rules/" + quote(HOSTILE, safe="") + "/edit")
    edit = browser.get(edit_url)
    assert edit.status_code == 200 and HOSTILE not in edit.text
    assert 'value="CHEST, ABDOMEN"' in edit.text
    more = browser.post(edit_url, data={**form, "action": "add_condition"})
    assert more.text.count('name="match_tag"') == 4  # two conditions, two blank rows
    fewer = browser.post(edit_url, data={**form, "action": "remove_condition:0"})
    assert fewer.text.count('name="match_tag"') == 2 and "CHEST, ABDOMEN" not in fewer.text
    bad = browser.post(edit_url, data={**form, "match_op": ["gt", "eq", "eq"],
                                       "match_value": ["not-a-date", "", "ct"]})
    assert bad.status_code == 422 and "match[0].value" in bad.text
    # Several mistakes: each of the model's messages shown next to its own field.
    several = browser.post(edit_url, data={**form, "priority": "soon", "modality": "CT, C*",
                                           "quiet_time": "later"})
    assert several.status_code == 422
    for field, message in (
            ("priority", "expected an integer, got &#39;soon&#39;"),
            ("modality", "item 2: &#39;C*&#39; is not a modality code such as &#39;CT&#39;"),
            ("quiet_time", "expected a duration such as &#39;30s&#39; or &#39;24h&#39;, got "
                           "&#39;later&#39;")):
        at_field = re.search(rf'name="{field}"[^<]*>(?:<span class="help">[^<]*</span>)?'
                             rf'</label><span class="field-error">([^<]*)</span>', several.text)
        assert at_field is not None and at_field[1] == message, (field, several.text[-3000:])
    # Help texts are the model's descriptions (also in the OpenAPI document).
    assert f'<span class="help">{docs_of(RuleSpec)["priority"]}</span>' in several.text
    assert server.router.admin.refresh().rules[0].version == 1
    taken = browser.post(browser.url("/rules"), data=form)
    assert taken.status_code == 409 and "already exists" in taken.text


def test_pages_reorder_test_this_rule_and_delete(web_router: Any) -> None:
    server = web_router()
    auth = setup(server, "pacs", "cloud")
    for name, priority in ((HOSTILE, 50), ("second", 60)):
        requests.post(server.url + API, headers=auth, timeout=10, json={
            "name": name, "priority": priority, "destinations": ["pacs"]})
    browser = Browser(server.url)
    browser.login("admin", ADMIN_PASSWORD)
    r = browser.post(browser.url("/rules/second/move"), data={"direction": "up"})
    assert r.url.endswith("?ok=moved")
    assert [(r.spec.name, r.spec.priority) for r in server.router.admin.refresh().rules] == [
        ("second", 10), (HOSTILE, 20)]

    form = editor_form(browser, name=HOSTILE, existing=HOSTILE, test_calling_aet="CT_1",
                       **CT_FORM)
    with CT_SMALL.open("rb") as f:
        tested = browser.post(browser.url("/rules/test"), headers={"HX-Request": "true"},
                              data=form, files={"test_file": ("ct.dcm", f)})
    assert tested.status_code == 200 and "<html" not in tested.text
    assert "this rule" in tested.text and "BodyPartExamined in" in tested.text
    assert "(absent)" in tested.text and HOSTILE not in tested.text
    with CT_SMALL.open("rb") as f:  # without JavaScript: the whole editor, result included
        page = browser.post(browser.url("/rules/test"), data=form,
                            files={"test_file": ("ct.dcm", f)})
    assert "Would be sent to:" in page.text and 'name="match_tag"' in page.text
    with CT_SMALL.open("rb") as f:
        full = browser.post(browser.url("/rules/dry-run"), files={"test_file": ("ct.dcm", f)})
    assert full.status_code == 200 and "Would be sent to:" in full.text
    missing = browser.post(browser.url("/rules/dry-run"), data={"test_job": ""})
    assert "Choose a DICOM file or a recent job" in missing.text

    r = browser.post(browser.url("/rules/second/delete"))
    assert r.url.endswith("?ok=deleted")
    assert [r.spec.name for r in server.router.admin.refresh().rules] == [HOSTILE]
    assert browser.get(browser.url("/rules/second/edit")).status_code == 404
    assert browser.post(browser.url("/rules/second/delete")).status_code == 404


def test_roles_csrf_and_config_file_origin(web_router: Any, tmp_path: Path) -> None:
    from dataclasses import replace

    settings = replace(
        make_settings(tmp_path, f"sqlite:///{tmp_path / 'db'}"),
        destinations=({"name": "pacs", "type": "file", "path": str(tmp_path / "unused-pacs")},),
        rules=({"name": "declared", "destinations": ["pacs"]},))
    server = web_router(settings)
    server.router.users.add("aud", "auditor", "auditor pass 1234", Actor("admin"))
    server.router.users.add("op", "operator", "operator pass 123", Actor("admin"))
    auditor = bearer(server.url, "aud", "auditor pass 1234")
    assert requests.get(server.url + API, headers=auditor, timeout=10).status_code == 403
    operator = bearer(server.url, "op", "operator pass 123")
    r = requests.post(server.url + API, json={"name": "mine", "destinations": ["pacs"]},
                      headers=operator, timeout=10)
    assert r.status_code == 201
    items = requests.get(server.url + API, headers=operator, timeout=10).json()["items"]
    assert {i["name"]: i["from_config"] for i in items} == {"declared": True, "mine": False}
    browser = Browser(server.url)
    browser.login("op", "operator pass 123")
    page = browser.get(browser.url("/rules"))
    assert page.text.count('data-file="managed"') == 1
    csrf, browser.csrf = browser.csrf, ""
    r = browser.post(browser.url("/rules/mine/delete"), allow_redirects=False)
    assert r.status_code == 403
    browser.csrf = csrf
    assert browser.post(browser.url("/rules/mine/delete")).url.endswith("?ok=deleted")
