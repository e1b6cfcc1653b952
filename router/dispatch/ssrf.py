"""Outbound connections that cannot be turned against the router's own network (SSRF).

Every connection the router opens to an address someone typed in (DICOM destinations, remote
nodes, S3 endpoints, AI processors) goes through an :class:`AddressPolicy`:

* link-local and cloud-metadata addresses (and "this host", multicast, broadcast) are always
  refused, in every spelling ``getaddrinfo`` accepts: decimal, octal and hex IPv4
  (``2852039166``, ``0xA9FEA9FE``, ``0251.0376.0251.0376``) and the IPv6 forms that carry an
  IPv4 address (IPv4-mapped and -compatible, NAT64, 6to4);
* loopback, and this host's own addresses at the router's own listening ports, only where an
  administrator allows them (``[security] allow_loopback_destinations``);
* everything else, private ranges included (hospital networks live there), is allowed.

An explicit allow-list (``[ai] allowed_networks``, for AI URLs only) overrides all of it.

The policy is checked when a destination is saved (a specific message for the admin) and again
at connect time: the host is resolved, every address checked, and the connection made to a
checked address itself (TLS still verifies the host name), so a DNS answer that changes
between the check and the connection (rebinding) cannot slip through. Redirects are never
followed: ``http.client`` does not follow them and a 3xx is reported as an error.
"""

from __future__ import annotations

import http.client
import socket
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import (
    IPv4Address,
    IPv4Network,
    IPv6Address,
    IPv6Network,
    ip_address,
    ip_network,
)
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from router.settings import Settings

IPAddress = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network
SocketOption = tuple[int, int, int | bytes]
Resolved = tuple[socket.AddressFamily, tuple[Any, ...]]  # family, socket address

REFUSED_NETWORKS: tuple[Network, ...] = tuple(ip_network(n) for n in (
    "169.254.0.0/16",      # IPv4 link-local, including 169.254.169.254 (AWS, GCP, Azure, ...)
    "fe80::/10",           # IPv6 link-local
    "fd00:ec2::254/128",   # AWS instance metadata over IPv6
    "100.100.100.200/32",  # Alibaba Cloud metadata
    "192.0.0.192/32",      # Oracle Cloud metadata
    "0.0.0.0/8", "::/128",  # "this host": reaches local services on some systems
    "224.0.0.0/4", "ff00::/8", "255.255.255.255/32",  # multicast and broadcast
))
# IPv6 prefixes whose last 32 bits are an IPv4 address a gateway forwards to (RFC 6052 NAT64).
_NAT64 = ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ip_network("::/96")  # deprecated ::a.b.c.d; :: and ::1 excepted below
MAX_RESPONSE_BYTES = 64 * 1024
LOOPBACK_SETTING = "[security] allow_loopback_destinations = true"


class AddressRefusedError(Exception):
    """The host is, or resolves to, an address outbound connections may not reach."""


class NameNotResolvedError(OSError):
    """The host name has no address (unknown, or the resolver is unreachable)."""


@dataclass(frozen=True)
class HttpAnswer:
    """Status, headers and the first ``MAX_RESPONSE_BYTES`` of the body."""

    status: int
    headers: dict[str, str]
    body: bytes


def parse_networks(texts: Sequence[str]) -> tuple[Network, ...]:
    """Networks from CIDR strings (``ValueError`` for one that is not)."""
    return tuple(ip_network(t.strip(), strict=False) for t in texts)


def _embedded_ipv4(ip: IPv6Address) -> IPv4Address | None:
    """The IPv4 address an IPv6 address carries to an IPv4 host, if it does."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64 or (ip in _IPV4_COMPATIBLE and int(ip) > 1):
        return IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _forms(address: str) -> list[IPAddress]:
    """The address, and the IPv4 address inside it when it is one of the IPv6 wrappings."""
    ip: IPAddress = ip_address(address.split("%", 1)[0])
    forms: list[IPAddress] = [ip]
    if isinstance(ip, IPv6Address) and (inner := _embedded_ipv4(ip)) is not None:
        forms.append(inner)
    return forms


def is_own_address(ip: IPAddress) -> bool:
    """True when ``ip`` is one of this host's addresses (binding to it succeeds)."""
    family = socket.AF_INET if isinstance(ip, IPv4Address) else socket.AF_INET6
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((str(ip), 0))
    except OSError:
        return False
    return True


