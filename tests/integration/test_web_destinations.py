"""Destinations through the REST API and the pages, against the real web application: CRUD with
write-only secrets, 422 field errors, 404s, test connection against a real storescp (up and
down), a folder and an S3 endpoint, pause/resume, health after real deliveries, roles, origin
marking and escaping. A representative part also runs on PostgreSQL.
"""

from __future__ import annotations

import os
import re
import subprocess
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import boto3
import pytest
import requests
from pydicom.data import get_testdata_file

from router.application.commands import Actor
from router.config_types import docs_of
from router.dispatch.dicom import DicomDestinationConfig
from router.dispatch.registry import open_config
from router.domain.admin import destination_id
from tests.conftest import ADMIN_PASSWORD, make_settings, wait_for
from tests.integration.peers import StoreScp, free_port, s3_server
from tests.web_harness import Browser, bearer

API = "/api/v1/destinations"
HOSTILE = "<img src=x onerror=alert(1)>"
CT_SMALL = Path(get_testdata_file("CT_small.dcm", download=False))


def s3_body(name: str = "cloud", **changes: Any) -> dict[str, Any]:
    return {"name": name, "type": "s3", "bucket": "imaging", "prefix": "site-a/",
            "endpoint_url": "http://127.0.0.1:9", "region": "us-east-1",
            "access_key_id": "AKIAEXAMPLE", "secret_access_key": "very-secret-value-1",
            **changes}


def dicom_body(name: str, port: int, **changes: Any) -> dict[str, Any]:
    return {"name": name, "type": "dicom", "host": "127.0.0.1", "port": port,
            "ae_title": "STORESCP", "timeout": 5, **changes}


def storescu(port: int, *files: Path, calling: str = "CT_SCANNER") -> None:
    result = subprocess.run(
        ["storescu", "-aet", calling, "-aec", "DICOMROUTER", "127.0.0.1", str(port),
         *map(str, files)],
        env={**os.environ, "TCP_NODELAY": "1"}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]


def first_actor(server: Any, name: str) -> list[str]:
    events = server.router.stores.admin.events.get(destination_id(name))
    return [getattr(e, "actor", "") for e in events]


def test_crud_through_the_api_keeps_secrets_write_only(web_router: Any) -> None:
    server = web_router()
    auth = bearer(server.url, "admin", ADMIN_PASSWORD)
    r = requests.post(server.url + API, json=s3_body(), headers=auth, timeout=10)
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["secrets"] == {"secret_access_key": "set", "session_token": "unset"}
    assert body["config"]["bucket"] == "imaging" and body["from_config"] is False
    assert "very-secret-value-1" not in r.text and "enc:v1" not in r.text
    listed = requests.get(server.url + API, headers=auth, timeout=10)
    assert [d["name"] for d in listed.json()["items"]] == ["cloud"]
    assert "very-secret-value-1" not in listed.text
    assert "secret_access_key" not in listed.json()["items"][0]["config"]

    # An update that omits the secret keeps it; one that gives a new one replaces it.
    without = {k: v for k, v in s3_body(prefix="site-b/").items() if k != "secret_access_key"}
    r = requests.put(server.url + API + "/cloud", json=without, headers=auth, timeout=10)
    assert r.status_code == 200 and r.json()["config"]["prefix"] == "site-b/"
    stored = server.router.admin.snapshot().live_destinations()["cloud"].config
    assert open_config(stored, server.router.box)["secret_access_key"] == "very-secret-value-1"
    r = requests.put(server.url + API + "/cloud", headers=auth, timeout=10,
                     json=s3_body(secret_access_key="another-secret-2"))
    stored = server.router.admin.snapshot().live_destinations()["cloud"].config
    assert open_config(stored, server.router.box)["secret_access_key"] == "another-secret-2"
    assert first_actor(server, "cloud") == ["admin", "admin", "admin"]

    r = requests.post(server.url + API, json=s3_body(), headers=auth, timeout=10)
    assert r.status_code == 409
    r = requests.delete(server.url + API + "/cloud", headers=auth, timeout=10)
    assert r.status_code == 200 and r.json() == {"deleted": "cloud"}
    assert requests.get(server.url + API + "/cloud", headers=auth, timeout=10).status_code == 404


