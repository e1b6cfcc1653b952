"""Audit completeness: a scenario (failed and good login, configuration change, a receipt and
its delivery, viewing the job and the study, exporting and searching the audit trail) writes
exactly the audit rows it should: none missing, none extra."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import ADMIN_PASSWORD, make_settings, wait_for
from tests.integration.test_pipeline import storescu
from tests.synthetic import make_ct_series

# (actor, action, outcome) of every row the scenario must produce, and nothing else.
EXPECTED = Counter({
    ("system", "User.Created", "success"): 1,             # first admin at first start
    ("system", "NodeActivity.Started", "success"): 1,     # the router process started
    ("admin", "LoginFailure.Recorded", "failure"): 1,     # wrong password
    ("admin", "Session.Started", "success"): 1,           # good password: bearer session
    ("admin", "Destination.Created", "success"): 1,       # configuration change
    ("admin", "Rule.Created", "success"): 1,
    ("CT_SCANNER", "Job.Received", "success"): 1,         # the receipt ...
    ("CT_SCANNER", "Job.Routed", "success"): 1,           # ... its routing decision
    ("CT_SCANNER", "Instance.Registered", "success"): 1,
    ("system", "Delivery.Created", "success"): 1,         # ... and its delivery
    ("system", "Delivery.Succeeded", "success"): 1,
    ("admin", "job.view", "success"): 1,                  # viewing PHI
    ("admin", "study.view", "success"): 1,
    ("admin", "audit.export", "success"): 1,              # reading the audit trail
    ("admin", "audit.search", "success"): 1,
})


def audit_rows(router: Any) -> list[dict[str, Any]]:
    router.runner.catch_up()
    return [dict(r) for r in router.view_db("audit").query(
        "SELECT actor, action, outcome, study_instance_uid FROM audit"
        " ORDER BY occurred_at, application, position")]


@pytest.mark.dcmtk
def test_the_audit_trail_holds_exactly_the_rows_of_a_scenario(
    web_router: Any, tmp_path: Path, database_url: str, dcmtk: None,
) -> None:
    (tmp_path / "archive").mkdir()
    server = web_router(make_settings(tmp_path, database_url))
    base, router = server.url, server.router

    def api(method: str, path: str, **kwargs: Any) -> requests.Response:
        return requests.request(method, base + path, timeout=30, **kwargs)

    assert api("POST", "/api/v1/auth/token",
               json={"username": "admin", "password": "wrong password!"}).status_code == 401
    token = api("POST", "/api/v1/auth/token",
                json={"username": "admin", "password": ADMIN_PASSWORD}).json()["access_token"]
    auth = {"Authorization": f"Bearer {token}"}
    assert api("POST", "/api/v1/destinations", headers=auth, json={
        "name": "archive", "type": "file", "path": str(tmp_path / "archive")}).status_code == 201
    assert api("POST", "/api/v1/rules", headers=auth, json={
        "name": "everything", "destinations": ["archive"]}).status_code == 201

    files = make_ct_series(tmp_path / "ct", count=1, rows=32, cols=32, patient_id="AUD-1")
    storescu(router.dicom.port, files)
    jobs_db = router.view_db("jobs")
    wait_for(lambda: jobs_db.query("SELECT 1 FROM deliveries WHERE status = 'delivered'"),
             30, "the delivery")
    job = jobs_db.query("SELECT job_id, study_instance_uid FROM jobs")[0]
    assert api("GET", f"/api/v1/jobs/{job['job_id']}", headers=auth).status_code == 200
    study = job["study_instance_uid"]
    assert api("GET", f"/api/v1/studies/{study}", headers=auth).status_code == 200
    assert api("GET", "/api/v1/audit/export?format=csv", headers=auth).status_code == 200
    assert api("GET", f"/api/v1/audit?study={study}", headers=auth).status_code == 200

    def complete() -> bool:
        return sum(Counter((r["actor"], r["action"], r["outcome"])
                           for r in audit_rows(router)).values()) >= sum(EXPECTED.values())

    wait_for(complete, 15, "the audit rows")
    rows = audit_rows(router)
    actual = Counter((r["actor"], r["action"], r["outcome"]) for r in rows)
    missing, extra = EXPECTED - actual, actual - EXPECTED
    assert not missing and not extra, f"missing {dict(missing)}, extra {dict(extra)}"
    # Everything about the study is findable by its UID (receipt, delivery and accesses).
    about_study = Counter(r["action"] for r in rows if r["study_instance_uid"] == study)
    for action in ("Job.Received", "Job.Routed", "Delivery.Created", "Delivery.Succeeded",
                   "job.view", "study.view", "audit.search"):
        assert about_study[action] == 1, (action, about_study)
