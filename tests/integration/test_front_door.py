"""The DICOM front door (router/dicom/gate.py) against hostile and careless peers on real
sockets: scans, silent connections, garbage, too many associations from one address, the
association policy, PROXY v2 from a trusted balancer, idle associations. Hostile hosts are
played from 127.0.0.3, the well-behaved sender from 127.0.0.2; every loop is bounded."""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from router.dicom import pdus, proxy_protocol
from router.dicom.protocol_log import PROTOCOL_LOG
from router.service import Router
from tests.conftest import make_settings, wait_for
from tests.synthetic import make_ct_series

ROUTER_AET = "DICOMROUTER"
GOOD, BAD, BALANCER = "127.0.0.2", "127.0.0.3", "127.0.0.4"
CT = CTImageStorage
EXPLICIT = "1.2.840.10008.1.2.1"


def _settings(tmp_path: Path, **dicom: Any) -> Any:
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'db'}")
    base = dict(artim_timeout=1.0, max_connections_per_ip=8, max_associations_per_ip=2,
                max_pending_connections=64, max_associations=6)
    base.update(dicom)
    return replace(settings, dicom=replace(settings.dicom, **base))


@pytest.fixture
def router(tmp_path: Path, start_router: Callable[..., Router]) -> Router:
    return start_router(_settings(tmp_path))


def _echo_seconds(port: int, source: str = GOOD, ae_title: str = ROUTER_AET) -> float:
    """Time for a whole association with one C-ECHO from ``source``; fails if refused."""
    ae = AE(ae_title="GOODSCU")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 5
    started = time.monotonic()
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title, bind_address=(source, 0))
    assert assoc.is_established, "the well-behaved sender was refused"
    assert assoc.send_c_echo().Status == 0
    assoc.release()
    return time.monotonic() - started


def _connect(port: int, source: str = BAD) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5,
                                    source_address=(source, 0))


