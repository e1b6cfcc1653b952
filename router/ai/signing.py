"""Signatures of AI requests and callbacks: ``X-Signature-Timestamp`` (Unix seconds) and
``X-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<raw body>")>``, valid for five
minutes either side of our clock.
"""

from __future__ import annotations

import hashlib
import hmac
import re

TIMESTAMP_HEADER = "X-Signature-Timestamp"
SIGNATURE_HEADER = "X-Signature"
REPLAY_WINDOW = 300.0
_SIGNATURE = re.compile(r"^sha256=([0-9a-f]{64})$")


class SignatureError(Exception):
    """A request or callback is not properly signed; ``reason`` is safe to record."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class StaleTimestampError(SignatureError):
    """The timestamp is missing, malformed or outside the replay window."""


def signer(secret: str) -> hmac.HMAC:
    """An HMAC to feed ``"<timestamp>."`` and then the body (in pieces, as it streams)."""
    return hmac.new(secret.encode("utf-8"), digestmod=hashlib.sha256)


def signature(secret: str, timestamp: int, body: bytes) -> str:
    mac = signer(secret)
    mac.update(f"{timestamp}.".encode())
    mac.update(body)
    return "sha256=" + mac.hexdigest()


def signed_headers(secret: str, body: bytes, now: float) -> dict[str, str]:
    timestamp = int(now)
    return {TIMESTAMP_HEADER: str(timestamp),
            SIGNATURE_HEADER: signature(secret, timestamp, body)}


def check_timestamp(value: str | None, now: float) -> int:
    """The timestamp if within the window; :class:`StaleTimestampError` otherwise."""
    if not value or not value.strip().isdigit() or len(value.strip()) > 12:
        raise StaleTimestampError("missing or malformed signature timestamp")
    timestamp = int(value.strip())
    if abs(now - timestamp) > REPLAY_WINDOW:
        raise StaleTimestampError("signature timestamp outside the 5 minute window")
    return timestamp


def check_signature(presented: str | None, mac: hmac.HMAC) -> str:
    """Compare ``presented`` with the finished ``mac``; returns the hex digest."""
    m = _SIGNATURE.match((presented or "").strip().lower())
    if m is None:
        raise SignatureError("missing or malformed signature")
    if not hmac.compare_digest(m.group(1), mac.hexdigest()):
        raise SignatureError("wrong signature")
    return m.group(1)
