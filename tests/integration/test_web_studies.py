"""Studies in the web UI and API, against a real router: storescu sends two studies with
chosen tags (one with a hostile patient name and description); search, detail with series,
instances and per-destination delivery status, escaping and access records are checked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests

from tests.conftest import ADMIN_PASSWORD, wait_for
from tests.integration.test_web_jobs import (
    accesses,
    delivery_counts,
    get,
    routed_settings,
    storescu,
    write_instances,
)
from tests.web_harness import Browser, bearer

pytestmark = pytest.mark.dcmtk

HOSTILE_NAME = "<script>alert(1)</script>"
HOSTILE_DESCRIPTION = "../../etc/passwd"


def send_two_studies(server: Any, tmp_path: Path) -> dict[str, str]:
    """A CT study (3 instances, hostile name) and an MR study (2, DOE^JOHN); both delivered
    to the folder, the CT also (failing) to the DICOM peer."""
    ct = write_instances(tmp_path / "ct", "CT", 3, PatientID="PAT-1", PatientName=HOSTILE_NAME,
                         StudyDescription=HOSTILE_DESCRIPTION, StudyDate="20240301",
                         AccessionNumber="ACC-CT-1")
    mr = write_instances(tmp_path / "mr", "MR", 2, PatientID="PAT-2", PatientName="DOE^JOHN",
                         StudyDescription="BRAIN WITHOUT CONTRAST", StudyDate="20240515",
                         AccessionNumber="ACC-MR-2")
    port = server.router.dicom.port
    assert storescu(port, ct, "CT_SCANNER").returncode == 0
    assert storescu(port, mr, "MR_SCANNER").returncode == 0
    wait_for(lambda: delivery_counts(server.router) == {
        ("archive", "delivered"): 5, ("down", "retrying"): 3}, 30, "deliveries to settle")
    server.router.runner.catch_up()
    return {"ct": str(pydicom.dcmread(ct[0]).StudyInstanceUID),
            "mr": str(pydicom.dcmread(mr[0]).StudyInstanceUID),
            "ct_instance": str(pydicom.dcmread(ct[0]).SOPInstanceUID)}


def check_detail(server: Any, api: dict[str, str], uids: dict[str, str]) -> None:
    """Series, instances and where each instance went; 404 for unknown UIDs."""
    study = get(server, api, f"/api/v1/studies/{uids['ct']}").json()
    assert study["patient_name"] == HOSTILE_NAME and study["number_of_instances"] == 3
    assert [s["modality"] for s in study["series"]] == ["CT"]
    assert len(study["instances"]) == 3 and not study["instances_truncated"]
    assert study["deliveries"]["archive"]["delivered"] == 3
    assert study["deliveries"]["down"]["retrying"] == 3
    one = next(i for i in study["instances"] if i["sop_instance_uid"] == uids["ct_instance"])
    assert one["deliveries"] == {"archive": "delivered", "down": "retrying"}
    mr = get(server, api, f"/api/v1/studies/{uids['mr']}").json()
    assert mr["deliveries"] == {"archive": {"failed": 0, "retrying": 0, "queued": 0,
                                            "held": 0, "delivered": 2, "cancelled": 0}}
    assert get(server, api, "/api/v1/studies/1.2.3.4").status_code == 404
    assert get(server, api, "/api/v1/studies/not-a-uid").status_code == 404


def test_study_search_and_detail_with_delivery_status(database_url: str, web_router: Any,
                                                      tmp_path: Path) -> None:
    server = web_router(routed_settings(tmp_path, database_url))
    uids = send_two_studies(server, tmp_path)
    api = bearer(server.url, "admin", ADMIN_PASSWORD)

    def found(**params: Any) -> list[str]:
        r = get(server, api, "/api/v1/studies", **params)
        assert r.status_code == 200, r.text
        return [s["study_instance_uid"] for s in r.json()["items"]]

    assert set(found()) == {uids["ct"], uids["mr"]}
    assert found(patient_name="doe") == [uids["mr"]]  # a prefix, any case
    # as the pages show names ("DOE, JOHN"): the comma stands for the family name's ^
    assert found(patient_name="Doe, John") == [uids["mr"]] == found(patient_name="doe,j")
    assert found(patient_name="*JOHN") == [uids["mr"]] and found(patient_name="JOHN") == []
    assert found(patient_name="<script>*") == [uids["ct"]]
    assert found(patient_id="PAT-1") == [uids["ct"]] and found(patient_id="PAT") == []
    assert set(found(patient_id="PAT-?")) == {uids["ct"], uids["mr"]}
    assert found(study_date_from="2024-04-01") == [uids["mr"]]
    assert found(study_date_to="20240401") == [uids["ct"]]
    assert found(study_date_from="2024-03-01", study_date_to="2024-03-01") == [uids["ct"]]
    assert found(modality="mr") == [uids["mr"]] and found(modality="US") == []
    assert found(accession_number="ACC-CT-1") == [uids["ct"]]
    assert found(description="contrast") == [uids["mr"]]  # anywhere in the text
    assert found(description="etc/passwd") == [uids["ct"]]
    first = get(server, api, "/api/v1/studies", limit=1).json()
    second = get(server, api, "/api/v1/studies", limit=1, offset=1).json()
    assert first["total"] == second["total"] == 2
    assert [first["items"][0]["study_instance_uid"], second["items"][0]["study_instance_uid"]
            ] == [uids["mr"], uids["ct"]]  # most recent study date first
    for params, field in (({"study_date_from": "2024-13-01"}, "study_date_from"),
                          ({"name": "DOE"}, "name"), ({"study_uid": "x"}, "study_uid")):
        r = get(server, api, "/api/v1/studies", **params)
        assert r.status_code == 400 and field in r.json()["error"]["fields"], r.text

    check_detail(server, api, uids)

    views = accesses(server.router, "study.view")
    assert {(a["study_instance_uid"], a["patient_id"]) for a in views
            if a["outcome"] == "success"} == {(uids["ct"], "PAT-1"), (uids["mr"], "PAT-2")}
    assert any(a["outcome"] == "not_found" for a in views)
    searches = accesses(server.router, "studies.search")
    assert any(a["patient_id"] == "PAT-1" for a in searches)
    assert all("matched:" in a["detail"] for a in searches)


def test_hostile_tags_are_escaped_on_study_pages(web_router: Any, tmp_path: Path) -> None:
    server = web_router(routed_settings(tmp_path, f"sqlite:///{tmp_path / 'db'}"))
    uids = send_two_studies(server, tmp_path)
    browser = Browser(server.url)
    browser.login("admin", ADMIN_PASSWORD)
    search = browser.get(browser.url("/studies"), params={"patient_name": "<script>*"})
    assert search.status_code == 200 and f'href="/studies/{uids["ct"]}"' in search.text
    assert f'href="/studies/{uids["mr"]}"' not in search.text
    detail = browser.get(browser.url(f"/studies/{uids['ct']}"))
    assert detail.status_code == 200
    for page in (search, detail):
        assert HOSTILE_NAME not in page.text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
    assert HOSTILE_DESCRIPTION in detail.text  # shown as text, never used as a path
    assert detail.text.count('class="badge delivered"') >= 3
    assert uids["ct_instance"] in detail.text
    assert browser.get(browser.url("/studies/1.2.3")).status_code == 404
    bad = browser.get(browser.url("/studies"), params={"study_date_from": "2024-02-30"})
    assert bad.status_code == 400 and "study_date_from" in bad.text


def test_studies_need_studies_read(web_router: Any, tmp_path: Path) -> None:
    from router.application.commands import Actor

    server = web_router()
    server.router.users.add("ops", "operator", "operator password 1", Actor("admin"))
    server.router.users.add("rad", "radiologist", "radiologist password", Actor("admin"))
    ops = bearer(server.url, "ops", "operator password 1")
    rad = bearer(server.url, "rad", "radiologist password")
    assert requests.get(server.url + "/api/v1/studies", headers=ops, timeout=30
                        ).status_code == 403
    r = requests.get(server.url + "/api/v1/studies", headers=rad, timeout=30)
    assert r.status_code == 200 and r.json() == {"total": 0, "limit": 50, "offset": 0,
                                                 "items": []}