def _answer(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Everything the router sends until it closes the connection."""
    sock.settimeout(timeout)
    received = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(4096):
            received += chunk
    return received


def _request(contexts: list[tuple[int, str, str]], called: str = ROUTER_AET,
             calling: str = "HOSTILE") -> bytes:
    """An A-ASSOCIATE-RQ with exactly these (id, abstract, transfer syntax) contexts."""
    def item(kind: int, value: bytes) -> bytes:
        return struct.pack(">BBH", kind, 0, len(value)) + value

    body = (struct.pack(">HH", 1, 0) + called.encode().ljust(16) + calling.encode().ljust(16)
            + b"\0" * 32 + item(0x10, pdus.APPLICATION_CONTEXT.encode()))
    for context_id, abstract, syntax in contexts:
        body += item(0x20, bytes((context_id, 0, 0, 0)) + item(0x30, abstract.encode())
                     + item(0x40, syntax.encode()))
    body += item(0x50, item(0x51, struct.pack(">L", 16384)))
    return struct.pack(">BBL", 1, 0, len(body)) + body


@contextlib.contextmanager
def _accepted(port: int, abstract: str) -> Iterator[socket.socket]:
    """A raw connection whose association was accepted (retried while the previous ones from
    this address are still being counted back)."""
    for _ in range(50):
        sock = _connect(port)
        sock.sendall(_request([(1, abstract, EXPLICIT)]))
        sock.settimeout(5)
        if sock.recv(1) == b"\x02":
            with sock:
                yield sock
            return
        sock.close()
        time.sleep(0.1)
    pytest.fail("the association was never accepted")


def _rejection(answer: bytes) -> tuple[int, int, int]:
    assert answer[:1] == b"\x03", f"expected an A-ASSOCIATE-RJ, got {answer[:12]!r}"
    return answer[7], answer[8], answer[9]


def test_a_port_scan_leaves_the_door_open(router: Router) -> None:
    port = router.dicom.port
    for _ in range(60):  # more than every limit: connect and close at once, as nmap -sT does
        _connect(port).close()
    assert _echo_seconds(port) < 1.0
    gate = router.dicom.gate
    assert gate is not None
    wait_for(lambda: gate.snapshot()["pending"] == 0, 5, "the scan's connections to be gone")


def test_silent_connections_are_capped_per_address_and_closed_by_the_artim_timer(
    router: Router,
) -> None:
    port = router.dicom.port
    silent = []
    try:
        for _ in range(40):  # the cap per address is 8: the rest are closed at once
            silent.append(_connect(port))
        assert _echo_seconds(port) < 1.0
        started = time.monotonic()
        closed = sum(1 for sock in silent if _answer(sock, timeout=3.0) == b"")
        assert closed == 40, "every silent connection ends: over the cap or at ARTIM"
        assert time.monotonic() - started < 3.0
    finally:
        for sock in silent:
            sock.close()
    gate = router.dicom.gate
    assert gate is not None
    assert gate.stats.closed_address_cap >= 32
    assert gate.snapshot()["pending"] == 0


def test_garbage_is_aborted_and_logged_one_line_each_then_summarised(
    router: Router, caplog: pytest.LogCaptureFixture,
) -> None:
    port = router.dicom.port
    caplog.set_level(logging.WARNING)
    PROTOCOL_LOG.forget()  # earlier tests' lines for the same address
    for number in range(30):
        with _connect(port) as sock:
            sock.sendall(bytes((0x04 + number % 3, 0)) + b"\xff" * 40)  # P-DATA and worse
            answer = _answer(sock)
            assert answer in (b"", pdus.encode_abort(2, 2)), answer
    for number in range(20):  # accepted associations (ours, then pynetdicom's), then garbage
        abstract = CT if number % 2 else "1.2.840.10008.5.1.4.1.2.2.1"
        with _accepted(port, abstract) as sock:
            sock.sendall(b"\x04\x00\x00\x00\x00\x03\x00\x00\x01" if number % 2 == 0
                         else b"\x09\x00\x00\x00\x00\x02\xff\xff")
            _answer(sock)
    assert _echo_seconds(port) < 1.0
    time.sleep(0.5)  # pynetdicom's threads log as they end
    lines = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert 1 <= len(lines) <= 10, "at most ten lines a minute for one address"
    assert all(r.exc_info is None and not r.exc_text for r in lines), "no tracebacks"
    assert all(BAD in r.getMessage() for r in lines), [r.getMessage() for r in lines]


def test_associations_per_address_are_capped_others_still_served(router: Router) -> None:
    port = router.dicom.port
    held = []
    try:
        for _ in range(2):
            ae = AE(ae_title="GREEDY")
            ae.add_requested_context(Verification)
            assoc = ae.associate("127.0.0.1", port, ae_title=ROUTER_AET, bind_address=(BAD, 0))
            assert assoc.is_established
            held.append(assoc)
        with _connect(port) as sock:
            started = time.monotonic()
            sock.sendall(_request([(1, Verification, EXPLICIT)]))
            # rejected-transient, service provider (presentation), local limit exceeded
            assert _rejection(_answer(sock)) == (2, 3, 2)
            assert time.monotonic() - started < 1.0
        assert _echo_seconds(port) < 1.0
    finally:
        for assoc in held:
            assoc.release()
    wait_for(lambda: router.dicom.gate is not None
             and router.dicom.gate.snapshot()["associations"] == 0, 5,
             "the released associations to be counted back")
    _echo_seconds(port, source=BAD)  # its slots are free again


@pytest.mark.parametrize(("contexts", "why"), [
    ([(1 + 2 * (i % 128), CT, EXPLICIT) for i in range(129)], "129 contexts"),
    ([(1, CT, EXPLICIT), (1, Verification, EXPLICIT)], "duplicate IDs"),
    ([(2, CT, EXPLICIT)], "an even ID"),
])
def test_malformed_context_lists_are_rejected(router: Router, contexts: list[Any],
                                              why: str) -> None:
    with _connect(router.dicom.port) as sock:
        sock.sendall(_request(contexts))
        assert _rejection(_answer(sock)) == (1, 1, 1), why


def test_the_called_ae_title_is_checked_when_required(
    tmp_path: Path, start_router: Callable[..., Router],
) -> None:
    router = start_router(_settings(tmp_path, require_called_aet=True))
    with _connect(router.dicom.port) as sock:
        sock.sendall(_request([(1, Verification, EXPLICIT)], called="ANYONE"))
        # rejected-permanent, service user, called AE title not recognised
        assert _rejection(_answer(sock)) == (1, 1, 7)
    assert _echo_seconds(router.dicom.port) < 1.0


def test_an_idle_association_is_released_after_the_network_timeout(
    tmp_path: Path, start_router: Callable[..., Router],
) -> None:
    settings = _settings(tmp_path)
    router = start_router(replace(settings, dicom=replace(settings.dicom, network_timeout=1.5)))
    with _connect(router.dicom.port, source=GOOD) as sock:
        sock.sendall(_request([(1, Verification, EXPLICIT)]))
        sock.settimeout(5)
        assert sock.recv(1) == b"\x02"  # A-ASSOCIATE-AC, then nothing from us
        started = time.monotonic()
        rest = _answer(sock, timeout=5)
        assert rest.endswith(pdus.encode_abort())  # the rest of the AC, an A-ABORT, closed
        assert 1.0 < time.monotonic() - started < 4.0


@pytest.fixture
def balanced(tmp_path: Path, start_router: Callable[..., Router]) -> Router:
    return start_router(_settings(tmp_path, trusted_proxies=(f"{BALANCER}/32",)))


def _store_through(port: int, source: str, header: bytes, tmp_path: Path) -> int:
    """A C-STORE on a raw connection that starts with ``header`` (a PROXY header or none),
    driven by pynetdicom over a socket we opened; the status."""
    (path,) = make_ct_series(tmp_path / f"ct-{time.monotonic_ns()}", count=1, rows=16, cols=16)
    dataset = dcmread(path)
    relay = socket.create_server(("127.0.0.1", 0))
    relay_port = relay.getsockname()[1]
    outcome: dict[str, int] = {}

    import threading

    def pipe() -> None:  # a minimal "balancer": prefix the header, then copy both ways
        client, _ = relay.accept()
        upstream = _connect(port, source=source)
        upstream.sendall(header)
        with client, upstream:
            for sock in (client, upstream):
                sock.setblocking(True)
            import selectors
            with selectors.DefaultSelector() as sel:
                sel.register(client, selectors.EVENT_READ, upstream)
                sel.register(upstream, selectors.EVENT_READ, client)
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    for key, _ in sel.select(1):
                        data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                        if not data:
                            return
                        key.data.sendall(data)

    thread = threading.Thread(target=pipe, daemon=True)
    thread.start()
    ae = AE(ae_title="BEHINDLB")
    ae.add_requested_context(CT, str(dataset.file_meta.TransferSyntaxUID))
    assoc = ae.associate("127.0.0.1", relay_port, ae_title=ROUTER_AET)
    assert assoc.is_established
    outcome["status"] = int(assoc.send_c_store(dataset).Status)
    assoc.release()
    thread.join(5)
    relay.close()
    return outcome["status"]


def _last_job_ip(router: Router) -> str:
    rows = router.view_db("jobs").query(
        "SELECT source_ip FROM jobs ORDER BY received_at DESC LIMIT 1")
    return str(rows[0]["source_ip"]) if rows else ""


def test_a_trusted_balancer_names_the_real_sender(balanced: Router, tmp_path: Path) -> None:
    header = proxy_protocol.encode(("10.20.30.40", 40000), ("127.0.0.1", 11112))
    assert _store_through(balanced.dicom.port, BALANCER, header, tmp_path) == 0
    wait_for(lambda: _last_job_ip(balanced) == "10.20.30.40", 10,
             "the receipt to name the sender behind the balancer")
    # Without a header the balancer's host is a sender like any other.
    assert _store_through(balanced.dicom.port, BALANCER, b"", tmp_path) == 0
    wait_for(lambda: _last_job_ip(balanced) == BALANCER, 10, "a direct receipt")


def test_a_proxy_header_from_an_untrusted_address_is_garbage(balanced: Router) -> None:
    header = proxy_protocol.encode(("10.20.30.40", 40000), ("127.0.0.1", 11112))
    with _connect(balanced.dicom.port, source=BAD) as sock:
        sock.sendall(header + _request([(1, Verification, EXPLICIT)]))
        assert _answer(sock) in (b"", pdus.encode_abort(2, 2))


def test_limits_count_the_real_sender_behind_a_balancer(balanced: Router) -> None:
    """Two associations held by one sender behind the balancer; a third from that sender is
    refused, while another sender behind the same balancer is served."""
    port = balanced.dicom.port
    held: list[socket.socket] = []

    def open_from(real: str) -> bytes:
        sock = _connect(port, source=BALANCER)
        held.append(sock)
        sock.sendall(proxy_protocol.encode((real, 5000 + len(held)), ("127.0.0.1", port))
                     + _request([(1, Verification, EXPLICIT)]))
        sock.settimeout(5)
        return sock.recv(1)

    try:
        assert open_from("10.0.0.1") == b"\x02"
        assert open_from("10.0.0.1") == b"\x02"
        assert open_from("10.0.0.1") == b"\x03"  # A-ASSOCIATE-RJ: that sender's limit
        assert open_from("10.0.0.2") == b"\x02"
    finally:
        for sock in held:
            sock.close()


@pytest.fixture
def pooled(tmp_path: Path, start_router: Callable[..., Router]) -> Iterator[Router]:
    yield start_router(_settings(tmp_path, processes=2))


def test_limits_hold_across_receiver_processes(pooled: Router) -> None:
    assert pooled.receivers is not None
    port = pooled.receivers.port
    held = []
    try:
        for _ in range(2):
            ae = AE(ae_title="GREEDY")
            ae.add_requested_context(Verification)
            assoc = ae.associate("127.0.0.1", port, ae_title=ROUTER_AET, bind_address=(BAD, 0))
            assert assoc.is_established
            held.append(assoc)
        with _connect(port) as sock:
            sock.sendall(_request([(1, Verification, EXPLICIT)]))
            assert _rejection(_answer(sock)) == (2, 3, 2)
        assert _echo_seconds(port) < 1.0
    finally:
        for assoc in held:
            assoc.release()
    gate = pooled.receivers.gate
    wait_for(lambda: gate.snapshot()["associations"] == 0, 10,
             "the receiver processes to report their associations' ends")


def test_the_front_door_counts_in_metrics(tmp_path: Path, web_router: Callable[..., Any]) -> None:
    import requests

    from tests.conftest import ADMIN_PASSWORD
    from tests.web_harness import bearer

    server = web_router(_settings(tmp_path))
    port = server.router.dicom.port
    with _connect(port) as sock:
        sock.sendall(b"\x04\x00\x00\x00\x00\x02\xff\xff")
        _answer(sock)
    with _connect(port) as sock:
        sock.sendall(_request([(2, Verification, EXPLICIT)]))
        _answer(sock)
    _echo_seconds(port)
    text = requests.get(server.url + "/metrics", timeout=10,
                        headers=bearer(server.url, "admin", ADMIN_PASSWORD)).text
    assert 'dicom_router_dicom_connections_closed_total{reason="protocol_error"} 1' in text
    assert "dicom_router_dicom_connections_total 3" in text
    assert ('dicom_router_dicom_associations_rejected_total{reason="a presentation context ID '
            'is even"} 1') in text
    assert "dicom_router_dicom_associations 0" in text or \
        "dicom_router_dicom_associations 1" in text  # the echo's release is being counted back