def test_invalid_settings_get_422_with_field_messages(web_router: Any) -> None:
    server = web_router()
    auth = bearer(server.url, "admin", ADMIN_PASSWORD)
    bad = {"name": "pacs", "type": "dicom", "host": "bad host!", "port": 70000, "colour": 1}
    r = requests.post(server.url + API, json=bad, headers=auth, timeout=10)
    assert r.status_code == 422
    fields = r.json()["error"]["fields"]
    assert fields.pop("colour").startswith("unknown key for a dicom destination (expected one "
                                           "of ae_title, calling_ae, concurrency, ")
    assert fields == {"ae_title": "required", "host": "must be a host name or an IP address",
                      "port": "must be between 1 and 65535, got 70000"}
    r = requests.post(server.url + API, json={**bad, "ae_title": "PACS", "colour": None},
                      headers=auth, timeout=10)
    fields = r.json()["error"]["fields"]
    assert "65535" in fields["port"] and "host name" in fields["host"]
    r = requests.post(server.url + API, json={"name": "x y", "type": "tape"}, headers=auth,
                      timeout=10)
    assert r.status_code == 422 and set(r.json()["error"]["fields"]) == {"name", "type"}
    r = requests.post(server.url + API, data=b"{nope", headers=auth, timeout=10)
    assert r.status_code == 400
    r = requests.post(server.url + API, json=dicom_body("pacs", 104), headers=auth, timeout=10)
    assert r.status_code == 201
    r = requests.put(server.url + API + "/pacs", json=dicom_body("other", 104), headers=auth,
                     timeout=10)
    assert r.status_code == 422 and "name" in r.json()["error"]["fields"]
    for method, path in (("GET", "/nope"), ("PUT", "/nope"), ("DELETE", "/nope"),
                         ("POST", "/nope/test"), ("POST", "/nope/pause"),
                         ("POST", "/nope/resume"), ("GET", "/nope/health")):
        r = requests.request(method, server.url + API + path, json=dicom_body("nope", 104),
                             headers=auth, timeout=10)
        assert r.status_code == 404, (method, path, r.text)
        assert r.json()["error"]["status"] == 404


@pytest.mark.dcmtk
def test_test_connection_against_real_peers_up_and_down(web_router: Any, tmp_path: Path,
                                                        dcmtk: None) -> None:
    server = web_router()
    auth = bearer(server.url, "admin", ADMIN_PASSWORD)
    folder = tmp_path / "archive"
    folder.mkdir()
    with StoreScp(tmp_path / "scp") as scp, s3_server() as endpoint:
        bucket = f"imaging-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                     aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket=bucket)
        bodies = [
            dicom_body("pacs-up", scp.port), dicom_body("pacs-down", free_port()),
            {"name": "folder-ok", "type": "file", "path": str(folder)},
            {"name": "folder-missing", "type": "file", "path": str(tmp_path / "nowhere")},
            s3_body("s3-ok", bucket=bucket, endpoint_url=endpoint),
            s3_body("s3-no-bucket", bucket="no-such-bucket-here", endpoint_url=endpoint),
        ]
        for body in bodies:
            assert requests.post(server.url + API, json=body, headers=auth,
                                 timeout=10).status_code == 201
        results = {b["name"]: requests.post(server.url + f"{API}/{b['name']}/test",
                                            headers=auth, timeout=60).json() for b in bodies}
        assert scp.wait_log("Association Received")
    assert results["pacs-up"]["ok"] and "C-ECHO ok" in results["pacs-up"]["detail"]
    assert not results["pacs-down"]["ok"] and results["pacs-down"]["error"]
    assert results["folder-ok"]["ok"] and "writable" in results["folder-ok"]["detail"]
    assert not results["folder-missing"]["ok"]
    assert "does not exist" in results["folder-missing"]["error"]
    assert results["s3-ok"]["ok"] and bucket in results["s3-ok"]["detail"]
    assert not results["s3-no-bucket"]["ok"] and results["s3-no-bucket"]["error"]


def _health(server: Any, auth: dict[str, str], name: str) -> dict[str, Any]:
    r = requests.get(server.url + f"{API}/{name}/health", headers=auth, timeout=10)
    assert r.status_code == 200
    return dict(r.json())


