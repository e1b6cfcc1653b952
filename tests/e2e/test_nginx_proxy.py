"""The shipped nginx site (deploy/nginx/dicom-router.conf) in front of ``dicom-router serve``.

Debian's nginx runs as a foreground process on loopback ports with everything (pid, logs,
temporary folders) below the test's folder, on a certificate the test makes. A client at
127.0.0.2 logs in over HTTPS, stores a study larger than the web app's in-memory body limit
by STOW-RS, finds it by QIDO-RS and reads it back by WADO-RS; the cookies are Secure, the
answers carry HSTS and no nginx version, and the audit trail names the client, not nginx
(which connects from 127.0.0.1), even when the client sends its own X-Forwarded-For.
"""

from __future__ import annotations

import contextlib
import grp
import hashlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from requests.adapters import HTTPAdapter

from tests.certs import Issued, TestCA
from tests.conftest import ADMIN_PASSWORD
from tests.e2e.conftest import RouterProcess, free_port, wait_for
from tests.synthetic import make_large_instance
from tests.web_harness import Browser

SITE = Path(__file__).resolve().parents[2] / "deploy" / "nginx" / "dicom-router.conf"
CLIENT_IP = "127.0.0.2"  # the browser; nginx reaches the router from 127.0.0.1
FORGED_IP = "203.0.113.66"
PATIENT_ID = "NGINX0001"
# Larger than the router's in-memory body limit (64 MiB), which is also the site's limit
# outside /dicom-web/: only the STOW-RS location's own limit lets it through.
STUDY_BYTES = 80 * 1024 * 1024
START_TIMEOUT = 15.0


def nginx_binary() -> str:
    """Debian's nginx (scripts/test installs it); missing is a failure, not a skip."""
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK)
                                      else None)
    assert found, "nginx not found: run scripts/test, which installs Debian's nginx"
    return found


def render_site(folder: Path, upstream_port: int, http_port: int, https_port: int,
                cert: Issued) -> str:
    """The shipped site with its deployment values replaced by this test's: loopback ports,
    the test certificate and a log folder of the test. Every value must still be there."""
    text = SITE.read_text()
    replacements = {
        "server 127.0.0.1:8080;": f"server 127.0.0.1:{upstream_port};",
        "listen 80;": f"listen 127.0.0.1:{http_port};",
        "listen [::]:80;": "",
        "listen 443 ssl http2;": f"listen 127.0.0.1:{https_port} ssl http2;",
        "listen [::]:443 ssl http2;": "",
        "/etc/dicom-router/tls/web-fullchain.pem": str(cert.certificate),
        "/etc/dicom-router/tls/web.key": str(cert.private_key),
        "/var/log/nginx/": f"{folder / 'logs'}/",
    }
    for old, new in replacements.items():
        assert old in text, f"{old!r} is no longer in {SITE}: update render_site"
        text = text.replace(old, new)
    return text


def main_config(folder: Path) -> str:
    """What Debian's /etc/nginx/nginx.conf does, with every path below ``folder``."""
    user = ""
    if os.geteuid() == 0:  # as root nginx would run its workers as nobody, who cannot enter tmp
        user = (f"user {pwd.getpwuid(os.geteuid()).pw_name} "
                f"{grp.getgrgid(os.getegid()).gr_name};\n")
    temp = folder / "temp"
    return (f"{user}worker_processes 1;\npid {folder / 'nginx.pid'};\n"
            f"error_log {folder / 'logs' / 'error.log'} info;\n"
            "events { worker_connections 128; }\n"
            "http {\n"
            "    default_type application/octet-stream;\n"
            f"    access_log {folder / 'logs' / 'access.log'};\n"
            f"    client_body_temp_path {temp / 'body'};\n"
            f"    proxy_temp_path {temp / 'proxy'};\n"
            f"    fastcgi_temp_path {temp / 'fastcgi'};\n"
            f"    uwsgi_temp_path {temp / 'uwsgi'};\n"
            f"    scgi_temp_path {temp / 'scgi'};\n"
            f"    include {folder / 'dicom-router.conf'};\n"
            "}\n")


@dataclass
class Nginx:
    folder: Path
    process: subprocess.Popen[bytes]
    http_port: int
    https_port: int

    @property
    def base(self) -> str:
        return f"https://127.0.0.1:{self.https_port}"

    def log(self, name: str) -> str:
        path = self.folder / "logs" / name
        return path.read_text(errors="replace") if path.exists() else ""


