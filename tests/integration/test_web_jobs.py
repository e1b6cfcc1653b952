"""Jobs in the web UI and API, against a real router: DCMTK storescu sends synthetic CT and MR
instances; a folder destination takes everything, a DICOM destination nobody listens on fails
(retrying), so filters, paging, the event timeline and requeue / cancel all see real events.
"""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests

from tests.conftest import ADMIN_PASSWORD, make_settings, wait_for
from tests.integration.peers import free_port
from tests.synthetic import make_ct_series, make_small_instances
from tests.web_harness import Browser, bearer

pytestmark = pytest.mark.dcmtk


def write_instances(folder: Path, modality: str, count: int, **tags: Any) -> list[Path]:
    """``count`` small instances of one new study, with ``tags`` set on each."""
    make = make_ct_series if modality == "CT" else make_small_instances
    paths = make(folder, count=count, rows=16, cols=16)
    for path in paths:
        ds = pydicom.dcmread(path)
        for keyword, value in tags.items():
            setattr(ds, keyword, value)
        ds.save_as(path)
    return paths


def storescu(port: int, files: list[Path], calling_aet: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["storescu", "-aet", calling_aet, "-aec", "DICOMROUTER", "127.0.0.1", str(port),
         *map(str, files)], capture_output=True, text=True, timeout=60)


def routed_settings(tmp_path: Path, database_url: str, **dispatch: Any) -> Any:
    """CT to a folder and to a DICOM peer that is not there; MR to the folder only."""
    (tmp_path / "archive").mkdir(exist_ok=True)
    settings = make_settings(tmp_path, database_url)
    return replace(
        settings,
        dispatch=replace(settings.dispatch, **dispatch),
        destinations=(
            {"name": "archive", "type": "file", "path": str(tmp_path / "archive")},
            {"name": "down", "type": "dicom", "host": "127.0.0.1", "port": free_port(),
             "ae_title": "NOBODY"},
        ),
        rules=({"name": "ct", "calling_aet": "CT_*", "modality": ["CT"],
                "destinations": ["archive", "down"]},
               {"name": "mr", "calling_aet": "MR_*", "destinations": ["archive"]}),
    )


def delivery_counts(router: Any) -> dict[tuple[str, str], int]:
    rows = router.view_db("jobs").query(
        "SELECT destination, status, count(*) AS n FROM deliveries GROUP BY destination, status")
    return {(r["destination"], r["status"]): int(r["n"]) for r in rows}


def send_ct_and_mr(server: Any, tmp_path: Path, ct_tags: dict[str, Any] | None = None
                   ) -> dict[str, Any]:
    """3 CT (patient PID-CT) and 2 MR (PID-MR) instances; waits until the views settle."""
    ct = write_instances(tmp_path / "ct", "CT", 3, PatientID="PID-CT", **(ct_tags or {}))
    mr = write_instances(tmp_path / "mr", "MR", 2, PatientID="PID-MR")
    port = server.router.dicom.port
    assert storescu(port, ct, "CT_SCANNER").returncode == 0
    assert storescu(port, mr, "MR_SCANNER").returncode == 0
    wait_for(lambda: delivery_counts(server.router) == {
        ("archive", "delivered"): 5, ("down", "retrying"): 3}, 30, "deliveries to settle")
    server.router.runner.catch_up()
    return {"ct_study": str(pydicom.dcmread(ct[0]).StudyInstanceUID),
            "mr_study": str(pydicom.dcmread(mr[0]).StudyInstanceUID)}


def accesses(router: Any, action: str) -> list[dict[str, Any]]:
    router.runner.catch_up()
    return router.view_db("audit").query(
        "SELECT actor, object_id, outcome, study_instance_uid, patient_id, detail FROM audit"
        " WHERE action = ? ORDER BY occurred_at", (action,))


def get(server: Any, headers: dict[str, str], path: str, **params: Any) -> requests.Response:
    return requests.get(server.url + path, headers=headers, params=params, timeout=30)


