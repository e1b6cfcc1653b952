"""Outbound HTTP that cannot be turned against the router's own network (SSRF).

Link-local and cloud-metadata addresses are refused unless an administrator allow-lists them
(``[ai] allowed_networks``). The host is resolved, every address checked, and the connection
made to the checked address itself (TLS still verifies the host name), so a DNS answer that
changes between the check and the connection (rebinding) cannot slip through. Redirects are
never followed: ``http.client`` does not follow them and a 3xx is reported as an error.
"""

from __future__ import annotations

import http.client
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network
from typing import BinaryIO
from urllib.parse import urlsplit

Network = Sequence[object]

REFUSED_NETWORKS = tuple(ip_network(n) for n in (
    "169.254.0.0/16",      # IPv4 link-local, including 169.254.169.254 (AWS, GCP, Azure, ...)
    "fe80::/10",           # IPv6 link-local
    "fd00:ec2::254/128",   # AWS instance metadata over IPv6
    "100.100.100.200/32",  # Alibaba Cloud metadata
    "192.0.0.192/32",      # Oracle Cloud metadata
    "0.0.0.0/8", "::/128",  # "this host": reaches local services on some systems
    "224.0.0.0/4", "ff00::/8", "255.255.255.255/32",  # multicast and broadcast
))
MAX_RESPONSE_BYTES = 64 * 1024


class AddressRefusedError(Exception):
    """The URL's host is, or resolves to, an address outbound requests may not reach."""


@dataclass(frozen=True)
class HttpAnswer:
    """Status, headers and the first ``MAX_RESPONSE_BYTES`` of the body."""

    status: int
    headers: dict[str, str]
    body: bytes


def parse_networks(texts: Sequence[str]) -> tuple[object, ...]:
    """Networks from CIDR strings (``ValueError`` for one that is not)."""
    return tuple(ip_network(t.strip(), strict=False) for t in texts)


def check_address(address: str, allowed: Sequence[object] = ()) -> None:
    """Raise :class:`AddressRefusedError` if ``address`` may not be reached."""
    ip: IPv4Address | IPv6Address = ip_address(address.split("%", 1)[0])
    if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip in net for net in allowed):  # type: ignore[operator]
        return
    if any(ip in net for net in REFUSED_NETWORKS):
        raise AddressRefusedError(
            f"refusing to connect to {ip}: link-local or cloud-metadata address "
            "(allow it in [ai] allowed_networks if this is intended)")


def resolve_checked(host: str, port: int, allowed: Sequence[object] = ()) -> str:
    """The first address of ``host``; refused if ANY of its addresses is refused."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise OSError(f"cannot resolve the host name ({exc.strerror})") from None
    addresses = [str(info[4][0]) for info in infos]
    for address in addresses:
        check_address(address, allowed)
    return addresses[0]


class _PinnedHTTP(http.client.HTTPConnection):
    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _PinnedHTTPS(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


def post(url: str, body: bytes | BinaryIO, headers: dict[str, str], timeout: float,
         allowed: Sequence[object] = ()) -> HttpAnswer:
    """POST ``body`` (bytes, or a file with ``Content-Length`` in ``headers``) to ``url``
    through a checked address; never follows a redirect.

    Raises :class:`AddressRefusedError`, ``OSError`` (connection, TLS, timeout) or
    ``http.client.HTTPException``.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("only http and https URLs with a host are supported")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    address = resolve_checked(parts.hostname, port, allowed)
    cls = _PinnedHTTPS if parts.scheme == "https" else _PinnedHTTP
    conn = cls(parts.hostname, port, address, timeout)
    try:
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read(MAX_RESPONSE_BYTES)
        return HttpAnswer(response.status, {k.lower(): v for k, v in response.getheaders()},
                          data)
    finally:
        conn.close()
