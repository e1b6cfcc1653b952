"""Three defects found in a trial of the jobs and studies pages, each against a real router
(storescu in, storescp or a folder out):

1. instances without a Study Instance UID formed one shared pseudo-study whose page said
   nothing was routed and whose "Jobs of this study" link answered 400;
2. after a destination recovered, its health showed an older dead letter as the last failure
   instead of the outage that had just ended;
3. a delivery that succeeded on its second attempt still showed the first attempt's error.
"""

from __future__ import annotations

import html
import re
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests

from tests.conftest import ADMIN_PASSWORD, make_settings, wait_for
from tests.integration.peers import StoreScp, free_port, require_tool
from tests.integration.test_web_jobs import delivery_counts, storescu, write_instances
from tests.web_harness import Browser, bearer
from web.filters import iso

pytestmark = pytest.mark.dcmtk
UID = re.compile(r"^[0-9]+(\.[0-9]+)+$")


def without_study_uid(folder: Path, count: int) -> list[Path]:
    """``count`` instances, each of its own series, none with a Study Instance UID."""
    paths = []
    for n in range(count):
        path = write_instances(folder / str(n), "MR", 1, PatientID=f"NOSTUDY-{n}")[0]
        ds = pydicom.dcmread(path)
        del ds.StudyInstanceUID
        ds.save_as(path)
        paths.append(path)
    return paths


def test_a_study_without_uid_is_its_own_findable_study(database_url: str, web_router: Any,
                                                       tmp_path: Path) -> None:
    (tmp_path / "archive").mkdir()
    settings = make_settings(tmp_path, database_url)
    server = web_router(replace(
        settings,
        destinations=({"name": "archive", "type": "file", "path": str(tmp_path / "archive")},),
        rules=({"name": "all", "calling_aet": "*", "destinations": ["archive"]},)))
    files = without_study_uid(tmp_path / "in", 2)
    assert storescu(server.router.dicom.port, files, "NOSTUDY_AE").returncode == 0
    wait_for(lambda: delivery_counts(server.router) == {("archive", "delivered"): 2}, 30,
             "both delivered")
    server.router.runner.catch_up()
    api = bearer(server.url, "admin", ADMIN_PASSWORD)
    jobs = requests.get(server.url + "/api/v1/jobs", headers=api, timeout=30).json()["items"]
    studies = {job["study_instance_uid"] for job in jobs}
    # Each instance is findable under a study UID of its own, not one shared bucket.
    assert len(studies) == 2 and all(s and UID.match(s) for s in studies), studies

    browser = Browser(server.url)
    browser.login("admin", ADMIN_PASSWORD)
    for study in studies:
        page = browser.get(browser.url(f"/studies/{study}"))
        assert page.status_code == 200
        assert "None of this study" not in page.text  # its routed job is shown
        assert 'data-destination="archive"' in page.text
        assert 'data-derived="1"' in page.text  # says the UID was derived, not received
        link = re.search(r'href="(/jobs\?study_uid=[^"]+)"', page.text)
        assert link is not None
        listed = browser.get(browser.url(html.unescape(link.group(1))))
        assert listed.status_code == 200, listed.text[:300]
        assert "NOSTUDY_AE" in listed.text


def test_health_and_delivery_show_the_latest_failure(database_url: str, web_router: Any,
                                                     tmp_path: Path) -> None:
    """A is dead-lettered (second failure, past the maximum age); then B fails once during
    the outage and is delivered on its second attempt, once storescp listens. The health's
    last failure is B's failed attempt, and B shows no error any more."""
    port = free_port()
    settings = make_settings(tmp_path, database_url)
    server = web_router(replace(
        settings,
        dispatch=replace(settings.dispatch, retry_delays=(2.0,), retry_every_after=2.0, max_age=3.0,
                         poll_interval=0.2),
        destinations=({"name": "pacs", "type": "dicom", "host": "127.0.0.1", "port": port,
                       "ae_title": "STORESCP"},),
        rules=({"name": "all", "calling_aet": "*", "destinations": ["pacs"]},)))
    dicom_port = server.router.dicom.port
    first = write_instances(tmp_path / "a", "CT", 1)
    assert storescu(dicom_port, first, "CT_A").returncode == 0
    wait_for(lambda: delivery_counts(server.router) == {("pacs", "dead"): 1}, 30,
             "A to be dead-lettered")
    time.sleep(1.1)  # B's failure comes clearly later than A's dead letter
    second = write_instances(tmp_path / "b", "CT", 1)
    assert storescu(dicom_port, second, "CT_B").returncode == 0
    wait_for(lambda: delivery_counts(server.router).get(("pacs", "retrying")) == 1, 30,
             "B's first attempt to fail")
    scp = StoreScp(tmp_path)  # the outage ends: a peer listens on the destination's port
    scp.folder.mkdir(parents=True)
    scp.port = port
    assert scp._start(require_tool("storescp"))
    try:
        wait_for(lambda: delivery_counts(server.router) == {
            ("pacs", "dead"): 1, ("pacs", "delivered"): 1}, 30, "B to be delivered")
    finally:
        scp.stop()
    server.router.runner.catch_up()
    api = bearer(server.url, "admin", ADMIN_PASSWORD)
    b_job = requests.get(server.url + "/api/v1/jobs", params={"calling_aet": "CT_B"},
                         headers=api, timeout=30).json()["items"][0]["job_id"]
    job = requests.get(f"{server.url}/api/v1/jobs/{b_job}", headers=api, timeout=30).json()
    failed = [e for e in job["events"] if e["action"] == "Delivery.AttemptFailed"]
    assert len(failed) == 1 and job["deliveries"][0]["attempts"] == 2

    # Bug 2: the last failure is B's failed attempt (not A's older dead letter).
    health = requests.get(server.url + "/api/v1/destinations/pacs", headers=api,
                          timeout=30).json()["health"]
    assert iso(health["last_failure_at"]) == failed[0]["occurred_at"], (health, failed)
    assert not health["last_error"].startswith("gave up"), health
    assert health["last_error"] == failed[0]["details"]["error"]

    # Bug 3: the delivered delivery no longer shows the first attempt's error.
    delivery = job["deliveries"][0]
    assert delivery["last_error"] is None and delivery["detail"], delivery
    browser = Browser(server.url)
    browser.login("admin", ADMIN_PASSWORD)
    page = browser.get(browser.url(f"/jobs/{b_job}")).text
    row = page.split('<tr data-destination="pacs">', 1)[1].split("</tr>", 1)[0]
    cells = re.findall(r"<td>(.*?)</td>", row, re.S)
    shown = re.sub(r"<[^>]*>", "", cells[6])  # the text people read (hover titles aside)
    assert failed[0]["details"]["error"] not in shown, cells
    assert shown.startswith(delivery["detail"]), shown