def check_filters(server: Any, api: dict[str, str], ct_study: str, ct_jobs: set[str],
                  mr_jobs: set[str]) -> None:
    def ids(**params: Any) -> set[str]:
        r = get(server, api, "/api/v1/jobs", **params)
        assert r.status_code == 200, r.text
        return {job["job_id"] for job in r.json()["items"]}

    assert ids(status="retrying") == ct_jobs and ids(status="delivered") == mr_jobs
    assert ids(status="failed") == set()
    assert ids(destination="down") == ct_jobs
    assert ids(calling_aet="mr_*") == mr_jobs and ids(calling_aet="XX*") == set()
    assert ids(modality="ct") == ct_jobs
    assert ids(patient_id="PID-MR") == mr_jobs
    assert ids(study_uid=ct_study) == ct_jobs
    assert ids(study_uid=ct_study, status="delivered") == set()
    assert ids(received_from="2999-01-01") == set()
    assert ids(received_to="2999-01-01") == ct_jobs | mr_jobs
    assert ids(received_to="2000-01-01T00:00:00Z") == set()
    for params, field in (({"status": "bogus"}, "status"), ({"received_from": "yesterday"},
                          "received_from"), ({"colour": "red"}, "colour"),
                          ({"study_uid": "1.2.abc"}, "study_uid")):
        r = get(server, api, "/api/v1/jobs", **params)
        assert r.status_code == 400 and field in r.json()["error"]["fields"], r.text
    assert get(server, api, "/api/v1/jobs", limit=0).status_code == 400


def check_list_page(server: Any, ct_jobs: set[str], mr_jobs: set[str]) -> None:
    browser = Browser(server.url)
    browser.login("admin", ADMIN_PASSWORD)
    page = browser.get(browser.url("/jobs"), params={"view": "instances", "status": "retrying",
                                                     "limit": 2})
    assert page.status_code == 200
    assert sum(f'href="/jobs/{i}"' in page.text for i in ct_jobs) == 2
    assert not any(f'href="/jobs/{i}"' in page.text for i in mr_jobs)
    assert "Jobs 1\u20132 of 3" in page.text and "offset=2" in page.text
    assert "view=instances" in page.text.split("offset=2")[0].rsplit('href="', 1)[1]
    second = browser.get(browser.url("/jobs"), params={"view": "instances",
                                                       "status": "retrying", "limit": 2,
                                                       "offset": 2})
    assert sum(f'href="/jobs/{i}"' in second.text for i in ct_jobs) == 1
    bad = browser.get(browser.url("/jobs"), params={"view": "instances",
                                                    "received_from": "not a date"})
    assert bad.status_code == 400 and "received_from" in bad.text


def test_job_list_filters_and_pages_real_receipts(database_url: str, web_router: Any,
                                                  tmp_path: Path) -> None:
    server = web_router(routed_settings(tmp_path, database_url))
    sent = send_ct_and_mr(server, tmp_path)
    api = bearer(server.url, "admin", ADMIN_PASSWORD)
    everything = get(server, api, "/api/v1/jobs").json()
    assert everything["total"] == 5 and len(everything["items"]) == 5
    by_id = {job["job_id"]: job for job in everything["items"]}
    ct_jobs = {i for i, job in by_id.items() if job["modality"] == "CT"}
    mr_jobs = set(by_id) - ct_jobs
    assert {by_id[i]["status"] for i in ct_jobs} == {"retrying"}
    assert {by_id[i]["status"] for i in mr_jobs} == {"delivered"}
    assert {(d["destination"], d["status"]) for i in ct_jobs for d in by_id[i]["deliveries"]
            } == {("archive", "delivered"), ("down", "retrying")}
    assert everything["items"][0]["received_at"].endswith("Z")
    check_filters(server, api, sent["ct_study"], ct_jobs, mr_jobs)

    pages = [get(server, api, "/api/v1/jobs", limit=2, offset=o).json() for o in (0, 2, 4)]
    assert [len(p["items"]) for p in pages] == [2, 2, 1]
    assert all(p["total"] == 5 for p in pages)
    paged = [job["job_id"] for p in pages for job in p["items"]]
    assert paged == [job["job_id"] for job in everything["items"]]  # newest first, no overlap

    check_list_page(server, ct_jobs, mr_jobs)
    recorded = accesses(server.router, "jobs.list")
    assert recorded and all(a["actor"] == "admin" for a in recorded)
    assert any(a["patient_id"] == "PID-MR" for a in recorded)
    assert any(a["study_instance_uid"] == sent["ct_study"] for a in recorded)