@contextlib.contextmanager
def run_nginx(folder: Path, upstream_port: int, cert: Issued) -> Iterator[Nginx]:
    """nginx in the foreground on two free loopback ports; stopped (then killed) at exit."""
    binary = nginx_binary()
    (folder / "logs").mkdir(parents=True)
    (folder / "temp").mkdir()
    http_port, https_port = free_port(), free_port()
    (folder / "dicom-router.conf").write_text(
        render_site(folder, upstream_port, http_port, https_port, cert))
    config = folder / "nginx.conf"
    config.write_text(main_config(folder))
    # -e: errors before the configuration is read go here too, never to /var/log/nginx.
    command = [binary, "-p", f"{folder}/", "-c", str(config), "-e",
               str(folder / "logs" / "error.log")]
    checked = subprocess.run([*command, "-t"], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, f"nginx -t refused the site:\n{checked.stderr}"
    with (folder / "logs" / "stderr.log").open("ab") as stderr:
        process = subprocess.Popen([*command, "-g", "daemon off;"], stdout=stderr,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    nginx = Nginx(folder, process, http_port, https_port)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not _accepts(https_port):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"nginx did not start (exit {process.poll()}):\n"
                            f"{nginx.log('error.log')[-3000:]}")
            time.sleep(0.05)
        yield nginx
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)  # fast shutdown of master and worker
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def _accepts(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
        return True
    return False


class FromAddress(HTTPAdapter):
    """Connections from a chosen local address (a second client on loopback)."""

    def __init__(self, address: str) -> None:
        self.address = address
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["source_address"] = (self.address, 0)
        super().init_poolmanager(*args, **kwargs)


def stow_body(path: Path, boundary: str) -> bytes:
    return (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode())


@pytest.fixture
def behind_nginx(serve_router: Any, tmp_path: Path,
                 monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[RouterProcess, Nginx, Path]]:
    """The router on loopback, trusting 127.0.0.1 (nginx) only, and nginx in front of it.
    secure_cookies stays false: Secure cookies must come from X-Forwarded-Proto."""
    monkeypatch.setenv("DICOM_ROUTER_ADMIN_PASSWORD", ADMIN_PASSWORD)
    router = serve_router()
    config = router.write_config()
    with config.open("a") as f:
        f.write('\n[web]\ntrusted_proxies = ["127.0.0.1/32"]\n')
    router.start()
    ca = TestCA(tmp_path / "ca")
    cert = ca.issue("web", "router.test", hosts=("127.0.0.1",))
    with run_nginx(tmp_path / "nginx", router.http_port, cert) as nginx:
        yield router, nginx, ca.bundle


@pytest.mark.slow
def test_through_nginx_over_tls_the_router_sees_the_real_client(
        behind_nginx: tuple[RouterProcess, Nginx, Path], tmp_path: Path) -> None:
    router, nginx, ca_bundle = behind_nginx
    # Plain HTTP only redirects.
    plain = requests.get(f"http://127.0.0.1:{nginx.http_port}/login", allow_redirects=False,
                         timeout=30)
    assert plain.status_code == 301
    assert plain.headers["Location"].startswith("https://")

    browser = Browser(nginx.base)
    browser.trust_env = False  # REQUESTS_CA_BUNDLE would replace the test CA
    browser.verify = str(ca_bundle)
    browser.mount("https://", FromAddress(CLIENT_IP))
    form = browser.get(browser.url("/login"), timeout=30)
    assert form.status_code == 200
    assert form.headers["Strict-Transport-Security"] == "max-age=63072000"
    assert form.headers["Server"] == "nginx"  # no version
    assert "Secure" in form.headers["Set-Cookie"]  # the login form's CSRF cookie
    assert browser.login("admin", ADMIN_PASSWORD).status_code == 200
    cookies = {c.name: c for c in browser.cookies}
    assert "dr_session" in cookies, f"not logged in: {sorted(cookies)}"
    assert all(c.secure for c in cookies.values()), f"not Secure: {sorted(cookies)}"

    # STOW-RS, one request larger than 64 MiB, with the session cookie (and its CSRF token).
    instance = make_large_instance(tmp_path / "large.dcm", STUDY_BYTES, patient_id=PATIENT_ID)
    header = pydicom.dcmread(instance, stop_before_pixels=True)
    boundary = "nginx-test-boundary"
    stored = browser.post(
        browser.url("/dicom-web/studies"), data=stow_body(instance, boundary), timeout=120,
        headers={"Content-Type": f'multipart/related; type="application/dicom"; '
                                 f'boundary={boundary}',
                 "Accept": "application/dicom+json"})
    assert stored.status_code == 200, stored.text[:500]
    wait_for(lambda: router.view("studies", "SELECT 1 FROM studies WHERE study_instance_uid = ?",
                                 [str(header.StudyInstanceUID)]), 30, "the study in the view")

    client = DICOMwebClient(url=nginx.base + "/dicom-web", session=browser, timeout=120)
    found = client.search_for_studies(search_filters={"PatientID": PATIENT_ID})
    assert [s["0020000D"]["Value"][0] for s in found] == [str(header.StudyInstanceUID)]
    # A client's own X-Forwarded-For is replaced by nginx, so it cannot pose as another address.
    forged = browser.get(browser.url(f"/dicom-web/studies?PatientID={PATIENT_ID}"),
                         headers={"X-Forwarded-For": FORGED_IP}, timeout=30)
    assert forged.status_code == 200

    # WADO-RS: the instance streamed back through nginx, pixel data intact.
    retrieved = client.retrieve_instance(str(header.StudyInstanceUID),
                                         str(header.SeriesInstanceUID),
                                         str(header.SOPInstanceUID))
    original = pydicom.dcmread(instance)
    assert retrieved.SOPInstanceUID == header.SOPInstanceUID
    assert (hashlib.sha256(retrieved.PixelData).digest()
            == hashlib.sha256(original.PixelData).digest())

    # The audit trail: the login and each DICOMweb request, all from the client's address.
    def client_rows() -> list[dict[str, Any]]:
        return router.view("audit", "SELECT source_ip, action FROM audit WHERE actor = 'admin'")

    expected = {"Session.Started", "study.store", "dicomweb.search", "dicomweb.retrieve"}
    wait_for(lambda: expected <= {r["action"] for r in client_rows()}, 30,
             f"audit rows for {sorted(expected)}")
    rows = client_rows()
    assert sum(r["action"] == "dicomweb.search" for r in rows) == 2, rows
    assert {r["source_ip"] for r in rows} == {CLIENT_IP}, rows

    # The access log names the client but no patient, study or query.
    access = nginx.log("dicom-router.access.log")
    assert f"{CLIENT_IP} " in access and '"POST dicom-web" 200' in access
    for secret in (PATIENT_ID, str(header.StudyInstanceUID), FORGED_IP):
        assert secret not in access
