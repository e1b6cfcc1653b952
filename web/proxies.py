"""Behind a reverse proxy: the client's address and scheme from X-Forwarded-For and
X-Forwarded-Proto, believed only when the connection comes from ``[web] trusted_proxies``.

Everything downstream (the audit trail's source IP, login lockout, Secure cookies) reads
``request.remote`` and ``request.secure``; this middleware, first in line, makes them the
client's. Without trusted proxies the headers are ignored: anyone could send them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network
from typing import Any

from aiohttp import web

Network = IPv4Network | IPv6Network


def parse_networks(networks: Iterable[str]) -> list[Network]:
    return [ip_network(n, strict=False) for n in networks]


def is_trusted(address: str, networks: Sequence[Network]) -> bool:
    try:
        ip = ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def client_address(remote: str, forwarded_for: str, networks: Sequence[Network]) -> str:
    """Walk X-Forwarded-For from the right while the hop that added an entry is a trusted
    proxy; the first address not vouched for by one is the client. A malformed entry stops
    the walk at the last trusted hop's address (never a made-up value)."""
    client = remote
    for entry in reversed([e.strip() for e in forwarded_for.split(",") if e.strip()]):
        if not is_trusted(client, networks):
            break
        try:
            client = str(ip_address(entry))
        except ValueError:
            break
    return client


def proxy_middleware(trusted: Iterable[str]) -> Any:
    networks = parse_networks(trusted)

    @web.middleware
    async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        remote = request.remote or ""
        if networks and is_trusted(remote, networks):
            changes: dict[str, str] = {}
            forwarded_for = request.headers.get("X-Forwarded-For", "")
            if forwarded_for:
                changes["remote"] = client_address(remote, forwarded_for, networks)
            proto = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
            if proto in ("http", "https"):
                changes["scheme"] = proto
            if changes:
                request = request.clone(**changes)  # type: ignore[arg-type]
        return await handler(request)

    return middleware