def check_timeline(job: dict[str, Any]) -> None:
    """Receipt, routing by rule ``ct`` version 1, one delivery each way."""
    assert job["timeline_complete"] is True  # the audit view had caught up with the jobs view
    assert [r["name"] for r in job["matched_rules"]] == ["ct"]
    actions = [e["action"] for e in job["events"]]
    assert actions[:2] == ["Job.Received", "Job.Routed"]
    assert actions.count("Delivery.Created") == 2
    routed = job["events"][1]["details"]["matched_rules"][0]
    assert (routed["name"], routed["version"]) == ("ct", 1)
    done = {(e["action"], e["destination"]) for e in job["events"]}
    assert ("Delivery.Succeeded", "archive") in done
    assert ("Delivery.AttemptFailed", "down") in done
    failed = next(e for e in job["events"] if e["action"] == "Delivery.AttemptFailed")
    assert "cannot connect" in failed["details"]["error"]


def requeue_and_check(server: Any, api: dict[str, str], job_id: str) -> None:
    r = requests.post(f"{server.url}/api/v1/jobs/{job_id}/deliveries/down/requeue",
                      headers=api, timeout=30, json={"reason": "link repaired"})
    assert r.status_code == 200 and r.json()["delivery"]["status"] in ("queued", "retrying")

    def attempts() -> int:
        found = get(server, api, f"/api/v1/jobs/{job_id}").json()
        return next(d["attempts"] for d in found["deliveries"] if d["destination"] == "down")

    wait_for(lambda: attempts() == 2, 20, "the requeued delivery to be attempted again")
    events = get(server, api, f"/api/v1/jobs/{job_id}").json()["events"]
    requeued = [e for e in events if e["action"] == "Delivery.Requeued"]
    assert len(requeued) == 1 and requeued[0]["actor"] == "admin"
    assert requeued[0]["details"]["reason"] == "link repaired"  # recorded with the event
    assert requeued[0]["destination"] == "down"
    assert [e["action"] for e in events].count("Delivery.AttemptFailed") == 2


def cancel_in_browser(server: Any, api: dict[str, str], job_id: str) -> Browser:
    """The page's cancel form (CSRF token in the form and the header)."""
    browser = Browser(server.url)
    browser.login("admin", ADMIN_PASSWORD)
    page = browser.get(browser.url(f"/jobs/{job_id}"))
    assert f'action="/jobs/{job_id}/deliveries/down/cancel"' in page.text
    assert f'action="/jobs/{job_id}/deliveries/archive/cancel"' not in page.text  # delivered
    r = browser.post(browser.url(f"/jobs/{job_id}/deliveries/down/cancel"),
                     data={"csrf_token": browser.csrf, "reason": "peer retired"})
    assert r.status_code == 200 and r.url.endswith(f"/jobs/{job_id}?done=cancel&destination=down")
    assert "Cancelled the delivery to down" in r.text
    detail = get(server, api, f"/api/v1/jobs/{job_id}").json()
    assert {d["destination"]: d["status"] for d in detail["deliveries"]} == {
        "archive": "delivered", "down": "cancelled"}
    assert detail["status"] == "delivered"

    def cancelled() -> list[dict[str, Any]]:
        # The timeline comes from the audit view, which may trail the jobs view a moment.
        events = get(server, api, f"/api/v1/jobs/{job_id}").json()["events"]
        return [e for e in events if e["action"] == "Delivery.Cancelled"]

    assert wait_for(cancelled, 10, "the cancel in the timeline")[0]["details"]["reason"] == (
        "peer retired")
    return browser


def check_refusals(server: Any, api: dict[str, str], job_id: str) -> None:
    """Refused commands: 422 with the reason; unknown job or delivery: 404."""
    again = requests.post(f"{server.url}/api/v1/jobs/{job_id}/deliveries/down/cancel",
                          headers=api, json={}, timeout=30)
    assert again.status_code == 422 and "cancelled" in again.json()["error"]["message"]
    delivered = requests.post(f"{server.url}/api/v1/jobs/{job_id}/deliveries/archive/requeue",
                              headers=api, timeout=30)
    assert delivered.status_code == 422 and "already delivered" in delivered.text
    for path in (f"/api/v1/jobs/{job_id}/deliveries/elsewhere/requeue",
                 "/api/v1/jobs/00000000-0000-4000-8000-000000000000/deliveries/down/cancel"):
        assert requests.post(server.url + path, headers=api, timeout=30).status_code == 404
    assert get(server, api, "/api/v1/jobs/00000000-0000-4000-8000-000000000000"
               ).status_code == 404
    assert get(server, api, "/api/v1/jobs/not-a-job").status_code == 404