def run_health_scenario(server: Any, tmp_path: Path) -> None:
    """A rule sends CT_small to a live storescp and to a closed port: health shows both."""
    auth = bearer(server.url, "admin", ADMIN_PASSWORD)
    with StoreScp(tmp_path / "scp") as scp:
        for body in (dicom_body("pacs", scp.port), dicom_body("dead-pacs", free_port())):
            assert requests.post(server.url + API, json=body, headers=auth,
                                 timeout=10).status_code == 201
        r = requests.post(server.url + "/api/v1/rules", headers=auth, timeout=10, json={
            "name": "all", "destinations": ["pacs", "dead-pacs"]})
        assert r.status_code == 201, r.text
        storescu(server.router.dicom.port, CT_SMALL)
        ok = wait_for(lambda: (h := _health(server, auth, "pacs"))["last_success_at"] and h,
                      30, "a delivery to storescp")
        bad = wait_for(lambda: (h := _health(server, auth, "dead-pacs"))["last_error"] and h,
                       30, "a failed delivery")
    assert ok["backlog"] == 0 and ok["state"] == "healthy" and ok["consecutive_failures"] == 0
    assert bad["backlog"] == 1 and bad["consecutive_failures"] == 1
    assert bad["state"] == "failing" and bad["oldest_pending_age"] >= 0
    assert bad["last_failure_at"] and bad["last_success_at"] is None
    r = requests.post(server.url + f"{API}/dead-pacs/pause", headers=auth, timeout=10)
    assert r.status_code == 200 and r.json()["paused"] is True
    assert _health(server, auth, "dead-pacs")["state"] == "paused"
    listed = requests.get(server.url + API, headers=auth, timeout=10).json()["items"]
    backlogs = {d["name"]: d["health"]["backlog"] for d in listed}
    assert (backlogs["pacs"], backlogs["dead-pacs"]) == (0, 1)
    r = requests.post(server.url + f"{API}/dead-pacs/resume", headers=auth, timeout=10)
    assert r.json()["paused"] is False
    actors = [getattr(e, "actor", "") for e in
              server.router.stores.admin.events.get(destination_id("dead-pacs"))]
    assert actors == ["admin", "admin", "admin"]  # created, paused, resumed


@pytest.mark.dcmtk
def test_health_pause_and_resume_after_real_deliveries(web_router: Any, tmp_path: Path,
                                                      dcmtk: None) -> None:
    run_health_scenario(web_router(), tmp_path)


@pytest.mark.dcmtk
@pytest.mark.postgres
def test_crud_and_health_on_postgres(pg_url: str, web_router: Any, tmp_path: Path,
                                     dcmtk: None) -> None:
    # pg_url first: its database is dropped only after the router has stopped.
    server = web_router(make_settings(tmp_path, pg_url))
    auth = bearer(server.url, "admin", ADMIN_PASSWORD)
    r = requests.post(server.url + API, json=s3_body(), headers=auth, timeout=10)
    assert r.status_code == 201 and "very-secret-value-1" not in r.text
    r = requests.post(server.url + API, json={"name": "p", "type": "dicom"}, headers=auth,
                      timeout=10)
    assert r.status_code == 422 and "host" in r.json()["error"]["fields"]
    run_health_scenario(server, tmp_path)


