"""DICOM TLS as a service user: a DICOM destination and a remote node with ``tls = true``.
One router delivers to another over mutual TLS; Orthanc (its Debian build has DICOM TLS)
is a TLS destination and a TLS remote node for C-ECHO, C-FIND, C-MOVE (its sub-operations
come back to our TLS port) and C-GET; a certificate for another name fails the delivery with
that reason; unusable TLS files are refused when the destination is saved."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import requests

from router.application.commands import Actor
from router.service import Router
from tests.certs import Issued, TestCA
from tests.conftest import ADMIN_PASSWORD, make_settings, wait_for
from tests.integration.test_qr_orthanc import (
    RADIOLOGIST,
    Orthanc,
    archived,
    wait_job,
)
from tests.integration.test_qr_scp import Study, write_study
from tests.synthetic import make_ct_series
from tests.web_harness import bearer

ACTOR = Actor("test")


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("pki"))


def _server(ca: TestCA, stem: str, hosts: tuple[str, ...] = ("127.0.0.1",)) -> Issued:
    return ca.issue(stem, stem.upper(), hosts=hosts)


def _listener(ca: TestCA, server: Issued) -> dict[str, Any]:
    """[dicom] keys of a mutual-TLS listener on a free port."""
    return {"tls_port": 0, "tls_certificate": server.certificate,
            "tls_private_key": server.private_key, "tls_ca_certificates": ca.bundle,
            "tls_verify_clients": True}


def _tls_router(tmp_path: Path, start: Callable[..., Any], ca: TestCA, server: Issued,
                name: str) -> Any:
    settings = make_settings(tmp_path / name, f"sqlite:///{tmp_path / name / 'db'}")
    return start(replace(settings, dicom=replace(settings.dicom, **_listener(ca, server))))


def _tls_fields(ca: TestCA, client: Issued, **more: Any) -> dict[str, Any]:
    return {"tls": True, "tls_ca_certificates": str(ca.bundle),
            "tls_certificate": str(client.certificate),
            "tls_private_key": str(client.private_key), **more}


def _deliveries(router: Router) -> list[dict[str, Any]]:
    router.runner.wake()
    return router.view_db("jobs").query("SELECT status, last_error FROM deliveries")


def test_one_router_delivers_to_another_over_mutual_tls(
    tmp_path: Path, start_router: Callable[..., Router], ca: TestCA,
) -> None:
    receiving = _tls_router(tmp_path, start_router, ca, _server(ca, "site-b"), "b")
    sending = start_router(make_settings(tmp_path / "a", f"sqlite:///{tmp_path / 'a' / 'db'}"))
    client = ca.issue("site-a-client", "SITE_A", client=True)
    sending.commands.put_destination({
        "name": "site-b", "type": "dicom", "host": "127.0.0.1",
        "port": receiving.dicom.tls_port, "ae_title": "DICOMROUTER",
        **_tls_fields(ca, client)}, ACTOR)
    sending.commands.put_rule({"name": "all", "destinations": ["site-b"]}, ACTOR)
    paths = make_ct_series(tmp_path / "ct", count=3, rows=32, cols=32)
    for path in paths:
        sending.receiver.receive(_arrival(path))
    wait_for(lambda: [d["status"] for d in _deliveries(sending)] == ["delivered"] * 3, 30,
             "three deliveries over TLS")
    jobs = wait_for(lambda: receiving.view_db("jobs").query("SELECT job_id FROM jobs"), 10,
                    "receipts at the TLS end")
    job = receiving.stores.ingest.repository.get(uuid.UUID(jobs[0]["job_id"]))
    assert job.tls_subject == "O=Router Tests,CN=SITE_A"


def test_a_certificate_for_another_name_fails_the_delivery_and_says_why(
    tmp_path: Path, start_router: Callable[..., Router], ca: TestCA,
) -> None:
    receiving = _tls_router(tmp_path, start_router, ca,
                            _server(ca, "elsewhere", hosts=("pacs.elsewhere.test",)), "b")
    sending = start_router(make_settings(tmp_path / "a", f"sqlite:///{tmp_path / 'a' / 'db'}"))
    client = ca.issue("site-a-client", "SITE_A", client=True)
    sending.commands.put_destination({
        "name": "site-b", "type": "dicom", "host": "127.0.0.1",
        "port": receiving.dicom.tls_port, "ae_title": "DICOMROUTER",
        **_tls_fields(ca, client)}, ACTOR)
    sending.commands.put_rule({"name": "all", "destinations": ["site-b"]}, ACTOR)
    (path,) = make_ct_series(tmp_path / "ct", count=1, rows=16, cols=16)
    sending.receiver.receive(_arrival(path))
    failed = wait_for(lambda: [d for d in _deliveries(sending) if d["last_error"]], 30,
                      "the failed attempt")
    assert "IP address mismatch" in failed[0]["last_error"], failed
    assert "TLS" in failed[0]["last_error"]


def test_unusable_tls_files_are_refused_when_saved(
    tmp_path: Path, start_router: Callable[..., Router], ca: TestCA,
) -> None:
    router = start_router(make_settings(tmp_path, f"sqlite:///{tmp_path / 'db'}"))
    from router.dispatch.registry import DestinationConfigError

    with pytest.raises(DestinationConfigError, match=r"tls_ca_certificates.*no such file"):
        router.commands.put_destination({
            "name": "x", "type": "dicom", "host": "127.0.0.1", "port": 2762,
            "ae_title": "PACS", "tls": True,
            "tls_ca_certificates": str(tmp_path / "missing.pem")}, ACTOR)
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    with pytest.raises(DestinationConfigError, match="tls_certificate"):
        router.commands.put_destination({
            "name": "x", "type": "dicom", "host": "127.0.0.1", "port": 2762,
            "ae_title": "PACS", "tls": True, "tls_certificate": str(not_pem),
            "tls_private_key": str(not_pem)}, ACTOR)


def _arrival(path: Path) -> Any:
    from pydicom import dcmread

    from router.application.receive import Arrival

    ds = dcmread(path, stop_before_pixels=True)
    return Arrival(path=_copy(path), sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
                   size=path.stat().st_size,
                   source="dimse", actor="CT_1", source_ip="127.0.0.1", calling_aet="CT_1",
                   called_aet="DICOMROUTER", sop_class_uid=str(ds.SOPClassUID),
                   sop_instance_uid=str(ds.SOPInstanceUID),
                   transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID))


def _copy(path: Path) -> Path:
    target = path.with_suffix(".spooled")
    target.write_bytes(path.read_bytes())
    return target


@pytest.fixture
def orthanc_tls(tmp_path: Path, ca: TestCA) -> dict[str, Any]:
    server = ca.issue("orthanc", "ORTHANC", hosts=("127.0.0.1",), both=True)
    return {"DicomTlsEnabled": True, "DicomTlsCertificate": str(server.certificate),
            "DicomTlsPrivateKey": str(server.private_key),
            "DicomTlsTrustedCertificates": str(ca.bundle),
            "DicomTlsRemoteCertificateRequired": True}


def test_orthanc_as_a_tls_destination_and_a_tls_remote_node(
    tmp_path: Path, web_router: Callable[..., Any], ca: TestCA, orthanc_tls: dict[str, Any],
) -> None:
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'db'}")
    router_cert = _server(ca, "router")
    server = web_router(replace(settings, dicom=replace(settings.dicom,
                                                        **_listener(ca, router_cert))))
    router = server.router
    client = ca.issue("router-client", "DICOMROUTER", client=True)
    (tmp_path / "archive").mkdir()
    router.commands.put_destination({"name": "archive", "type": "file",
                                     "path": str(tmp_path / "archive")}, ACTOR)
    router.commands.put_rule({"name": "from the PACS", "calling_aet": "ORTHANC",
                              "destinations": ["archive"]}, ACTOR)
    router.users.add(*RADIOLOGIST[:1], "radiologist", RADIOLOGIST[1], ACTOR)
    modality = {"AET": "DICOMROUTER", "Host": "127.0.0.1", "Port": router.dicom.tls_port,
                "UseDicomTls": True}
    study: Study = write_study(tmp_path / "s1", patient_id="TLS1", patient_name="TLS^PAT",
                               charset="ISO_IR 100", study_date="20240101", accession="ACC1")
    extra = {**orthanc_tls, "DicomModalities": {"router": modality}}
    with Orthanc(tmp_path / "orthanc", "DICOMROUTER", router.dicom.tls_port, extra) as pacs:
        # C-STORE over TLS, through a destination.
        router.commands.put_destination({
            "name": "pacs", "type": "dicom", "host": "127.0.0.1", "port": pacs.port,
            "ae_title": "ORTHANC", **_tls_fields(ca, client)}, ACTOR)
        router.commands.put_rule({"name": "to the PACS", "calling_aet": "CT_1",
                                  "destinations": ["pacs"]}, ACTOR)
        (sent,) = make_ct_series(tmp_path / "ct", count=1, rows=16, cols=16)
        router.receiver.receive(_arrival(sent))
        wait_for(lambda: requests.get(pacs.url("/statistics"), timeout=5).json()[
            "CountInstances"] == 1, 30, "the instance in Orthanc, over TLS")
        pacs.load(study.files)

        # C-ECHO, C-FIND, C-MOVE and C-GET over TLS, as a remote node.
        admin = bearer(server.url, "admin", ADMIN_PASSWORD)
        api = f"{server.url}/api/v1/remote-nodes"
        created = requests.post(api, json={"name": "pacs", "ae_title": "ORTHANC",
                                           "host": "127.0.0.1", "port": pacs.port,
                                           **_tls_fields(ca, client)},
                                headers=admin, timeout=30)
        assert created.status_code == 201, created.text
        echo = requests.post(f"{api}/pacs/echo", headers=admin, timeout=30).json()
        assert echo["ok"] is True, echo
        found = requests.post(f"{api}/pacs/find", json={"patient_id": "TLS1"}, headers=admin,
                              timeout=30).json()
        assert [r["StudyInstanceUID"] for r in found["results"]] == [study.uid]
        rad = bearer(server.url, *RADIOLOGIST)
        moved = requests.post(f"{api}/pacs/move", json={"study_instance_uid": study.uid},
                              headers=rad, timeout=30)
        job = wait_job(server.url, rad, moved.json()["id"])
        assert (job["status"], job["completed"]) == ("completed", 2), job
        got = requests.post(f"{api}/pacs/get", json={"study_instance_uid": study.uid},
                            headers=admin, timeout=30)
        job = wait_job(server.url, admin, got.json()["id"])
        assert (job["status"], job["completed"]) == ("completed", 2), job
        wait_for(lambda: archived(tmp_path / "archive") == study.instance_uids(), 30,
                 "the retrieved instances in the folder")
