"""The PROXY protocol version 2 header a TCP load balancer puts before the peer's own bytes
(HAProxy's specification, section 2.2), so that limits, rules and the audit trail see the real
sender rather than the balancer. Only believed from ``[dicom] trusted_proxies``.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
HEADER = 16  # signature, version/command, family/protocol, length
MAX_LENGTH = 2048  # addresses plus TLVs; real balancers send far less


class ProxyHeaderError(ValueError):
    """Bytes from a trusted proxy that are not a valid PROXY v2 header."""


@dataclass(frozen=True)
class ProxyHeader:
    """What the header says: ``source`` None for a LOCAL command (the balancer's own check)."""

    length: int  # bytes to consume, header included
    source: tuple[str, int] | None


def starts_like_proxy(data: bytes) -> bool:
    """Whether ``data`` (at least the first 12 bytes) may begin a PROXY v2 header."""
    return data[:len(SIGNATURE)] == SIGNATURE[:len(data)]


def parse(data: bytes) -> ProxyHeader | None:
    """The header at the start of ``data``; None while more bytes are needed."""
    if len(data) < HEADER:
        return None
    if data[:12] != SIGNATURE:
        raise ProxyHeaderError("not a PROXY protocol v2 signature")
    version_command, family, length = data[12], data[13], struct.unpack_from(">H", data, 14)[0]
    if version_command >> 4 != 2:
        raise ProxyHeaderError(f"PROXY protocol version {version_command >> 4}, not 2")
    if length > MAX_LENGTH:
        raise ProxyHeaderError("PROXY header longer than any balancer sends")
    if len(data) < HEADER + length:
        return None
    command = version_command & 0x0F
    total = HEADER + length
    if command == 0:  # LOCAL: the balancer's own connection (health check)
        return ProxyHeader(total, None)
    if command != 1:
        raise ProxyHeaderError(f"unknown PROXY command {command}")
    body = data[HEADER:total]
    if family == 0x11:  # TCP over IPv4
        if length < 12:
            raise ProxyHeaderError("PROXY IPv4 address block cut short")
        address, port = socket.inet_ntop(socket.AF_INET, body[:4]), body[8:10]
    elif family == 0x21:  # TCP over IPv6
        if length < 36:
            raise ProxyHeaderError("PROXY IPv6 address block cut short")
        address, port = socket.inet_ntop(socket.AF_INET6, body[:16]), body[32:34]
    elif family == 0x00:  # UNSPEC: keep the connection's own address
        return ProxyHeader(total, None)
    else:
        raise ProxyHeaderError(f"PROXY address family 0x{family:02X} is not TCP")
    return ProxyHeader(total, (address, struct.unpack(">H", port)[0]))


def encode(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """A PROXY v2 header for a TCP connection (what a balancer sends; used by the tests)."""
    if ":" in source[0]:
        family, block = 0x21, (socket.inet_pton(socket.AF_INET6, source[0])
                               + socket.inet_pton(socket.AF_INET6, destination[0]))
    else:
        family, block = 0x11, (socket.inet_pton(socket.AF_INET, source[0])
                               + socket.inet_pton(socket.AF_INET, destination[0]))
    block += struct.pack(">HH", source[1], destination[1])
    return SIGNATURE + bytes((0x21, family)) + struct.pack(">H", len(block)) + block
