"""Bulk requeue and cancel of deliveries (API, jobs page form, command line) against a real
router: jobs and their dead-lettered deliveries are recorded through the router's own event
stores (as the receiver and dispatcher record them), the destination is paused so that a
requeued delivery stays pending, and every assertion reads the views the UI reads.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import requests

from router.application.commands import Actor
from router.domain.delivery import Delivery
from router.domain.ingest import Job
from tests.conftest import ADMIN_PASSWORD, make_settings, wait_for
from tests.integration.peers import free_port
from tests.web_harness import Browser, bearer

ROUTER_BIN = Path(sys.executable).parent / "dicom-router"
STUDY_A = "1.2.826.0.1.3680043.10.1.1"
STUDY_B = "1.2.826.0.1.3680043.10.1.2"


def bulk_settings(tmp_path: Path, database_url: str) -> Any:
    (tmp_path / "archive").mkdir(exist_ok=True)
    settings = make_settings(tmp_path, database_url)
    return replace(settings, destinations=(
        {"name": "down", "type": "dicom", "host": "127.0.0.1", "port": free_port(),
         "ae_title": "NOBODY"},
        {"name": "archive", "type": "file", "path": str(tmp_path / "archive")},
    ))


def dead_deliveries(router: Any, study_uid: str, count: int, destination: str = "down"
                    ) -> list[str]:
    """``count`` received jobs of one study, each routed to ``destination`` and dead-lettered
    there, recorded as the receiver and the dispatcher record them."""
    ctx = Actor("system").ctx()
    jobs, deliveries = [], []
    for _ in range(count):
        sop = f"2.25.{uuid.uuid4().int}"
        job = Job(**ctx, source="dimse", calling_aet="CT_SCANNER", called_aet="DICOMROUTER",
                  sop_class_uid="1.2.840.10008.5.1.4.1.1.2", sop_instance_uid=sop,
                  transfer_syntax_uid="1.2.840.10008.1.2.1", sha256="0" * 64, size=1,
                  index={"StudyInstanceUID": study_uid, "SeriesInstanceUID": study_uid + ".1",
                         "PatientID": "PID-BULK", "Modality": "CT"},
                  previous_job_id=None, tls_subject="", repaired_uids=None, node="")
        job.route(None, **ctx, matched_rules=[], destinations=[destination], unrouted=False,
                  default_destination_used=False, stopped_by=None)
        delivery = Delivery(str(job.id), destination, **ctx, sha256="0" * 64)
        delivery.dead_letter(**ctx, attempt=1, reason="refused", permanent=True, node="",
                             transforms=[])
        jobs.append(job)
        deliveries.append(delivery)
    for start in range(0, count, 500):
        router.stores.ingest.save(*jobs[start:start + 500])
        router.stores.delivery.save(*deliveries[start:start + 500])
    router.runner.catch_up()
    return [str(job.id) for job in jobs]


def statuses(router: Any, study_uid: str) -> dict[str, int]:
    router.runner.catch_up()
    rows = router.view_db("jobs").query(
        "SELECT d.status, count(*) AS n FROM deliveries d JOIN jobs j ON j.job_id = d.job_id"
        " WHERE j.study_instance_uid = ? GROUP BY d.status", (study_uid,))
    return {r["status"]: int(r["n"]) for r in rows}


def audit_rows(router: Any, action: str) -> list[dict[str, Any]]:
    router.runner.catch_up()
    return router.view_db("audit").query(
        "SELECT actor, correlation_id, detail, job_id FROM audit WHERE action = ?"
        " ORDER BY application, position", (action,))


def post(server: Any, path: str, headers: dict[str, str], body: Any) -> requests.Response:
    return requests.post(server.url + path, json=body, headers=headers, timeout=60)


def started(web_router: Any, tmp_path: Path, database_url: str | None = None) -> Any:
    server = web_router(bulk_settings(tmp_path, database_url or f"sqlite:///{tmp_path / 'db'}"))
    server.router.commands.pause_destination("down", Actor("admin"))  # requeued ones wait
    return server


def test_bulk_requeue_and_cancel_through_the_api(web_router: Any, tmp_path: Path,
                                                 database_url: str) -> None:
    server = started(web_router, tmp_path, database_url)
    router = server.router
    a_jobs = dead_deliveries(router, STUDY_A, 3)
    dead_deliveries(router, STUDY_B, 2)
    admin = bearer(server.url, "admin", ADMIN_PASSWORD)
    requeue = "/api/v1/deliveries/requeue"

    refused = {
        "all": post(server, requeue, admin, {}),
        "status": post(server, requeue, admin, {"status": "delivered"}),
        "destination": post(server, requeue, admin, {"destination": "nope"}),
        "since": post(server, requeue, admin, {"since": "yesterday"}),
        "until": post(server, requeue, admin, {"since": "2026-02-01", "until": "2026-01-01"}),
        "study_uid": post(server, requeue, admin, {"study_uid": "1.2.abc"}),
        "colour": post(server, requeue, admin, {"colour": "red"}),
    }
    for field, answer in refused.items():
        assert answer.status_code == 422, (field, answer.text)
        assert field in answer.json()["error"]["fields"], (field, answer.text)
    assert "all" in refused["all"].json()["error"]["message"]
    bad_json = requests.post(server.url + requeue, data=b"{", headers=admin, timeout=30)
    assert bad_json.status_code == 400
    assert statuses(router, STUDY_A) == {"dead": 3}  # nothing was touched

    dry = post(server, requeue, admin, {"study_uid": STUDY_A, "dry_run": True})
    assert dry.status_code == 200 and dry.json() == {"operation": "requeue", "dry_run": True,
                                                     "matched": 3}
    assert statuses(router, STUDY_A) == {"dead": 3}
    assert audit_rows(router, "BulkAction.Requested") == []

    done = post(server, requeue, admin, {"study_uid": STUDY_A, "destination": "down",
                                         "status": "dead", "since": "2026-01-01",
                                         "reason": "PACS back after outage"})
    assert done.status_code == 200, done.text
    assert done.json()["matched"] == 3 and done.json()["affected"] == 3
    assert statuses(router, STUDY_A) == {"pending": 3}  # the jobs view shows it at once
    assert statuses(router, STUDY_B) == {"dead": 2}

    action = audit_rows(router, "BulkAction.Requested")
    assert len(action) == 1 and action[0]["actor"] == "admin"
    assert '"reason": "PACS back after outage"' in action[0]["detail"]
    assert '"matched": 3' in action[0]["detail"] and '"operation": "requeue"' in action[0][
        "detail"]
    requeued = audit_rows(router, "Delivery.Requeued")
    assert sorted(r["job_id"] for r in requeued) == sorted(a_jobs)
    assert {(r["actor"], r["correlation_id"]) for r in requeued} == {
        ("admin", done.json()["correlation_id"])} == {("admin", action[0]["correlation_id"])}

    cancelled = post(server, "/api/v1/deliveries/cancel", admin,
                     {"all": True, "reason": "study sent by courier"})
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["matched"] == 5 and cancelled.json()["affected"] == 5
    assert statuses(router, STUDY_A) == {"cancelled": 3}
    errors = {r["last_error"] for r in router.view_db("jobs").query(
        "SELECT last_error FROM deliveries")}
    assert errors == {"study sent by courier"}
    # Nothing left to act on: matched 0, and the action is still on record.
    again = post(server, "/api/v1/deliveries/cancel", admin, {"destination": "down"})
    assert again.json()["matched"] == 0 and again.json()["affected"] == 0
    assert len(audit_rows(router, "BulkAction.Requested")) == 3


def test_bulk_actions_need_the_jobs_write_permission(web_router: Any, tmp_path: Path) -> None:
    server = started(web_router, tmp_path)
    dead_deliveries(server.router, STUDY_A, 1)
    admin = bearer(server.url, "admin", ADMIN_PASSWORD)
    for name, role in (("olga", "operator"), ("rita", "radiologist"), ("alan", "auditor")):
        made = post(server, "/api/v1/users", admin, {"username": name, "role": role,
                                                     "password": "a long password 1"})
        assert made.status_code == 201, made.text
    body = {"study_uid": STUDY_A, "dry_run": True}
    for name in ("rita", "alan"):
        headers = bearer(server.url, name, "a long password 1")
        assert post(server, "/api/v1/deliveries/requeue", headers, body).status_code == 403
        assert post(server, "/api/v1/deliveries/cancel", headers, body).status_code == 403
    operator = bearer(server.url, "olga", "a long password 1")
    answer = post(server, "/api/v1/deliveries/requeue", operator, {"study_uid": STUDY_A})
    assert answer.status_code == 200 and answer.json()["affected"] == 1
    assert audit_rows(server.router, "BulkAction.Requested")[0]["actor"] == "olga"


def test_the_jobs_page_bulk_form_counts_then_requeues(web_router: Any,
                                                       tmp_path: Path) -> None:
    server = started(web_router, tmp_path)
    dead_deliveries(server.router, STUDY_A, 2)
    browser = Browser(server.url)
    browser.login("admin", ADMIN_PASSWORD)
    page = browser.get(browser.url("/jobs"))
    assert 'id="jobs-bulk"' in page.text and 'action="/jobs/bulk"' in page.text
    form = {"operation": "requeue", "destination": "down", "status": "dead",
            "reason": "<b>outage</b> over"}
    htmx = {"HX-Request": "true"}
    counted = browser.post(browser.url("/jobs/bulk"), data={**form, "go": "count"},
                           headers=htmx)
    assert counted.status_code == 200 and "2 deliveries match; nothing was changed" in (
        counted.text)
    assert "&lt;b&gt;outage&lt;/b&gt; over" in counted.text  # the form keeps it, escaped
    assert statuses(server.router, STUDY_A) == {"dead": 2}
    empty = browser.post(browser.url("/jobs/bulk"), data={"operation": "cancel", "go": "run"},
                         headers=htmx)
    assert "all: give at least one of" in empty.text
    done = browser.post(browser.url("/jobs/bulk"), data={**form, "go": "run"})  # no HTMX
    assert done.status_code == 200 and "Requeued 2 of 2 matching deliveries." in done.text
    assert statuses(server.router, STUDY_A) == {"pending": 2}
    action = audit_rows(server.router, "BulkAction.Requested")
    assert action[0]["actor"] == "admin" and "<b>outage</b> over" in action[0]["detail"]
    no_csrf = requests.post(server.url + "/jobs/bulk", data={**form, "go": "run"},
                            cookies=browser.cookies, timeout=30, allow_redirects=False)
    assert no_csrf.status_code == 403


def test_ten_thousand_deliveries_do_not_hold_the_event_loop(web_router: Any,
                                                             tmp_path: Path) -> None:
    """The requeue runs in batches in a thread: other requests are answered meanwhile."""
    server = started(web_router, tmp_path)
    count = 10_000
    dead_deliveries(server.router, STUDY_A, count)
    admin = bearer(server.url, "admin", ADMIN_PASSWORD)
    latencies: list[float] = []
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set() and len(latencies) < 10_000:
            began = time.monotonic()
            requests.get(server.url + "/healthz", timeout=30)
            latencies.append(time.monotonic() - began)
            time.sleep(0.05)

    prober = threading.Thread(target=probe)
    prober.start()
    began = time.monotonic()
    try:
        answer = post(server, "/api/v1/deliveries/requeue", admin,
                      {"destination": "down", "reason": "load"})
    finally:
        stop.set()
        prober.join(timeout=60)
    took = time.monotonic() - began
    assert answer.status_code == 200, answer.text
    assert answer.json()["affected"] == count
    assert statuses(server.router, STUDY_A) == {"pending": count}
    assert len(latencies) > 10, "the probe never ran while the requeue did"
    print(f"requeued {count} in {took:.1f} s ({count / took:.0f}/s); /healthz meanwhile:"
          f" {len(latencies)} answers, slowest {max(latencies) * 1000:.0f} ms")
    assert max(latencies) < 1.0


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DICOM_ROUTER_DATABASE_URL": f"sqlite:///{tmp_path / 'db'}",
           "DICOM_ROUTER_SECRET_KEY": "0" * 64, "DICOM_ROUTER_DICOM_PROCESSES": "0"}
    return subprocess.run([str(ROUTER_BIN), "--data-dir", str(tmp_path / "data"), *args],
                          capture_output=True, text=True, timeout=120, env=env)


def test_cli_requeues_and_cancels_by_filter(web_router: Any, tmp_path: Path) -> None:
    server = started(web_router, tmp_path)
    router = server.router
    dead_deliveries(router, STUDY_A, 3)
    [job_b] = dead_deliveries(router, STUDY_B, 1)

    refused = cli(tmp_path, "deliveries", "requeue")
    assert refused.returncode == 2 and "all: give at least one of" in refused.stderr
    bad = cli(tmp_path, "deliveries", "requeue", "--since", "last week")
    assert bad.returncode == 2 and "--since: expected YYYY-MM-DD" in bad.stderr
    unknown = cli(tmp_path, "deliveries", "cancel", "--destination", "nope")
    assert unknown.returncode == 2 and "no destination named 'nope'" in unknown.stderr

    dry = cli(tmp_path, "deliveries", "requeue", "--destination", "down", "--status", "dead",
              "--since", "2026-01-01", "--study", STUDY_A, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.startswith("3 deliveries match; nothing was changed")
    assert statuses(router, STUDY_A) == {"dead": 3}

    done = cli(tmp_path, "deliveries", "requeue", "--destination", "down", "--status", "dead",
               "--since", "2026-01-01", "--study", STUDY_A, "--reason", "PACS is back")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("requeued 3 of 3 matching deliveries")
    wait_for(lambda: statuses(router, STUDY_A) == {"pending": 3}, 10, "the requeue")
    assert statuses(router, STUDY_B) == {"dead": 1}
    action = audit_rows(router, "BulkAction.Requested")
    assert len(action) == 1 and action[0]["actor"].startswith("cli:")
    assert "PACS is back" in action[0]["detail"]

    cancelled = cli(tmp_path, "deliveries", "cancel", "--all", "--reason", "not needed")
    assert cancelled.returncode == 0 and "cancelled 4 of 4" in cancelled.stdout
    wait_for(lambda: statuses(router, STUDY_B) == {"cancelled": 1}, 10, "the cancel")

    # One job's deliveries: the reason is recorded too.
    one = cli(tmp_path, "deliveries", "requeue", job_b, "--reason", "wanted after all")
    assert one.returncode == 0 and f"requeued {job_b} -> down" in one.stdout, one.stderr
    again = cli(tmp_path, "deliveries", "cancel", job_b, "--reason", "a duplicate")
    assert again.returncode == 0 and f"cancelled {job_b} -> down" in again.stdout
    mine = [r for r in audit_rows(router, "Delivery.Requeued") if r["job_id"] == job_b]
    assert "wanted after all" in mine[-1]["detail"]
    mine = [r for r in audit_rows(router, "Delivery.Cancelled") if r["job_id"] == job_b]
    assert "a duplicate" in mine[-1]["detail"]


@pytest.mark.parametrize("action", ["requeue", "cancel"])
def test_cli_statuses_are_the_application_s(action: str) -> None:
    from router.application.bulk import OPERATIONS as APPLICATION
    from router.application.bulk import STATUSES
    from router.cli_ops import OPERATIONS as PARSER
    from web.api.deliveries import Status

    assert PARSER[action] == APPLICATION[action]
    from router.domain.delivery_states import ALIASES, shown

    assert set(Status.__args__) == {  # type: ignore[attr-defined]
        *(shown(s) for s in STATUSES), *(a for a in ALIASES if a != "dead_lettered")}
