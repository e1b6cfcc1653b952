"""Syslog transports for audit messages: RFC 5424 messages, sent over TLS with octet-counting
framing (RFC 5425) or one per UDP datagram (RFC 5426).

A TLS batch counts as received once the repository has closed its side after ours (our
close_notify, then its close_notify or end of stream): it has then read every byte we sent.
A reset, a timeout or a refused connection means the batch must be sent again. UDP has no
acknowledgement at all (docs/atna.md, "Delivery guarantees").
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from router.dicom.tls import client_context

# facility 10 (security/authorization, "authpriv"), severity 5 (notice): IHE ITI-20.
PRI = 10 * 8 + 5
MSGID = "IHE+RFC-3881"
BOM = b"\xef\xbb\xbf"


class SyslogError(Exception):
    """The batch was not (or not surely) received; send it again later."""


def rfc5424(xml: bytes, hostname: str, app_name: str, procid: str,
            timestamp: float) -> bytes:
    """One RFC 5424 message: header, no structured data, the XML as a UTF-8 MSG (with BOM)."""
    when = datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="microseconds")
    header = (f"<{PRI}>1 {when.replace('+00:00', 'Z')} {hostname or '-'} {app_name} "
              f"{procid or '-'} {MSGID} - ")
    return header.encode("ascii") + BOM + xml


def frame(message: bytes) -> bytes:
    """RFC 5425 octet counting: ``MSG-LEN SP SYSLOG-MSG``."""
    return b"%d " % len(message) + message


def tls_context(ca_certificates: Path, certificate: Path | None = None,
                private_key: Path | None = None) -> ssl.SSLContext:
    """A client context verifying the repository's certificate against ``ca_certificates``
    and its name: the DICOM TLS client's, BCP 195 profile (as IHE ATNA asks). Raises
    TlsConfigError naming an unusable file."""
    return client_context(ca_certificates, certificate, private_key, profile="bcp195")


def send_tls(host: str, port: int, context: ssl.SSLContext, messages: Sequence[bytes],
             timeout: float) -> None:
    """Send a batch on one connection and wait until the repository has read it all."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with context.wrap_socket(raw, server_hostname=host) as tls:
                tls.sendall(b"".join(frame(m) for m in messages))
                _closed_by_peer(tls)
    except (OSError, ssl.SSLError) as exc:
        raise SyslogError(f"{type(exc).__name__}: {exc}") from None


def _closed_by_peer(tls: ssl.SSLSocket) -> None:
    """Our close_notify, then the peer's close (its close_notify, or end of stream)."""
    try:
        tls.unwrap()
    except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
        return  # it closed the stream after reading up to our close_notify


def send_udp(host: str, port: int, messages: Sequence[bytes], timeout: float) -> None:
    """One datagram per message; an unreachable port shows as an error on a later send."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0][0]
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.settimeout(timeout)
            sock.connect((host, port))
            for message in messages:
                sock.send(message)
    except OSError as exc:
        raise SyslogError(f"{type(exc).__name__}: {exc}") from None
