"""Transforms through the REST API and pages, against the real web application: CRUD recorded
as events with the acting user, validation errors naming the field, references from
destinations and rules, the dry run (nothing sent or stored, recorded as an access), the
re-identification lookup (admins only, with a reason, audited) and role checks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pydicom
import requests
from pydicom.data import get_testdata_file

from router.application.commands import Actor
from router.domain.admin import transform_id
from tests.conftest import ADMIN_PASSWORD, wait_for
from tests.web_harness import Browser, bearer

API = "/api/v1/transforms"
CT_SMALL = Path(get_testdata_file("CT_small.dcm", download=False))
DEID = {"name": "deid", "kind": "deidentify", "project": "trial-7"}


def storescu(server: Any, path: Path, calling: str = "CT_SCANNER") -> None:
    result = subprocess.run(
        ["storescu", "-aet", calling, "-aec", "DICOMROUTER", "127.0.0.1",
         str(server.router.dicom.port), str(path)],
        env={**os.environ, "TCP_NODELAY": "1"}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    jobs = server.router.view_db("jobs")
    wait_for(lambda: jobs.query("SELECT 1 FROM jobs WHERE routing <> 'received'"), 20, "job")


def accesses(server: Any, action: str) -> list[dict[str, Any]]:
    server.router.runner.catch_up()
    return server.router.view_db("audit").query(
        "SELECT actor, outcome, detail, patient_id FROM audit WHERE action = ?"
        " ORDER BY position", (action,))


def test_crud_records_events_and_validates_every_field(web_router: Any) -> None:
    server = web_router()
    auth = bearer(server.url, "admin", ADMIN_PASSWORD)
    r = requests.post(server.url + API, headers=auth, timeout=10, json={
        "name": "fix", "kind": "morph",
        "ops": [{"op": "replace", "tag": "PatientID", "pattern": "(", "with": ""},
                {"op": "set", "tag": "BeamSequence.BeamName", "value": "x"}]})
    assert r.status_code == 422
    assert r.json()["error"]["fields"] == {
        "ops[0].pattern": "not a valid regular expression: missing ), unterminated subpattern "
                          "at position 0",
        "ops[1].tag": "'BeamSequence.BeamName': at character 13: a step inside a sequence "
                      "needs [*] or [n] after the sequence, then '.'"}
    r = requests.post(server.url + API, headers=auth, timeout=10,
                      json={"name": "d", "kind": "deidentify", "retain_uids": "yes"})
    assert r.status_code == 422
    assert set(r.json()["error"]["fields"]) == {"project", "retain_uids"}
    r = requests.post(server.url + API, headers=auth, timeout=10, json=DEID)
    assert r.status_code == 201, r.text
    assert r.json()["version"] == 1 and r.json()["used_by"] == []
    assert requests.post(server.url + API, headers=auth, timeout=10,
                         json=DEID).status_code == 409
    r = requests.put(server.url + API + "/deid", headers=auth, timeout=10,
                     json={**DEID, "retain_dates": "keep"})
    assert r.status_code == 200 and r.json()["version"] == 2

    # A destination and a rule may only name transforms that exist.
    dest = {"name": "research", "type": "file", "transforms": ["deid", "nope"],
            "path": str(server.router.settings.data_dir / "exports" / "research")}
    r = requests.post(server.url + "/api/v1/destinations", headers=auth, timeout=10, json=dest)
    assert r.status_code == 422
    assert r.json()["error"]["fields"] == {"transforms": "unknown transform(s): nope"}
    r = requests.post(server.url + "/api/v1/destinations", headers=auth, timeout=10,
                      json={**dest, "transforms": ["deid"]})
    assert r.status_code == 201, r.text
    r = requests.post(server.url + "/api/v1/rules", headers=auth, timeout=10, json={
        "name": "r", "destinations": ["research"], "transforms": ["gone"]})
    assert r.status_code == 422
    assert r.json()["error"]["fields"] == {"transforms": "unknown transform(s): gone"}

    # In use: not deleted.
    r = requests.delete(server.url + API + "/deid", headers=auth, timeout=10)
    assert r.status_code == 422
    assert "used by destination 'research'" in r.json()["error"]["message"]
    events = list(server.router.stores.admin.events.get(transform_id("deid")))
    assert [type(e).__name__ for e in events] == ["Created", "Updated"]
    assert {e.actor for e in events} == {"admin"}


def test_dry_run_shows_before_and_after_and_records_the_access(web_router: Any) -> None:
    server = web_router()
    auth = bearer(server.url, "admin", ADMIN_PASSWORD)
    assert requests.post(server.url + API, headers=auth, timeout=10,
                         json=DEID).status_code == 201
    storescu(server, CT_SMALL)
    original = pydicom.dcmread(CT_SMALL)
    blobs_before = sorted(p.name for p in server.router.settings.data_dir.rglob("*")
                          if p.is_file() and "blobs" in p.parts)
    r = requests.post(server.url + API + "/preview", headers=auth, timeout=30, json={
        "sop_instance_uid": original.SOPInstanceUID, "transform": "deid"})
    assert r.status_code == 200, r.text
    rows = {row["path"]: row for row in r.json()["rows"]}
    patient_id = rows["(0010,0020)"]
    assert patient_id["name"] == "PatientID" and patient_id["before"] == "1CT1"
    assert patient_id["change"] == "changed" and patient_id["after"] != "1CT1"
    assert rows["(0010,1010)"]["change"] == "removed"  # Patient's Age
    assert rows["(0012,0064)"]["change"] == "added"  # De-identification Method Code Sequence
    assert rows["(0012,0064)[0].(0008,0100)"]["after"] == "113100"
    assert r.json()["applied"][0]["name"] == "deid"
    # Nothing stored: no new blob, no pseudonym in the map.
    assert sorted(p.name for p in server.router.settings.data_dir.rglob("*")
                  if p.is_file() and "blobs" in p.parts) == blobs_before
    assert not list(server.router.stores.delivery.recorder.select_notifications(0, 10))
    [access] = accesses(server, "transform.preview")
    assert access["actor"] == "admin" and access["patient_id"] == "1CT1"

    for body, status, field in [
        ({"sop_instance_uid": "1.2.3", "transform": "deid"}, 404, "sop_instance_uid"),
        ({"sop_instance_uid": original.SOPInstanceUID, "transform": "nope"}, 422, "transform"),
        ({"sop_instance_uid": original.SOPInstanceUID}, 422, "transform"),
    ]:
        r = requests.post(server.url + API + "/preview", headers=auth, timeout=10, json=body)
        assert r.status_code == status and field in r.json()["error"]["fields"], r.text


def test_reidentification_needs_admin_a_reason_and_is_audited(web_router: Any,
                                                              tmp_path: Path) -> None:
    server = web_router()
    router = server.router
    router.users.add("op1", "operator", "operator pass 12", Actor("admin"))
    router.users.add("rad1", "radiologist", "radiology pass 12", Actor("admin"))
    auth = bearer(server.url, "admin", ADMIN_PASSWORD)
    export = router.settings.data_dir / "exports" / "research"
    export.mkdir(parents=True)
    assert requests.post(server.url + API, headers=auth, timeout=10,
                         json=DEID).status_code == 201
    r = requests.post(server.url + "/api/v1/destinations", headers=auth, timeout=10, json={
        "name": "research", "type": "file", "path": str(export), "transforms": ["deid"]})
    assert r.status_code == 201, r.text
    r = requests.post(server.url + "/api/v1/rules", headers=auth, timeout=10,
                      json={"name": "all", "destinations": ["research"]})
    assert r.status_code == 201, r.text
    storescu(server, CT_SMALL)
    jobs = router.view_db("jobs")
    wait_for(lambda: jobs.query("SELECT 1 FROM deliveries WHERE status = 'delivered'"), 30,
             "delivery")
    sent = pydicom.dcmread(next(export.rglob("*.dcm")))
    lookup = f"/api/v1/reidentification/trial-7/patient/{sent.PatientID}"

    r = requests.get(server.url + lookup, headers=auth, timeout=10)
    assert r.status_code == 422 and r.json()["error"]["fields"] == {"reason": "required"}
    r = requests.get(server.url + lookup, headers=auth, timeout=10,
                     params={"reason": "incidental finding"})
    assert r.status_code == 200
    assert r.json()["patient_id"] == "1CT1"
    assert r.json()["patient_name"] == "CompressedSamples^CT1"
    r = requests.get(server.url + "/api/v1/reidentification/trial-7/patient/UNKNOWN",
                     headers=auth, timeout=10, params={"reason": "check"})
    assert r.status_code == 404
    for user, password in (("op1", "operator pass 12"), ("rad1", "radiology pass 12")):
        other = bearer(server.url, user, password)
        r = requests.get(server.url + lookup, headers=other, timeout=10,
                         params={"reason": "curious"})
        assert r.status_code == 403
        r = requests.post(server.url + API + "/preview", headers=other, timeout=10,
                          json={"sop_instance_uid": "1.2", "transform": "deid"})
        assert r.status_code == 403
    rows = accesses(server, "reidentification.lookup")
    assert [(a["actor"], a["outcome"]) for a in rows] == [("admin", "success"),
                                                          ("admin", "not_found")]
    assert "reason: incidental finding" in rows[0]["detail"]

    # The page: a reason is required; the lookup shows the originals, HTML-escaped.
    browser = Browser(server.url)
    browser.login("admin", ADMIN_PASSWORD)
    page = browser.get(server.url + "/transforms/reidentify", params={
        "project": "trial-7", "pseudonym": sent.PatientID})
    assert page.status_code == 422 and "Reason: required" in page.text
    page = browser.get(server.url + "/transforms/reidentify", params={
        "project": "trial-7", "pseudonym": sent.PatientID, "reason": "<b>audit</b>"})
    assert page.status_code == 200 and "CompressedSamples^CT1" in page.text
    rows = accesses(server, "reidentification.lookup")
    assert "reason: <b>audit</b>" in rows[-1]["detail"]
    assert "<b>audit</b>" not in page.text  # escaped if shown at all

    # dicom-router reidentify: same map, recorded as the actor cli with the reason.
    env = {**os.environ, "DICOM_ROUTER_SECRET_KEY": "0" * 64,
           "DICOM_ROUTER_DATABASE_URL": router.settings.database_url,
           "DICOM_ROUTER_DATA_DIR": str(router.settings.data_dir),
           "DICOM_ROUTER_LOG_LEVEL": "WARNING"}
    cli = [sys.executable, "-m", "router.cli", "reidentify", "trial-7", sent.PatientID]
    result = subprocess.run([*cli, "--reason", "ticket 42"], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert '"patient_id": "1CT1"' in result.stdout
    result = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--reason" in result.stderr
    result = subprocess.run([*cli[:-1], "NOPE", "--reason", "x"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "no patient pseudonym 'NOPE'" in result.stderr
    cli_rows = [a for a in accesses(server, "reidentification.lookup") if a["actor"] == "cli"]
    assert [a["outcome"] for a in cli_rows] == ["success", "not_found"]
    assert "ticket 42" in cli_rows[0]["detail"]


def test_destination_and_rule_forms_set_and_keep_transforms(web_router: Any) -> None:
    server = web_router()
    auth = bearer(server.url, "admin", ADMIN_PASSWORD)
    assert requests.post(server.url + API, headers=auth, timeout=10,
                         json=DEID).status_code == 201
    browser = Browser(server.url)
    browser.login("admin", ADMIN_PASSWORD)
    csrf = {"csrf_token": browser.csrf}
    export = str(server.router.settings.data_dir / "exports" / "research")
    r = browser.post(server.url + "/destinations", allow_redirects=False, data={
        **csrf, "type": "file", "name": "research", "path": export,
        "transforms": "deid, nope"})
    assert r.status_code == 422 and "unknown transform(s): nope" in r.text
    r = browser.post(server.url + "/destinations", allow_redirects=False, data={
        **csrf, "type": "file", "name": "research", "path": export, "transforms": "deid"})
    assert r.status_code == 302, r.text[-2000:]
    page = browser.get(server.url + "/destinations/research/edit")
    assert 'name="transforms"' in page.text and 'value="deid"' in page.text

    r = browser.post(server.url + "/rules", allow_redirects=False, data={
        **csrf, "name": "all", "priority": "10", "destinations": "research",
        "transforms": "deid", "action": "save"})
    assert r.status_code == 302, r.text[-2000:]
    rule = server.router.admin.refresh().rules[0].spec
    assert rule.transforms == ("deid",)
    page = browser.get(server.url + "/rules/all/edit")
    assert 'name="transforms" value="deid"' in page.text
    # Saving the rule from its editor again keeps the transforms.
    r = browser.post(server.url + "/rules/all/edit", allow_redirects=False, data={
        **csrf, "priority": "20", "destinations": "research", "transforms": "deid",
        "action": "save"})
    assert r.status_code == 302
    assert server.router.admin.refresh().rules[0].spec.transforms == ("deid",)
    items = requests.get(server.url + API, headers=auth, timeout=10).json()["items"]
    assert items[0]["used_by"] == ["destination 'research'", "rule 'all'"]
    assert 'data-file="managed"' not in browser.get(server.url + "/transforms").text


def test_the_transform_editor_creates_edits_and_deletes_with_field_errors(
        web_router: Any) -> None:
    server = web_router()
    browser = Browser(server.url)
    browser.login("admin", ADMIN_PASSWORD)
    csrf = {"csrf_token": browser.csrf}
    form = {**csrf, "name": "north", "kind": "morph", "description": "<i>north</i>"}
    r = browser.post(server.url + "/transforms", data={**form, "options": "{ops: 1"})
    assert r.status_code == 422 and "not JSON" in r.text
    r = browser.post(server.url + "/transforms", data={**form, "options": json.dumps(
        {"ops": [{"op": "set", "tag": "InstitutionNme", "value": "x"}]})})
    assert r.status_code == 422
    assert "ops[0].tag" in r.text and "is not a DICOM keyword" in r.text
    ops = {"ops": [{"op": "set", "tag": "InstitutionName", "value": "North Clinic",
                    "when": [{"calling_aet": "CT_NORTH*"}]}]}
    r = browser.post(server.url + "/transforms", allow_redirects=False,
                     data={**form, "options": json.dumps(ops)})
    assert r.status_code == 302
    listing = browser.get(server.url + "/transforms")
    assert "north" in listing.text and "<i>north</i>" not in listing.text  # escaped
    r = browser.post(server.url + "/transforms/north/edit", allow_redirects=False, data={
        **csrf, "kind": "morph", "options": json.dumps({"ops": [
            {"op": "delete", "tag": "InstitutionName"}]})})
    assert r.status_code == 302
    spec = server.router.admin.refresh().transforms["north"]
    assert spec.version == 2 and spec.spec.data["ops"][0]["op"] == "delete"
    r = browser.post(server.url + "/transforms/north/delete", allow_redirects=False,
                     data=csrf)
    assert r.status_code == 302 and "north" not in server.router.admin.refresh().transforms
    events = list(server.router.stores.admin.events.get(transform_id("north")))
    assert [(type(e).__name__, e.actor) for e in events] == [
        ("Created", "admin"), ("Updated", "admin"), ("Deleted", "admin")]
    # Without the CSRF token: refused.
    bare = requests.post(server.url + "/transforms", cookies=browser.cookies, timeout=10,
                         data={"name": "x", "kind": "charset", "options": "{}"})
    assert bare.status_code == 403


def test_a_transform_the_file_declares_is_refused_with_the_reason(
        web_router: Any, tmp_path: Path) -> None:
    from tests.conftest import make_settings

    config = tmp_path / "router.toml"
    config.write_text('[[transforms]]\nname = "fix-id"\nkind = "morph"\n'
                      'ops = [{op = "replace", tag = "PatientID", pattern = "^OLD",'
                      ' with = "NEW"}]\n')
    server = web_router(make_settings(tmp_path, f"sqlite:///{tmp_path / 'db'}", config))
    auth = bearer(server.url, "admin", ADMIN_PASSWORD)
    assert "fix-id" in server.router.admin.snapshot().transforms  # applied at start
    changed = {"kind": "morph", "ops": [{"op": "delete", "tag": "PatientID"}]}
    r = requests.put(server.url + API + "/fix-id", headers=auth, timeout=10, json=changed)
    assert r.status_code == 409 and "managed by the configuration file" in r.text
    r = requests.delete(server.url + API + "/fix-id", headers=auth, timeout=10)
    assert r.status_code == 409
    browser = Browser(server.url)
    browser.login("admin", ADMIN_PASSWORD)
    page = browser.get(browser.url("/transforms/fix-id/edit"))
    assert page.status_code == 200 and 'id="transform-from-file"' in page.text
    r = browser.post(browser.url("/transforms/fix-id/edit"), data={
        "kind": "morph", "options": json.dumps({"ops": changed["ops"]})})
    assert r.status_code == 409 and "managed by the configuration file" in r.text
    spec = server.router.admin.snapshot().transforms["fix-id"].spec.to_dict()
    assert spec["ops"][0]["op"] == "replace"  # unchanged: nothing to be undone at restart
    # A transform made in the UI is not the file's: it can be changed.
    r = requests.post(server.url + API, headers=auth, timeout=10, json=DEID)
    assert r.status_code == 201
    r = requests.put(server.url + API + "/deid", headers=auth, timeout=10,
                     json={"kind": "deidentify", "project": "trial-8"})
    assert r.status_code == 200, r.text
