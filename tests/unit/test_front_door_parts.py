"""The front door's pure parts: PROXY v2 headers, the association policy, the rate-limited
protocol log, the peer line and the receivers' signal stream."""

from __future__ import annotations

import logging
import struct

import pytest

from router.dicom import association_policy, pdus, proxy_protocol
from router.dicom.association_policy import AssociationPolicy
from router.dicom.peer import Peer
from router.dicom.protocol_log import ProtocolLog
from router.dicom.receivers import _parse_signals
from tests.unit.test_pdus import _request_bytes


def test_proxy_v2_headers_round_trip_for_both_families() -> None:
    for source in (("10.1.2.3", 4000), ("2001:db8::7", 4001)):
        destination = ("10.0.0.1", 104) if ":" not in source[0] else ("2001:db8::1", 104)
        raw = proxy_protocol.encode(source, destination) + b"\x01\x00rest"
        header = proxy_protocol.parse(raw)
        assert header is not None
        assert header.source == source
        assert raw[header.length:] == b"\x01\x00rest"


def test_a_partial_proxy_header_asks_for_more_and_garbage_is_refused() -> None:
    raw = proxy_protocol.encode(("10.1.2.3", 4000), ("10.0.0.1", 104))
    assert proxy_protocol.parse(raw[:10]) is None
    assert proxy_protocol.parse(raw[:20]) is None
    assert proxy_protocol.starts_like_proxy(raw[:12])
    assert not proxy_protocol.starts_like_proxy(b"\x01\x00\x00\x00\x00\xff")
    with pytest.raises(proxy_protocol.ProxyHeaderError):
        proxy_protocol.parse(b"\x01" * 16)
    bad_version = raw[:12] + b"\x11" + raw[13:]
    with pytest.raises(proxy_protocol.ProxyHeaderError, match="version 1"):
        proxy_protocol.parse(bad_version)
    local = proxy_protocol.SIGNATURE + b"\x20\x00\x00\x00"
    assert proxy_protocol.parse(local) == proxy_protocol.ProxyHeader(16, None)


POLICY = AssociationPolicy("DICOMROUTER", require_called_aet=True,
                           known_calling_aets=frozenset({"MODALITY"}))


def _check(raw: bytes, policy: AssociationPolicy = POLICY) -> tuple[int, int, int] | None:
    body = raw[6:]
    rejection = association_policy.check(body, pdus.parse_associate_rq(body), policy)
    return None if rejection is None else (rejection.result, rejection.source,
                                           rejection.reason)


def test_the_policy_accepts_a_well_formed_request_from_a_known_ae() -> None:
    assert _check(_request_bytes()) is None


def test_the_policy_names_the_standard_reasons() -> None:
    raw = bytearray(_request_bytes())
    called = raw[10:26]
    raw[10:26] = b"SOMEONE ELSE    "
    assert _check(bytes(raw)) == (1, 1, 7)  # called AE title not recognised
    raw[10:26] = called
    raw[26:42] = b"INTRUDER        "
    assert _check(bytes(raw)) == (1, 1, 3)  # calling AE title not recognised
    open_policy = AssociationPolicy("DICOMROUTER", False, None)
    assert _check(bytes(raw), open_policy) is None
    raw[6:8] = struct.pack(">H", 2)  # protocol version without bit 0
    assert _check(bytes(raw), open_policy) == (1, 2, 2)


def test_a_rejection_encodes_as_an_a_associate_rj() -> None:
    rejection = association_policy.over_limit("too many")
    assert rejection.pdu() == b"\x03\x00\x00\x00\x00\x04\x00\x02\x03\x02"


def test_the_protocol_log_summarises_past_its_rate(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    log = ProtocolLog(per_window=3, window=60, clock=lambda: now[0],
                      log=logging.getLogger("test.protocol"))
    caplog.set_level(logging.WARNING, logger="test.protocol")
    for _ in range(10):
        log.warning("10.0.0.9", "garbage %d", 1)
    log.warning("10.0.0.8", "other host")
    assert len(caplog.records) == 4
    now[0] = 61.0
    log.flush()
    assert caplog.records[-1].getMessage() == (
        "10.0.0.9: 7 more protocol errors in the last 60 s, not logged one by one")
    log.warning("10.0.0.9", "garbage again")
    assert caplog.records[-1].getMessage() == "10.0.0.9: garbage again"


def test_a_peer_line_survives_odd_subjects() -> None:
    peer = Peer(7, "2001:db8::7", 104, True, "CN=a\tb,O=x\ny")
    decoded = Peer.decode(peer.encode())
    assert decoded.conn_id == 7 and decoded.address == ("2001:db8::7", 104) and decoded.tls
    assert decoded.tls_subject == "CN=a b,O=x y"


def test_receiver_signals_parse_across_reads() -> None:
    data = b"S" + b"E" + struct.pack(">I", 5) + b"RE" + struct.pack(">I", 6)[:2]
    saved, done, rest = _parse_signals(data)
    assert saved and done == [5] and rest == b"E\x00\x00"
    saved, done, rest = _parse_signals(rest + struct.pack(">I", 6)[2:] + b"E")
    assert not saved and done == [6] and rest == b"E"