@dataclass(frozen=True)
class AddressPolicy:
    """Which addresses outbound connections may reach; the default is the strict one."""

    allow_loopback: bool = False
    # The router's own listening ports (DICOM, DICOM TLS, HTTP): refused on this host's own
    # addresses unless loopback is allowed (a destination there would loop back into us).
    own_ports: frozenset[int] = frozenset()
    # The administrator's explicit allow-list: wins over every refusal ([ai] allowed_networks).
    allowed: tuple[Network, ...] = ()

    @classmethod
    def from_settings(cls, settings: Settings, *, allowed: Iterable[str] = ()) -> AddressPolicy:
        """The policy of these settings; ``allowed`` for the allow-list of one kind (AI)."""
        tls = settings.dicom.tls
        ports = {settings.dicom_port, settings.http_port, tls.port if tls else 0}
        return cls(allow_loopback=settings.security.allow_loopback_destinations,
                   own_ports=frozenset(p for p in ports if p > 0),
                   allowed=parse_networks(list(allowed)))

    def refusal(self, address: str, port: int) -> str | None:
        """Why ``address``:``port`` may not be reached, or None when it may."""
        forms = _forms(address)
        kind = self._refused_kind(forms, port)
        return None if kind is None else f"{forms[0]} is {kind}"

    def _refused_kind(self, forms: list[IPAddress], port: int) -> str | None:
        if any(ip in net for ip in forms for net in self.allowed
               if ip.version == net.version):
            return None
        if any(ip in net for ip in forms for net in REFUSED_NETWORKS
               if ip.version == net.version):
            return "a link-local, cloud-metadata, multicast or 'this host' address"
        if self.allow_loopback:
            return None
        if any(ip.is_loopback for ip in forms):
            return f"a loopback address (allowed only with {LOOPBACK_SETTING})"
        if port in self.own_ports and any(is_own_address(ip) for ip in forms):
            return (f"an address of this host, and port {port} is one the router listens on "
                    f"(allowed only with {LOOPBACK_SETTING})")
        return None

    def check(self, address: str, port: int) -> None:
        """Raise :class:`AddressRefusedError` if ``address``:``port`` may not be reached."""
        reason = self.refusal(address, port)
        if reason is not None:
            raise AddressRefusedError(f"refusing to connect: {reason}")

    def resolve(self, host: str, port: int) -> list[Resolved]:
        """Every (family, socket address) of ``host``, all of them checked.

        Raises :class:`AddressRefusedError` if ANY of them is refused (a name that also
        resolves to a refused address is refused whole), ``OSError`` if it does not resolve.
        """
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise NameNotResolvedError(f"cannot resolve the host name ({exc.strerror})") from None
        except UnicodeError:  # a label IDNA cannot encode (too long, empty...)
            raise NameNotResolvedError("cannot resolve the host name (not a valid name)") from None
        found: list[Resolved] = [(info[0], info[4]) for info in infos]
        for _, sockaddr in found:
            self.check(str(sockaddr[0]), port)
        return found

    def addresses(self, host: str, port: int) -> list[str]:
        """The checked addresses of ``host``, IPv4 first (as pynetdicom would pick)."""
        found = [str(sockaddr[0]) for _, sockaddr in self.resolve(host, port)]
        return sorted(dict.fromkeys(found), key=lambda a: ":" in a)

    def connect(self, host: str, port: int, timeout: float | None,
                options: Sequence[SocketOption] = ()) -> socket.socket:
        """A TCP connection to ``host``:``port`` made to one of its checked addresses.

        Raises :class:`AddressRefusedError`, or ``OSError`` (unresolvable, refused, timeout).
        """
        last: OSError = OSError(f"no address for {host}")
        for family, sockaddr in self.resolve(host, port):
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                for level, name, value in options:
                    sock.setsockopt(level, name, value)
                sock.settimeout(timeout)
                sock.connect(sockaddr)
                return sock
            except OSError as exc:
                sock.close()
                last = exc
        raise last

    def host_problem(self, host: str, port: int) -> str | None:
        """At save time: why ``host``:``port`` is refused, or None.

        IP literals in any form are judged as they are; a name is resolved and judged by its
        addresses. A name that does not resolve (yet) is not refused here: it is checked again
        at every connection.
        """
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            return None
        for info in infos:
            forms = _forms(str(info[4][0]))
            kind = self._refused_kind(forms, port)
            if kind is None:
                continue
            if not _is_literal(host):
                return f"{host} resolves to {forms[0]}, {kind}"
            spelled = "" if host.split("%", 1)[0] == str(forms[0]) else f" ({host})"
            return f"{forms[0]}{spelled} is {kind}"
        return None


def _is_literal(host: str) -> bool:
    """True for an IP address in any form (decimal, octal, hex and short IPv4 included)."""
    try:
        ip_address(host.split("%", 1)[0])
    except ValueError:
        try:
            socket.inet_aton(host)
        except OSError:
            return False
    return True


def url_problem(url: str, policy: AddressPolicy) -> str | None:
    """:meth:`AddressPolicy.host_problem` for the host and port of an http(s) URL."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return None  # the config's own check reports a malformed URL
    if not parts.hostname:
        return None
    return policy.host_problem(parts.hostname, port)


class _PinnedHTTP(http.client.HTTPConnection):
    def __init__(self, host: str, port: int, policy: AddressPolicy, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._policy = policy

    def connect(self) -> None:
        self.sock = self._policy.connect(self.host, self.port, self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _PinnedHTTPS(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, policy: AddressPolicy, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._policy = policy

    def connect(self) -> None:
        sock = self._policy.connect(self.host, self.port, self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


def post(url: str, body: bytes | BinaryIO, headers: dict[str, str], timeout: float,
         policy: AddressPolicy) -> HttpAnswer:
    """POST ``body`` (bytes, or a file with ``Content-Length`` in ``headers``) to ``url``
    through a checked address; never follows a redirect.

    Raises :class:`AddressRefusedError`, ``OSError`` (name, connection, TLS, timeout) or
    ``http.client.HTTPException``.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("only http and https URLs with a host are supported")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    cls = _PinnedHTTPS if parts.scheme == "https" else _PinnedHTTP
    conn = cls(parts.hostname, port, policy, timeout)
    try:
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read(MAX_RESPONSE_BYTES)
        return HttpAnswer(response.status, {k.lower(): v for k, v in response.getheaders()},
                          data)
    finally:
        conn.close()
