"""Transfers (a study sent by one calling AE) in the API, the jobs page and the dashboard,
against a real router: storescu sends 3 CT instances (to a folder and to a DICOM peer that is
not there: retrying) and 2 MR instances (folder only), as in test_web_jobs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import requests

from router.application.commands import Actor
from tests.conftest import ADMIN_PASSWORD
from tests.integration.test_web_jobs import accesses, get, routed_settings, send_ct_and_mr
from tests.web_harness import Browser, bearer

pytestmark = pytest.mark.dcmtk


def ids(server: Any, api: dict[str, str], **params: Any) -> set[str]:
    r = get(server, api, "/api/v1/transfers", **params)
    assert r.status_code == 200, r.text
    return {t["study_instance_uid"] for t in r.json()["items"]}


def check_filters(server: Any, api: dict[str, str], ct: str, mr: str) -> None:
    assert ids(server, api) == {ct, mr}
    assert ids(server, api, status="retrying") == {ct}
    assert ids(server, api, status="delivered") == {mr}
    assert ids(server, api, status="failed") == set()
    assert ids(server, api, status="dead") == set()  # old name, still understood
    assert ids(server, api, destination="down") == {ct}
    assert ids(server, api, calling_aet="mr_*") == {mr}
    assert ids(server, api, study_uid=ct) == {ct}
    assert ids(server, api, patient_id="PID-MR") == {mr}
    assert ids(server, api, received_from="2999-01-01") == set()
    assert ids(server, api, received_to="2999-01-01") == {ct, mr}
    for params, field in (({"status": "bogus"}, "status"), ({"received_to": "soon"},
                          "received_to"), ({"colour": "red"}, "colour"),
                          ({"study_uid": "1.2.x"}, "study_uid")):
        r = get(server, api, "/api/v1/transfers", **params)
        assert r.status_code == 400 and field in r.json()["error"]["fields"], r.text
    paged = get(server, api, "/api/v1/transfers", limit=1, offset=1).json()
    assert paged["total"] == 2 and len(paged["items"]) == 1


def test_transfers_group_instances_by_study_and_sender(database_url: str, web_router: Any,
                                                       tmp_path: Path) -> None:
    server = web_router(routed_settings(tmp_path, database_url))
    sent = send_ct_and_mr(server, tmp_path, {"PatientName": "DOE^JANE",
                                            "StudyDescription": "CHEST CT"})
    api = bearer(server.url, "admin", ADMIN_PASSWORD)
    listed = get(server, api, "/api/v1/transfers").json()
    assert listed["total"] == 2
    ct = next(t for t in listed["items"] if t["study_instance_uid"] == sent["ct_study"])
    assert (ct["calling_aet"], ct["instances"], ct["series_count"]) == ("CT_SCANNER", 3, 1)
    assert (ct["patient_name"], ct["study_description"]) == ("DOE^JANE", "CHEST CT")
    assert ct["status"] == "retrying"
    assert ct["progress"]["archive"]["summary"] == "3/3 delivered"
    assert ct["progress"]["down"]["summary"] == "0/3 delivered, 3 retrying"
    assert ct["progress"]["down"]["states"] == {"retrying": 3}
    check_filters(server, api, sent["ct_study"], sent["mr_study"])

    detail = get(server, api, f"/api/v1/transfers/{ct['transfer_id']}").json()
    assert [s["instances"] for s in detail["series"]] == [3]
    assert detail["series"][0]["progress"]["archive"]["summary"] == "3/3 delivered"
    assert get(server, api, "/api/v1/transfers/not-an-id").status_code == 404
    assert get(server, api, "/api/v1/transfers/" + "0" * 8 + "-0000-0000-0000-"
               + "0" * 12).status_code == 404
    lists = accesses(server.router, "transfers.list")
    assert lists and all(a["actor"] == "admin" for a in lists)
    views = accesses(server.router, "transfer.view")
    assert any(v["study_instance_uid"] == sent["ct_study"] and v["outcome"] == "success"
               for v in views)
    assert any(v["outcome"] == "not_found" for v in views)
    paths = requests.get(server.url + "/api/v1/openapi.json", timeout=30).json()["paths"]
    params = {p["name"] for p in paths["/api/v1/transfers"]["get"]["parameters"]}
    assert {"status", "destination", "calling_aet", "received_from", "study_uid"} <= params


def test_jobs_page_lists_transfers_and_expands_them(database_url: str, web_router: Any,
                                                    tmp_path: Path) -> None:
    server = web_router(routed_settings(tmp_path, database_url))
    sent = send_ct_and_mr(server, tmp_path, {"PatientName": "DOE^JANE"})
    browser = Browser(server.url)
    browser.login("admin", ADMIN_PASSWORD)
    page = browser.get(browser.url("/jobs")).text
    assert page.count('<tr class="transfer"') == 2 and "Transfers 1\u20132 of 2" in page
    assert "DOE^JANE" in page and "0/3 delivered, 3 retrying" in page
    assert 'href="/jobs?view=instances' in page  # the per-instance list, one click away
    retrying = browser.get(browser.url("/jobs"), params={"status": "retrying"}).text
    assert retrying.count('<tr class="transfer"') == 1
    bad = browser.get(browser.url("/jobs"), params={"received_from": "someday"})
    assert bad.status_code == 400 and "received_from" in bad.text

    api = bearer(server.url, "admin", ADMIN_PASSWORD)
    transfer = get(server, api, "/api/v1/transfers", study_uid=sent["ct_study"]).json()[
        "items"][0]
    series = browser.get(browser.url(f"/transfers/{transfer['transfer_id']}/series"))
    assert series.status_code == 200 and series.text.count('<tr class="series"') == 1
    series_uid = series.text.split('data-series="', 1)[1].split('"', 1)[0]
    instances = browser.get(browser.url(
        f"/transfers/{transfer['transfer_id']}/series/{series_uid}/instances")).text
    assert instances.count('<tr class="instance"') == 3
    assert ">CT Image Storage</abbr>" in instances  # SOP class by name, UID on hover
    assert 'title="1.2.840.10008.5.1.4.1.1.2"' in instances
    hostile = browser.get(browser.url(
        f"/transfers/{transfer['transfer_id']}/series/..%2F..%2Fetc/instances"))
    assert hostile.status_code == 404
    assert browser.get(browser.url("/transfers/nope/series")).status_code == 404

    dashboard = browser.get(browser.url("/")).text
    assert dashboard.count('data-transfer="') == 2 and "0/3 delivered, 3 retrying" in dashboard
    assert "DOE^JANE" not in dashboard  # the dashboard shows no PHI


def test_transfers_need_the_jobs_permission(database_url: str, web_router: Any,
                                            tmp_path: Path) -> None:
    server = web_router(routed_settings(tmp_path, database_url))
    server.router.users.add("aud", "auditor", "auditor password 1", Actor("admin"))
    api = bearer(server.url, "aud", "auditor password 1")
    assert get(server, api, "/api/v1/transfers").status_code == 403
    browser = Browser(server.url)
    browser.login("aud", "auditor password 1")
    assert browser.get(browser.url("/jobs")).status_code == 403
