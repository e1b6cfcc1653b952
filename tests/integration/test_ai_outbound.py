"""AI plumbing without a router: SSRF refusals (link-local and metadata addresses, IPv4-mapped
forms, DNS answers checked and then connected to, allow-list), no redirects, signatures with a
replay window, scoped tokens, and de-identification that re-identifies results.
"""

from __future__ import annotations

import http.server
import io
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file

from router.ai.deid import deidentify, pseudonyms, reidentify
from router.ai.signing import (
    SignatureError,
    StaleTimestampError,
    check_signature,
    check_timestamp,
    signature,
    signer,
)
from router.ai.tokens import AITokenError, AITokens
from router.dispatch.ai import AIAdapter, AIDestinationConfig
from router.dispatch.base import PermanentDeliveryError
from router.dispatch.ssrf import AddressPolicy, AddressRefusedError, parse_networks, post

LOOPBACK = AddressPolicy(allow_loopback=True)  # the stubs below listen on 127.0.0.1


@pytest.mark.parametrize("address", [
    "169.254.169.254", "169.254.0.1", "fd00:ec2::254", "::ffff:169.254.169.254", "fe80::1",
    "100.100.100.200", "0.0.0.0", "224.0.0.1"])
def test_link_local_and_metadata_addresses_are_refused(address: str) -> None:
    for policy in (AddressPolicy(), LOOPBACK):
        with pytest.raises(AddressRefusedError):
            policy.check(address, 80)


@pytest.mark.parametrize("address", ["10.1.2.3", "192.168.1.10", "fd12::1"])
def test_ordinary_addresses_are_allowed(address: str) -> None:
    AddressPolicy().check(address, 80)


def test_an_administrator_can_allow_a_refused_network() -> None:
    policy = AddressPolicy(allowed=parse_networks(["169.254.10.0/24"]))
    policy.check("169.254.10.20", 80)
    with pytest.raises(AddressRefusedError):
        policy.check("169.254.169.254", 80)


class _Handler(http.server.BaseHTTPRequestHandler):
    status = 200
    seen: list[str] = []

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self.seen.append(self.headers.get("Host", ""))
        self.send_response(self.status)
        if self.status == 302:
            self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[http.server.HTTPServer]:
    _Handler.seen = []
    _Handler.status = 200
    server = http.server.HTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


def _resolving(monkeypatch: pytest.MonkeyPatch, answers: dict[str, str]) -> None:
    real = socket.getaddrinfo

    def fake(host: str, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host in answers:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answers[host], port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)


def test_a_name_resolving_to_metadata_is_refused_before_connecting(
        monkeypatch: pytest.MonkeyPatch) -> None:
    _resolving(monkeypatch, {"ai.rebound.test": "169.254.169.254"})
    with pytest.raises(AddressRefusedError):
        post("http://ai.rebound.test/v1", b"{}", {}, timeout=2, policy=LOOPBACK)


def test_the_connection_goes_to_the_checked_address_with_the_host_name(
        monkeypatch: pytest.MonkeyPatch, http_server: http.server.HTTPServer) -> None:
    port = http_server.server_address[1]
    _resolving(monkeypatch, {"ai.vendor.test": "127.0.0.1"})
    answer = post(f"http://ai.vendor.test:{port}/v1", b"{}", {}, timeout=5, policy=LOOPBACK)
    assert answer.status == 200 and _Handler.seen == [f"ai.vendor.test:{port}"]


def test_redirects_are_not_followed(http_server: http.server.HTTPServer) -> None:
    _Handler.status = 302
    config = AIDestinationConfig(name="ai", url=f"http://127.0.0.1:{http_server.server_address[1]}/",
                                 secret="s" * 20)
    with pytest.raises(PermanentDeliveryError, match="redirects are not followed"):
        AIAdapter(config, policy=LOOPBACK).check()
    assert len(_Handler.seen) == 1


def test_a_metadata_url_is_refused_by_the_ping() -> None:
    config = AIDestinationConfig(name="ai", url="http://169.254.169.254/latest",
                                 secret="s" * 20)
    with pytest.raises(PermanentDeliveryError, match="refusing to connect"):
        AIAdapter(config, policy=LOOPBACK).check()


def test_signatures_cover_timestamp_and_body() -> None:
    mac = signer("secret")
    mac.update(b"1700000000.")
    mac.update(b'{"a": 1}')
    presented = signature("secret", 1700000000, b'{"a": 1}')
    check_signature(presented, mac.copy())
    for wrong in (signature("other", 1700000000, b'{"a": 1}'),
                  signature("secret", 1700000001, b'{"a": 1}'), "sha256=zz", None):
        with pytest.raises(SignatureError):
            check_signature(wrong, mac.copy())


def test_timestamps_outside_five_minutes_are_stale() -> None:
    assert check_timestamp("1000", 1000 + 299) == 1000
    for value, now in (("1000", 1000 + 301), ("1000", 1000 - 301), ("", 0), ("12a", 0),
                       (None, 0)):
        with pytest.raises(StaleTimestampError):
            check_timestamp(value, now)


def test_tokens_name_one_study_and_cannot_be_forged() -> None:
    tokens = AITokens(b"k" * 32)
    token = tokens.issue("lungai", "rid", "1.2.3", lifetime=60)
    grant = tokens.check(token)
    assert (grant.destination, grant.request_id, grant.study_instance_uid) == (
        "lungai", "rid", "1.2.3")
    with pytest.raises(AITokenError):
        AITokens(b"x" * 32).check(token)
    with pytest.raises(AITokenError):
        tokens.check(tokens.issue("lungai", "rid", "1.2.3", lifetime=60, now=0))  # expired


def test_deidentified_results_are_reidentified(tmp_path: Path) -> None:
    source = Path(get_testdata_file("CT_small.dcm", download=False))
    original = pydicom.dcmread(source)
    mapping: dict[str, str] = {}
    seen = pydicom.dcmread(io.BytesIO(deidentify(source, "seed", mapping)))
    assert str(seen.PatientName) != str(original.PatientName)
    assert seen.StudyInstanceUID != original.StudyInstanceUID
    assert pseudonyms("seed", [original.StudyInstanceUID]) == {
        original.StudyInstanceUID: seen.StudyInstanceUID}
    result = tmp_path / "result.dcm"
    seen.save_as(result, enforce_file_format=True)
    assert reidentify(result, mapping) > 0
    back = pydicom.dcmread(result)
    assert (back.StudyInstanceUID, back.PatientID, str(back.PatientName)) == (
        original.StudyInstanceUID, original.PatientID, str(original.PatientName))
