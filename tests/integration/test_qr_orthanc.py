"""Orthanc as the remote PACS (started here on 127.0.0.1 with its own config and storage):
studies loaded through its REST API are echoed, queried and retrieved through the router's API,
by C-MOVE and by C-GET; the instances arrive as receipts of the user who asked and are routed
by a rule to a folder. Runs on SQLite and, with receiver processes, on PostgreSQL.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests

from router.application.commands import Actor
from tests.conftest import ADMIN_PASSWORD, make_settings, wait_for
from tests.integration.peers import free_port, is_listening, stop_process
from tests.integration.test_qr_scp import Study, write_study
from tests.web_harness import Browser, bearer

ORTHANC = "/usr/sbin/Orthanc"
RADIOLOGIST = ("rad", "a long enough password")


class Orthanc:
    """Orthanc with its own config, SQLite index and storage under ``base``, no plugins; the
    router is declared as a modality so that Orthanc accepts its queries and moves to it."""

    ae_title = "ORTHANC"

    def __init__(self, base: Path, router_ae: str, router_port: int,
                 extra: dict[str, Any] | None = None) -> None:
        self.base = base
        self.router = (router_ae, router_port)
        self.port = self.http_port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._extra = extra or {}  # more configuration (TLS); a "router" modality replaces ours

    def __enter__(self) -> Orthanc:
        if not os.access(ORTHANC, os.X_OK):
            pytest.skip("Orthanc is not installed (Debian package orthanc)")
        self.base.mkdir(parents=True, exist_ok=True)
        self.port, self.http_port = free_port(), free_port()
        config = self.base / "orthanc.json"
        config.write_text(json.dumps({
            "Name": "test-pacs", "StorageDirectory": str(self.base / "storage"),
            "IndexDirectory": str(self.base / "index"), "DicomAet": self.ae_title,
            "DicomPort": self.port, "HttpPort": self.http_port, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "DicomCheckCalledAeTitle": False, "Plugins": [],
            "SaveJobs": False, "DicomModalities": {"router": [*self.router[:1], "127.0.0.1",
                                                              self.router[1]]},
            **self._extra}))
        with (self.base / "orthanc.log").open("ab") as log:
            self._process = subprocess.Popen([ORTHANC, str(config)], stdout=log,
                                             stderr=subprocess.STDOUT,
                                             env={**os.environ, "TCP_NODELAY": "1"})
        wait_for(lambda: self._http_ok() and is_listening(self.port), 30, "Orthanc to start")
        return self

    def _http_ok(self) -> bool:
        assert self._process is not None
        if self._process.poll() is not None:
            pytest.fail(f"Orthanc exited; see {self.base / 'orthanc.log'}")
        try:
            return requests.get(self.url("/system"), timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    def load(self, files: list[Path]) -> None:
        for path in files:
            request = urllib.request.Request(self.url("/instances"), data=path.read_bytes(),
                                             headers={"Content-Type": "application/dicom"})
            with urllib.request.urlopen(request, timeout=30) as answer:
                assert answer.status == 200

    def __exit__(self, *exc: object) -> None:
        stop_process(self._process)


@pytest.fixture
def pacs_router(tmp_path: Path, web_router: Callable[..., Any]) -> Callable[..., Any]:
    """A router (web app running) with a folder destination for everything Orthanc sends."""

    def start(database_url: str, processes: int = 0) -> Any:
        settings = make_settings(tmp_path, database_url)
        server = web_router(replace(settings, dicom=replace(settings.dicom,
                                                            processes=processes)))
        commands, actor = server.router.commands, Actor("test")
        (tmp_path / "archive").mkdir()
        commands.put_destination({"name": "archive", "type": "file",
                                  "path": str(tmp_path / "archive")}, actor)
        commands.put_rule({"name": "from the PACS", "calling_aet": "ORTHANC",
                           "destinations": ["archive"]}, actor)
        server.router.users.add(*RADIOLOGIST[:1], "radiologist", RADIOLOGIST[1], actor)
        if processes:
            # Receiver processes re-read rules at most once a second (README, "Commands"): a
            # C-MOVE right after start could otherwise meet the rule-less snapshot they began
            # with, and its instances would be recorded as unrouted (seen in CI).
            time.sleep(1.1)
        return server

    return start


def dicom_port(router: Any) -> int:
    return int(router.receivers._settings.dicom_port if router.receivers else router.dicom.port)


@pytest.fixture
def loaded(tmp_path: Path) -> Iterator[list[Study]]:
    yield [
        write_study(tmp_path / "s1", patient_id="PACS1", patient_name="DOE^JANE",
                    charset="ISO_IR 192", study_date="20230301", modalities=("CT", "MR"),
                    description="Chest CT", accession="ACC100"),
        write_study(tmp_path / "s2", patient_id="PACS2", patient_name="Müller^Jürgen",
                    charset="ISO_IR 100", study_date="20230415", modalities=("MR",),
                    description="Knee MR"),
    ]


def wait_job(base: str, headers: dict[str, str], job_id: str) -> dict[str, Any]:
    def finished() -> dict[str, Any] | None:
        job = requests.get(f"{base}/api/v1/remote-retrieves/{job_id}", headers=headers,
                           timeout=30).json()
        return job if job["status"] != "running" else None

    return dict(wait_for(finished, 60, "the retrieve job to end"))


def archived(folder: Path) -> set[str]:
    if not folder.exists():
        return set()
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
            for p in folder.rglob("*") if p.is_file()}


def test_echo_find_move_and_get_from_orthanc(
        database_url: str, pacs_router: Callable[..., Any], loaded: list[Study],
        tmp_path: Path) -> None:
    processes = 2 if database_url.startswith("postgres") else 0
    server = pacs_router(database_url, processes)
    router = server.router
    with Orthanc(tmp_path / "orthanc", router.settings.ae_title, dicom_port(router)) as pacs:
        pacs.load([f for study in loaded for f in study.files])
        admin = bearer(server.url, "admin", ADMIN_PASSWORD)
        api = f"{server.url}/api/v1/remote-nodes"
        created = requests.post(api, json={"name": "pacs", "ae_title": "ORTHANC",
                                           "host": "127.0.0.1", "port": pacs.port,
                                           "services": ["find"]}, headers=admin, timeout=30)
        assert created.status_code == 201, created.text
        echo = requests.post(f"{api}/pacs/echo", headers=admin, timeout=30).json()
        assert echo["ok"] is True, echo

        found = requests.post(f"{api}/pacs/find", json={"patient_name": "doe*"}, headers=admin,
                              timeout=30).json()
        assert [r["StudyInstanceUID"] for r in found["results"]] == [loaded[0].uid]
        assert found["results"][0]["AccessionNumber"] == "ACC100"
        by_date = requests.post(f"{api}/pacs/find", json={
            "study_date_from": "2023-04-01", "study_date_to": "2023-04-30", "modality": "MR"},
            headers=admin, timeout=30).json()
        assert [r["PatientName"] for r in by_date["results"]] == ["Müller^Jürgen"]
        series = requests.post(f"{api}/pacs/find", json={
            "level": "SERIES", "study_instance_uid": loaded[0].uid}, headers=admin,
            timeout=30).json()
        assert sorted(r["Modality"] for r in series["results"]) == ["CT", "MR"]

        rad = bearer(server.url, *RADIOLOGIST)
        moved = requests.post(f"{api}/pacs/move", json={"study_instance_uid": loaded[0].uid},
                              headers=rad, timeout=30)
        assert moved.status_code == 202, moved.text
        job = wait_job(server.url, rad, moved.json()["id"])
        assert (job["status"], job["completed"], job["failed"]) == ("completed", 4, 0), job
        ct_series = next(r["SeriesInstanceUID"] for r in series["results"]
                         if r["Modality"] == "CT")
        got = requests.post(f"{api}/pacs/get", json={
            "study_instance_uid": loaded[1].uid}, headers=admin, timeout=30)
        job = wait_job(server.url, admin, got.json()["id"])
        assert (job["status"], job["completed"], job["user"]) == ("completed", 2, "admin"), job
        assert ct_series

        wanted = loaded[0].instance_uids() | loaded[1].instance_uids()
        wait_for(lambda: archived(tmp_path / "archive") == wanted, 30,
                 "the retrieved instances to be routed to the folder")
    receipts = receipts_by_actor(router)
    assert receipts == {"rad": 4, "admin": 2}
    actions = {r["action"] for r in accesses(router)}
    assert {"remote.find", "remote.move", "remote.get"} <= actions


def receipts_by_actor(router: Any) -> dict[str, int]:
    def rows() -> list[dict[str, Any]]:
        router.runner.wake()
        return router.view_db("audit").query(
            "SELECT actor, detail FROM audit WHERE action = 'Job.Received'")

    wait_for(lambda: len(rows()) == 6, 20, "six receipts in the audit view")
    counts: dict[str, int] = {}
    for row in rows():
        assert json.loads(row["detail"])["source"] == "retrieve"
        counts[row["actor"]] = counts.get(row["actor"], 0) + 1
    return counts


def accesses(router: Any) -> list[dict[str, Any]]:
    router.runner.wake()
    time.sleep(0.5)
    return router.view_db("audit").query("SELECT action, actor FROM audit")


def test_failed_retrieves_and_remote_node_permissions(
        pacs_router: Callable[..., Any], tmp_path: Path) -> None:
    server = pacs_router(f"sqlite:///{tmp_path / 'db'}")
    admin = bearer(server.url, "admin", ADMIN_PASSWORD)
    rad = bearer(server.url, *RADIOLOGIST)
    api = f"{server.url}/api/v1/remote-nodes"
    body = {"name": "gone", "ae_title": "NOBODY", "host": "127.0.0.1", "port": free_port()}
    assert requests.post(api, json=body, headers=rad, timeout=30).status_code == 403
    assert requests.post(api, json=body, headers=admin, timeout=30).status_code == 201
    assert requests.post(api, json=body, headers=admin, timeout=30).status_code == 409
    bad = requests.put(f"{api}/gone", json={**body, "port": 0, "ae_title": "A\\B"},
                       headers=admin, timeout=30)
    assert bad.status_code == 422 and set(bad.json()["error"]["fields"]) == {"port", "ae_title"}
    assert requests.get(api, headers=rad, timeout=30).json()["items"][0]["name"] == "gone"
    echo = requests.post(f"{api}/gone/echo", headers=rad, timeout=30).json()
    assert echo["ok"] is False and "NOBODY@127.0.0.1" in echo["detail"]
    find = requests.post(f"{api}/gone/find", json={}, headers=rad, timeout=30)
    assert find.status_code == 502
    moved = requests.post(f"{api}/gone/move", json={"study_instance_uid": "1.2.3"},
                          headers=rad, timeout=30)
    job = wait_job(server.url, rad, moved.json()["id"])
    assert job["status"] == "failed" and job["reason"]
    assert requests.post(f"{api}/gone/move", json={"study_instance_uid": "1.2.*"},
                         headers=rad, timeout=30).status_code == 422
    assert requests.delete(f"{api}/gone", headers=rad, timeout=30).status_code == 403
    assert requests.delete(f"{api}/gone", headers=admin, timeout=30).status_code == 204
    assert requests.get(f"{api}/gone", headers=admin, timeout=30).status_code == 404


def test_remote_pages_create_echo_query_and_retrieve(
        pacs_router: Callable[..., Any], loaded: list[Study], tmp_path: Path) -> None:
    server = pacs_router(f"sqlite:///{tmp_path / 'db'}")
    router = server.router
    with Orthanc(tmp_path / "orthanc", router.settings.ae_title, dicom_port(router)) as pacs:
        pacs.load(loaded[0].files)
        admin = Browser(server.url)
        admin.login("admin", ADMIN_PASSWORD)
        assert "No remote nodes" in admin.get(admin.url("/remote")).text
        bad = admin.post(admin.url("/remote/new"), data={
            "name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": "70000"})
        assert bad.status_code == 422 and "between 1 and 65535" in bad.text
        created = admin.post(admin.url("/remote/new"), data={
            "name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": str(pacs.port),
            "service_find": "on", "description": "<b>test PACS</b>"}, allow_redirects=False)
        assert created.status_code == 303
        page = admin.get(admin.url("/remote?done=created")).text
        assert "Remote node created." in page and "&lt;b&gt;test PACS&lt;/b&gt;" in page
        htmx = {"HX-Request": "true"}
        echo = admin.post(admin.url("/remote/pacs/echo"), headers=htmx)
        assert "C-ECHO ok" in echo.text

        rad = Browser(server.url)
        rad.login(*RADIOLOGIST)
        results = rad.get(rad.url("/remote/query"), headers=htmx, params={
            "node": "pacs", "patient_name": "DOE*", "study_date_from": "2023-01-01"})
        assert "DOE, JANE" in results.text and "ACC100" in results.text  # written for people
        series = rad.get(rad.url("/remote/query"), headers=htmx, params={
            "node": "pacs", "level": "SERIES", "study_instance_uid": loaded[0].uid})
        assert series.text.count('value="get"') == 2
        assert "Add a remote node" not in rad.get(rad.url("/remote")).text
        assert rad.get(rad.url("/remote/new"), allow_redirects=False).status_code == 403
        jobs = rad.post(rad.url("/remote/pacs/retrieve"), headers=htmx, data={
            "method": "get", "study_instance_uid": loaded[0].uid})
        assert jobs.status_code == 200 and loaded[0].uid in jobs.text
        job_id = router.remote_nodes.state.retrieves()[0].id
        wait_for(lambda: "completed" in rad.get(
            rad.url(f"/remote/retrieves/{job_id}/progress")).text, 30, "the job to complete")
        assert "4 received" in rad.get(rad.url(f"/remote/retrieves/{job_id}/progress")).text
        deleted = admin.post(admin.url("/remote/pacs/delete"), allow_redirects=False)
        assert deleted.status_code == 303 and router.remote_nodes.state.nodes() == {}