def test_forms_per_kind_create_and_edit_keeping_secrets(web_router: Any) -> None:
    server = web_router()
    browser = Browser(server.url)
    browser.login("admin", ADMIN_PASSWORD)
    form = browser.get(browser.url("/destinations/new?type=s3"))
    for field in ("bucket", "prefix", "endpoint_url", "region", "access_key_id",
                  "secret_access_key", "session_token", "storage_class", "template"):
        assert f'name="{field}"' in form.text
    dicom_form = browser.get(browser.url("/destinations/new?type=dicom")).text
    for field in ("host", "port", "ae_title", "calling_ae", "timeout", "idle_close", "max_pdu"):
        assert f'name="{field}"' in dicom_form

    data = {"type": "s3", "name": "cloud", "bucket": "imaging", "prefix": "a/",
            "region": "us-east-1", "access_key_id": "AKIA1", "secret_access_key": "s3cr3t-1",
            "concurrency": "3", "enabled": "on", "description": HOSTILE}
    r = browser.post(browser.url("/destinations"), data=data)
    assert r.status_code == 200 and r.url.endswith("/destinations?ok=created")
    assert "cloud" in r.text and "s3cr3t-1" not in r.text
    assert HOSTILE not in r.text and "&lt;img src=x onerror=alert(1)&gt;" in r.text

    edit = browser.get(browser.url("/destinations/cloud/edit"))
    assert "s3cr3t-1" not in edit.text and "set: leave empty to keep it" in edit.text
    r = browser.post(browser.url("/destinations/cloud/edit"),
                     data={**data, "secret_access_key": "", "prefix": "b/"})
    assert r.url.endswith("?ok=saved")
    stored = server.router.admin.snapshot().live_destinations()["cloud"].config
    assert stored["prefix"] == "b/" and stored["concurrency"] == 3
    assert open_config(stored, server.router.box)["secret_access_key"] == "s3cr3t-1"

    r = browser.post(browser.url("/destinations"), data={
        "type": "dicom", "name": "pacs", "host": "pacs.example", "port": "99999", "ae_title": ""})
    assert r.status_code == 422 and "<code>ae_title</code>: required" in r.text
    assert 'value="pacs.example"' in r.text  # what was typed is kept
    r = browser.post(browser.url("/destinations"), data={
        "type": "dicom", "name": "pacs", "host": "pacs.example", "port": "99999",
        "ae_title": "PACS"})
    assert r.status_code == 422 and "must be between 1 and 65535" in r.text
    # Every problem shown at its own field (an item of a list at the list), with the help text
    # the config class describes the field with.
    r = browser.post(browser.url("/destinations"), data={
        "type": "dicom", "name": "pacs", "host": "pacs.example", "port": "0",
        "ae_title": "PACS", "concurrency": "40", "transforms": "ok, " + "x" * 70})
    assert r.status_code == 422
    for field, message in (("port", "must be between 1 and 65535, got 0"),
                           ("concurrency", "must be between 1 and 16, got 40"),
                           ("transforms", "item 2: ")):
        at_field = re.search(rf'name="{field}".*?</label>\s*<span class="field-error">'
                             rf'([^<]*)</span>', r.text, re.DOTALL)
        assert at_field is not None and at_field[1].startswith(message), (field, at_field)
    assert docs_of(DicomDestinationConfig)["host"] in r.text


def test_page_actions_test_pause_resume_and_delete(web_router: Any, tmp_path: Path) -> None:
    server = web_router()
    browser = Browser(server.url)
    browser.login("admin", ADMIN_PASSWORD)
    (tmp_path / "out").mkdir()
    r = browser.post(browser.url("/destinations"),
                     data={"type": "file", "name": "archive", "path": str(tmp_path / "out")})
    assert r.url.endswith("?ok=created")
    r = browser.post(browser.url("/destinations/archive/test"), headers={"HX-Request": "true"})
    assert r.status_code == 200 and "connection works" in r.text and "<html" not in r.text
    r = browser.post(browser.url("/destinations/archive/test"))  # without JavaScript
    assert "connection works" in r.text and "<table" in r.text
    r = browser.post(browser.url("/destinations/check"), data={
        "type": "file", "name": "archive2", "path": str(tmp_path / "missing")})
    assert "test failed" in r.text and "does not exist" in r.text

    r = browser.post(browser.url("/destinations/archive/pause"))
    assert r.url.endswith("?ok=paused") and server.router.admin.refresh(
    ).live_destinations()["archive"].paused
    r = browser.post(browser.url("/destinations/archive/resume"))
    assert not server.router.admin.refresh().live_destinations()["archive"].paused
    r = browser.post(browser.url("/destinations/archive/delete"))
    assert r.url.endswith("?ok=deleted")
    assert "archive" not in server.router.admin.refresh().live_destinations()
    assert browser.get(browser.url("/destinations/archive/edit")).status_code == 404
    fragment = browser.get(browser.url("/destinations?fragment=rows"))
    assert fragment.text.lstrip().startswith("<tbody")


