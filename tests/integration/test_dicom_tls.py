"""DICOM TLS as a service provider (PS3.15 B.9): DCMTK's `echoscu`/`storescu +tls` and
pynetdicom as TLS clients, mutual TLS with the client's certificate subject in the receipt,
and every bad certificate refused with a clear reason on both sides. Certificates are made by
the test (tests/certs.py)."""

from __future__ import annotations

import logging
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from router.dicom.protocol_log import PROTOCOL_LOG
from router.dicom.tls import client_context
from router.service import Router
from tests.certs import Issued, TestCA, self_signed
from tests.conftest import make_settings, wait_for
from tests.synthetic import make_ct_series

ROUTER_AET = "DICOMROUTER"


@dataclass(frozen=True)
class Pki:
    ca: TestCA
    server: Issued
    client: Issued
    expired_client: Issued
    stranger: Issued  # issued by another CA
    self_signed_server: Issued
    wrong_host_server: Issued


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca = TestCA(folder)
    other = TestCA(folder / "other", name="Another CA")
    return Pki(
        ca=ca,
        server=ca.issue("server", "router.test", hosts=("127.0.0.1", "localhost")),
        client=ca.issue("client", "CT_SCANNER_1", client=True),
        expired_client=ca.issue("expired", "OLD_SCANNER", client=True, expired=True),
        stranger=other.issue("stranger", "STRANGER", client=True),
        self_signed_server=self_signed(folder, "selfsigned", "router.test", ("127.0.0.1",)),
        wrong_host_server=ca.issue("wronghost", "elsewhere", hosts=("pacs.elsewhere.test",)),
    )


def _tls_settings(tmp_path: Path, pki: Pki, server: Issued | None = None,
                  **dicom: Any) -> Any:
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'db'}")
    server = server or pki.server
    dicom = {"tls_port": 0, "tls_certificate": server.certificate,
             "tls_private_key": server.private_key, "tls_ca_certificates": pki.ca.bundle,
             "tls_verify_clients": True, "tls_handshake_timeout": 1.0, **dicom}
    return replace(settings, dicom=replace(settings.dicom, **dicom))


@pytest.fixture
def router(tmp_path: Path, pki: Pki, start_router: Callable[..., Router]) -> Router:
    return start_router(_tls_settings(tmp_path, pki))


def _dcmtk(tool: str, pki: Pki, port: int, *args: str, key: Issued | None = None,
           trust: Path | None = None) -> subprocess.CompletedProcess[str]:
    key = key or pki.client
    command = [tool, "+tls", str(key.private_key), str(key.certificate), "-pw",
               "+cf", str(trust or pki.ca.bundle), "-aec", ROUTER_AET, "127.0.0.1", str(port),
               *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60,
                          env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"})


def test_dcmtk_echo_and_store_over_mutual_tls_record_the_client_subject(
    router: Router, pki: Pki, tmp_path: Path, dcmtk: None,
) -> None:
    echo = _dcmtk("echoscu", pki, router.dicom.tls_port)
    assert echo.returncode == 0, echo.stderr
    paths = make_ct_series(tmp_path / "ct", count=3, rows=32, cols=32)
    store = _dcmtk("storescu", pki, router.dicom.tls_port, *map(str, paths))
    assert store.returncode == 0, store.stderr
    jobs = wait_for(lambda: router.view_db("jobs").query("SELECT job_id FROM jobs"), 10,
                    "three receipts")
    wait_for(lambda: len(router.view_db("jobs").query("SELECT job_id FROM jobs")) == 3, 10,
             "three receipts")
    job = router.stores.ingest.repository.get(__import__("uuid").UUID(jobs[0]["job_id"]))
    assert job.tls_subject == "O=Router Tests,CN=CT_SCANNER_1"


def test_pynetdicom_as_a_tls_client(router: Router, pki: Pki, tmp_path: Path) -> None:
    (path,) = make_ct_series(tmp_path / "ct", count=1, rows=16, cols=16)
    dataset = dcmread(path)
    context = client_context(pki.ca.bundle, pki.client.certificate, pki.client.private_key)
    ae = AE(ae_title="PYTLS")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, str(dataset.file_meta.TransferSyntaxUID))
    assoc = ae.associate("127.0.0.1", router.dicom.tls_port, ae_title=ROUTER_AET,
                         tls_args=(context, "127.0.0.1"))
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assert assoc.send_c_store(dataset).Status == 0
    assoc.release()


