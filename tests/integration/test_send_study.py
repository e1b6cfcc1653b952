"""Sending a stored study (or one series) to a destination on request: storescu sends a CT
study that the rules route to an archive folder only; the admin then sends it, or one series,
to a second folder. The copies arrive like routed deliveries, and each job's timeline says
who sent it and why.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests

from tests.conftest import ADMIN_PASSWORD, make_settings, wait_for
from tests.integration.test_web_jobs import storescu, write_instances
from tests.web_harness import Browser, bearer

pytestmark = pytest.mark.dcmtk


def send_settings(tmp_path: Path) -> Any:
    for folder in ("archive", "copy"):
        (tmp_path / folder).mkdir()
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'db'}")
    return replace(
        settings,
        destinations=(
            {"name": "archive", "type": "file", "path": str(tmp_path / "archive")},
            {"name": "copy", "type": "file", "path": str(tmp_path / "copy")},
        ),
        rules=({"name": "all", "calling_aet": "*", "destinations": ["archive"]},),
    )


def delivered(router: Any, destination: str) -> int:
    router.runner.catch_up()
    rows = router.view_db("jobs").query(
        "SELECT count(*) AS n FROM deliveries WHERE destination = ? AND status = 'delivered'",
        (destination,))
    return int(rows[0]["n"])


def received_study(server: Any, tmp_path: Path) -> tuple[str, list[str]]:
    """Two series of one study (2 + 1 instances), delivered to the archive."""
    first = write_instances(tmp_path / "s1", "CT", 2)
    study = str(pydicom.dcmread(first[0]).StudyInstanceUID)
    second = write_instances(tmp_path / "s2", "CT", 1, StudyInstanceUID=study)
    assert storescu(server.router.dicom.port, first + second, "CT_SCANNER").returncode == 0
    wait_for(lambda: delivered(server.router, "archive") == 3, 30, "the archive copies")
    series = [str(pydicom.dcmread(p).SeriesInstanceUID) for p in (first[0], second[0])]
    return study, series


def test_send_a_study_and_a_series_to_a_destination(web_router: Any, tmp_path: Path) -> None:
    server = web_router(send_settings(tmp_path))
    router = server.router
    study, series = received_study(server, tmp_path)
    admin = bearer(server.url, "admin", ADMIN_PASSWORD)
    api = f"{server.url}/api/v1/studies"

    def send(uid: str, body: Any) -> requests.Response:
        return requests.post(f"{api}/{uid}/send", json=body, headers=admin, timeout=30)

    unknown = send(study, {"destination": "nowhere"})
    assert unknown.status_code == 422 and "destination" in unknown.json()["error"]["fields"]
    assert "no destination named 'nowhere'" in unknown.json()["error"]["message"]
    missing = send("1.2.3.4.5", {"destination": "copy"})
    assert missing.status_code == 404 and "no stored instance of this study" in missing.text
    assert send("../etc", {"destination": "copy"}).status_code == 404
    bad_series = send(study, {"destination": "copy", "series_uid": "1.2.x"})
    assert bad_series.status_code == 422 and "series_uid" in bad_series.json()["error"][
        "fields"]
    assert send(study, {"destination": "copy", "series_uid": "1.2.3"}).status_code == 404
    assert send(study, {}).status_code == 422
    assert delivered(router, "copy") == 0

    one = send(study, {"destination": "copy", "series_uid": series[1],
                       "reason": "second opinion"})
    assert one.status_code == 202, one.text
    assert (one.json()["instances"], one.json()["scheduled"]) == (1, 1)
    wait_for(lambda: delivered(router, "copy") == 1, 30, "the series copy")
    whole = send(study, {"destination": "copy", "reason": "tumour board"})
    assert whole.status_code == 202 and whole.json()["instances"] == 3
    wait_for(lambda: delivered(router, "copy") == 3, 30, "the study copy")
    # Sent again to where it already went: delivered ones go again, as asked.
    again = send(study, {"destination": "archive"})
    assert again.json()["scheduled"] == 3
    wait_for(lambda: router.view_db("jobs").query(
        "SELECT count(*) AS n FROM deliveries WHERE destination = 'archive' AND attempts = 2"
    )[0]["n"] == 3, 30, "the archive copies sent again")
    assert len(list((tmp_path / "copy").rglob("*"))) >= 3

    job_id = router.view_db("jobs").query(
        "SELECT job_id FROM jobs WHERE series_instance_uid = ?", (series[1],))[0]["job_id"]
    job = requests.get(f"{server.url}/api/v1/jobs/{job_id}", headers=admin, timeout=30).json()
    sent = [e for e in job["events"] if e["action"] == "Job.Rerouted"]
    assert [(e["actor"], e["details"]["destinations"], e["details"].get("reason"))
            for e in sent] == [("admin", ["copy"], "second opinion")]
    copy = next(d for d in job["deliveries"] if d["destination"] == "copy")
    assert copy["status"] == "delivered"
    browser = Browser(server.url)
    browser.login("admin", ADMIN_PASSWORD)
    page = browser.get(browser.url(f"/jobs/{job_id}"))
    assert "sent to copy by admin on request: second opinion" in page.text
    router.runner.catch_up()
    actions = router.view_db("audit").query(
        "SELECT actor, detail FROM audit WHERE action = 'BulkAction.Requested'"
        " ORDER BY occurred_at")
    assert [a["actor"] for a in actions] == ["admin"] * 3
    assert '"operation": "send"' in actions[0]["detail"]


def test_the_study_page_sends_as_the_user(web_router: Any, tmp_path: Path) -> None:
    server = web_router(send_settings(tmp_path))
    study, _ = received_study(server, tmp_path)
    browser = Browser(server.url)
    browser.login("admin", ADMIN_PASSWORD)
    page = browser.get(browser.url(f"/studies/{study}"))
    assert 'id="study-send"' in page.text and '<option value="copy">copy</option>' in page.text
    sent = browser.post(browser.url(f"/studies/{study}/send"),
                        data={"destination": "copy", "series_uid": "", "reason": "review"},
                        headers={"HX-Request": "true"})
    assert sent.status_code == 200
    assert "Sending the study to copy: 3 of 3 instance(s) scheduled." in sent.text
    wait_for(lambda: delivered(server.router, "copy") == 3, 30, "the copies")
    refused = browser.post(browser.url(f"/studies/{study}/send"),
                           data={"destination": "<b>x</b>"})
    assert refused.status_code == 422 and "no destination named" in refused.text
    assert "<b>x</b>" not in refused.text  # escaped
    admin = bearer(server.url, "admin", ADMIN_PASSWORD)
    requests.post(f"{server.url}/api/v1/users", headers=admin, timeout=30, json={
        "username": "rad", "role": "radiologist", "password": "a long password 1"})
    radiologist = Browser(server.url)
    radiologist.login("rad", "a long password 1")
    assert 'id="study-send"' not in radiologist.get(radiologist.url(f"/studies/{study}")).text
    assert radiologist.post(radiologist.url(f"/studies/{study}/send"),
                            data={"destination": "copy"}).status_code == 403