def test_job_detail_timeline_requeue_and_cancel(database_url: str, web_router: Any,
                                                tmp_path: Path) -> None:
    server = web_router(routed_settings(tmp_path, database_url))
    sent = send_ct_and_mr(server, tmp_path)
    api = bearer(server.url, "admin", ADMIN_PASSWORD)
    job_id = get(server, api, "/api/v1/jobs", modality="CT", limit=1).json()["items"][0][
        "job_id"]
    job = get(server, api, f"/api/v1/jobs/{job_id}").json()
    assert job["status"] == "retrying" and job["study_instance_uid"] == sent["ct_study"]
    check_timeline(job)
    requeue_and_check(server, api, job_id)
    browser = cancel_in_browser(server, api, job_id)
    check_refusals(server, api, job_id)

    # HTMX: the requeue button swaps the live part of the page.
    page = browser.get(browser.url(f"/jobs/{job_id}")).text
    assert 'placeholder="reason" aria-label="Why requeue the delivery to down"' in page
    fragment = browser.post(browser.url(f"/jobs/{job_id}/deliveries/down/requeue"),
                            headers={"HX-Request": "true"}, data={"reason": "PACS <b>up</b>"})
    assert fragment.status_code == 200
    assert fragment.text.lstrip().startswith('<div id="job-live"')
    assert "Requeued the delivery to down" in fragment.text and "<html" not in fragment.text
    assert "requeued: PACS &lt;b&gt;up&lt;/b&gt;" in fragment.text  # the timeline says why

    views = accesses(server.router, "job.view")
    mine = [a for a in views if a["object_id"] == job_id]
    assert mine and all(a["study_instance_uid"] == sent["ct_study"] for a in mine)
    assert all(a["patient_id"] == "PID-CT" for a in mine)
    assert any(a["outcome"] == "not_found" for a in views)


def test_hostile_tag_values_are_escaped_on_job_pages(web_router: Any, tmp_path: Path) -> None:
    server = web_router(routed_settings(tmp_path, f"sqlite:///{tmp_path / 'db'}"))
    ct = write_instances(tmp_path / "ct", "CT", 1, PatientID="<script>alert(1)</script>")
    assert storescu(server.router.dicom.port, ct, "CT_SCANNER").returncode == 0
    db = server.router.view_db("jobs")
    wait_for(lambda: db.query("SELECT job_id FROM jobs"), 20, "the job")
    job_id = db.query("SELECT job_id FROM jobs")[0]["job_id"]
    browser = Browser(server.url)
    browser.login("admin", ADMIN_PASSWORD)
    for path in ("/jobs", f"/jobs/{job_id}"):
        page = browser.get(browser.url(path))
        assert page.status_code == 200
        assert "<script>alert(1)</script>" not in page.text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text


def test_roles_without_jobs_permissions_are_refused(web_router: Any, tmp_path: Path) -> None:
    from router.application.commands import Actor

    server = web_router(routed_settings(tmp_path, f"sqlite:///{tmp_path / 'db'}"))
    server.router.users.add("rad", "radiologist", "radiologist password", Actor("admin"))
    server.router.users.add("ops", "operator", "operator password 1", Actor("admin"))
    rad = bearer(server.url, "rad", "radiologist password")
    ops = bearer(server.url, "ops", "operator password 1")
    assert get(server, rad, "/api/v1/jobs").status_code == 403
    assert get(server, ops, "/api/v1/jobs").status_code == 200
    unknown = "/api/v1/jobs/00000000-0000-4000-8000-000000000000/deliveries/down/requeue"
    assert requests.post(server.url + unknown, headers=rad, timeout=30).status_code == 403
    assert requests.post(server.url + unknown, headers=ops, timeout=30).status_code == 404