def _refusal(router: Router, caplog: pytest.LogCaptureFixture) -> str:
    """The router's log line about a refused handshake."""
    def line() -> str:
        return next((r.getMessage() for r in caplog.records
                     if "TLS" in r.getMessage() or "certificate" in r.getMessage()), "")
    return str(wait_for(line, 5, "the router to log the refused handshake"))


@pytest.fixture
def tls_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.WARNING, logger="router.dicom")
    PROTOCOL_LOG.forget()
    return caplog


def test_a_client_without_a_certificate_is_refused(
    router: Router, pki: Pki, tls_log: pytest.LogCaptureFixture, dcmtk: None,
) -> None:
    echo = subprocess.run(["echoscu", "+tla", "+cf", str(pki.ca.bundle), "-aec", ROUTER_AET,
                           "127.0.0.1", str(router.dicom.tls_port)],
                          capture_output=True, text=True, timeout=30)
    assert echo.returncode != 0
    assert "no client certificate" in _refusal(router, tls_log)


def test_an_expired_client_certificate_is_refused(
    router: Router, pki: Pki, tls_log: pytest.LogCaptureFixture, dcmtk: None,
) -> None:
    echo = _dcmtk("echoscu", pki, router.dicom.tls_port, key=pki.expired_client)
    assert echo.returncode != 0
    assert "certificate has expired" in _refusal(router, tls_log)


def test_a_client_certificate_from_another_ca_is_refused(
    router: Router, pki: Pki, tls_log: pytest.LogCaptureFixture, dcmtk: None,
) -> None:
    echo = _dcmtk("echoscu", pki, router.dicom.tls_port, key=pki.stranger)
    assert echo.returncode != 0
    assert "unable to get local issuer certificate" in _refusal(router, tls_log)


def test_a_client_refuses_our_self_signed_certificate_and_we_say_so(
    tmp_path: Path, pki: Pki, start_router: Callable[..., Router],
    tls_log: pytest.LogCaptureFixture, dcmtk: None,
) -> None:
    router = start_router(_tls_settings(tmp_path, pki, server=pki.self_signed_server))
    echo = _dcmtk("echoscu", pki, router.dicom.tls_port)
    assert echo.returncode != 0
    assert "certificate verify failed" in (echo.stdout + echo.stderr).lower() or \
        "self-signed" in (echo.stdout + echo.stderr).lower(), echo.stderr
    assert "refused our certificate" in _refusal(router, tls_log)


def test_a_certificate_for_another_host_fails_the_clients_check(
    tmp_path: Path, pki: Pki, start_router: Callable[..., Router],
) -> None:
    router = start_router(_tls_settings(tmp_path, pki, server=pki.wrong_host_server))
    context = client_context(pki.ca.bundle, pki.client.certificate, pki.client.private_key)
    with (socket.create_connection(("127.0.0.1", router.dicom.tls_port), timeout=5) as raw,
          pytest.raises(ssl.SSLCertVerificationError, match="IP address mismatch")):
        context.wrap_socket(raw, server_hostname="127.0.0.1")


def test_slow_handshakes_do_not_hold_the_door(router: Router, pki: Pki) -> None:
    """Connections to the TLS port that never say hello are closed after the handshake
    timeout, and a real TLS client is served meanwhile."""
    silent = [socket.create_connection(("127.0.0.1", router.dicom.tls_port), timeout=5,
                                       source_address=("127.0.0.3", 0)) for _ in range(6)]
    try:
        context = client_context(pki.ca.bundle, pki.client.certificate, pki.client.private_key)
        ae = AE(ae_title="PYTLS")
        ae.add_requested_context(Verification)
        started = time.monotonic()
        assoc = ae.associate("127.0.0.1", router.dicom.tls_port, ae_title=ROUTER_AET,
                             tls_args=(context, "127.0.0.1"), bind_address=("127.0.0.2", 0))
        assert assoc.is_established and assoc.send_c_echo().Status == 0
        assoc.release()
        assert time.monotonic() - started < 1.0
        for sock in silent:
            sock.settimeout(3)
            assert sock.recv(1) == b"", "closed after the handshake timeout"
    finally:
        for sock in silent:
            sock.close()


def test_tls_only(tmp_path: Path, pki: Pki, start_router: Callable[..., Router],
                  dcmtk: None) -> None:
    router = start_router(_tls_settings(tmp_path, pki, plain_listener=False))
    assert router.dicom.port == 0
    assert _dcmtk("echoscu", pki, router.dicom.tls_port).returncode == 0