def test_deleting_a_destination_that_rules_use_is_refused(web_router: Any) -> None:
    server = web_router()
    auth = bearer(server.url, "admin", ADMIN_PASSWORD)
    requests.post(server.url + API, json=dicom_body("pacs", 104), headers=auth, timeout=10)
    requests.post(server.url + "/api/v1/rules", json={"name": "r1", "destinations": ["pacs"]},
                  headers=auth, timeout=10)
    r = requests.delete(server.url + API + "/pacs", headers=auth, timeout=10)
    assert r.status_code == 409 and "r1" in r.json()["error"]["message"]
    browser = Browser(server.url)
    browser.login("admin", ADMIN_PASSWORD)
    r = browser.post(browser.url("/destinations/pacs/delete"))
    assert r.status_code == 409 and "r1" in r.text
    assert "pacs" in server.router.admin.refresh().live_destinations()


def test_roles_and_config_file_origin(web_router: Any, tmp_path: Path) -> None:
    settings = replace(make_settings(tmp_path, f"sqlite:///{tmp_path / 'db'}"),
                       destinations=(dicom_body("from-file", 104),))
    server = web_router(settings)
    users = server.router.users
    users.add("op", "operator", "operator pass 123", Actor("admin"))
    users.add("aud", "auditor", "auditor pass 1234", Actor("admin"))
    operator = bearer(server.url, "op", "operator pass 123")
    r = requests.post(server.url + API, json=dicom_body("by-hand", 104), headers=operator,
                      timeout=10)
    assert r.status_code == 201
    items = requests.get(server.url + API, headers=operator, timeout=10).json()["items"]
    assert {d["name"]: d["from_config"] for d in items} == {"from-file": True, "by-hand": False}
    assert first_actor(server, "by-hand") == ["op"]
    auditor = bearer(server.url, "aud", "auditor pass 1234")
    assert requests.get(server.url + API, headers=auditor, timeout=10).status_code == 403
    assert requests.post(server.url + API + "/by-hand/pause", headers=auditor,
                         timeout=10).status_code == 403
    browser = Browser(server.url)
    browser.login("op", "operator pass 123")
    page = browser.get(browser.url("/destinations"))
    assert re.search(r"from-file</strong></a>\s*<span class=\"badge\">dicom</span>\s*"
                     r"<span class=\"badge\" data-file=\"managed\" title=\"Declared in the"
                     r" configuration file", page.text)
    assert browser.get(browser.url("/destinations/from-file/edit")).text.count(
        "Managed by the configuration file.") == 1
    document = requests.get(server.url + "/api/v1/openapi.json", timeout=10).json()
    schemas = document["components"]["schemas"]
    assert {"DicomDestination", "FileDestination", "S3Destination"} <= set(schemas)
    assert schemas["S3Destination"]["properties"]["secret_access_key"]["writeOnly"] is True
    # The fields' descriptions are the config classes' own (the forms' help texts too).
    assert schemas["DicomDestination"]["properties"]["port"]["description"] == (
        docs_of(DicomDestinationConfig)["port"])
    assert "1-16" in schemas["FileDestination"]["properties"]["concurrency"]["description"]
    assert "/api/v1/destinations/{name}/test" in document["paths"]


def test_testing_a_new_destination_does_not_depend_on_its_name(web_router: Any,
                                                              tmp_path: Path) -> None:
    """Bug 5: "Test these settings" on a new destination failed name validation before
    testing, and said "name: required" for a name that was typed but invalid."""
    server = web_router()
    browser = Browser(server.url)
    browser.login("admin", ADMIN_PASSWORD)
    (tmp_path / "out").mkdir()
    for name in ("", "my archive!"):
        r = browser.post(browser.url("/destinations/check"), headers={"HX-Request": "true"},
                         data={"type": "file", "name": name, "path": str(tmp_path / "out")})
        assert r.status_code == 200 and "connection works" in r.text, (name, r.text)
    saved = browser.post(browser.url("/destinations"), data={
        "type": "file", "name": "my archive!", "path": str(tmp_path / "out")})
    assert saved.status_code == 422 and "name: required" not in saved.text
    assert "invalid: use 1-64 characters" in saved.text
    auth = bearer(server.url, "admin", ADMIN_PASSWORD)
    typed = requests.post(server.url + API, headers=auth, timeout=10, json={
        "type": "file", "name": "my archive!", "path": str(tmp_path / "out")})
    assert typed.status_code == 422
    assert typed.json()["error"]["fields"]["name"].startswith("invalid:")
    empty = requests.post(server.url + API, headers=auth, timeout=10, json={
        "type": "file", "path": str(tmp_path / "out")})
    assert empty.json()["error"]["fields"]["name"].startswith("required:")
