"""Roles and permissions, session tokens (JWT, HS256) and CSRF tokens.

Every route names one permission (see routes.py); a route without one is refused. Roles are
read from the user's current account state on every request, so a role change or a disabled
account takes effect at once; the token only says who logged in and when.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass
from typing import Any

import jwt

PUBLIC = "public"  # no session needed: health, login, static files, the OpenAPI document
AUTHENTICATED = "authenticated"  # any logged-in user (own profile, logout)

ROLE_PERMISSIONS: dict[str, frozenset[str]] = {
    "admin": frozenset({"*"}),
    "operator": frozenset({
        "dashboard", "jobs.read", "jobs.write", "rules.read", "rules.write",
        "destinations.read", "destinations.write", "stats.read", "remote.read",
        "remote.write", "studies.store", "metrics.read", "transforms.read", "transforms.write",
    }),
    "radiologist": frozenset({"dashboard", "studies.read", "viewer", "stats.read",
                              "remote.read"}),
    "auditor": frozenset({"dashboard", "audit.read", "stats.read"}),
}

# Every permission a route may name (tests check routes only use these).
PERMISSIONS = frozenset({
    PUBLIC, AUTHENTICATED, "dashboard", "jobs.read", "jobs.write", "rules.read", "rules.write",
    "destinations.read", "destinations.write", "studies.read", "studies.store", "viewer",
    "stats.read",
    "audit.read", "users.manage", "settings.read", "settings.write", "storage.manage",
    "remote.read", "remote.write", "metrics.read", "transforms.read", "transforms.write",
    # Admins only (no other role grants them): the dry run shows a stored header in clear
    # next to its transformed copy; the lookup turns a pseudonym back into the patient.
    "transforms.preview", "reidentification.lookup",
})

JWT_ALGORITHM = "HS256"
COOKIE_NAME = "dr_session"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"


def allowed(role: str, permission: str) -> bool:
    if permission in (PUBLIC, AUTHENTICATED):
        return True
    granted = ROLE_PERMISSIONS.get(role, frozenset())
    return "*" in granted or permission in granted


@dataclass(frozen=True)
class Principal:
    """The user a request acts for, and how it authenticated."""

    name: str
    role: str
    via: str  # "cookie" | "bearer" | "api_token"
    jti: str | None = None  # session id (cookie and bearer sessions)
    claims: dict[str, Any] | None = None

    def can(self, permission: str) -> bool:
        return allowed(self.role, permission)


class TokenError(Exception):
    """A session token is malformed, tampered with, expired or idle too long."""


class TokenIssuer:
    """Signs and checks session JWTs with a key derived from the router's master key."""

    def __init__(self, key: bytes, idle_timeout: float, max_age: float) -> None:
        self._key = key
        self.idle_timeout = idle_timeout
        self.max_age = max_age

    def issue(self, user: str, jti: str, kind: str, credentials_tag: str,
              lifetime: float | None = None, now: float | None = None,
              issued_at: float | None = None) -> str:
        now = now or time.time()
        iat = issued_at or now
        exp = iat + (lifetime if lifetime is not None else self.max_age)
        claims = {"sub": user, "jti": jti, "iat": int(iat), "exp": int(exp), "kind": kind,
                  "ctag": credentials_tag}
        if kind == "cookie":
            claims["idle"] = int(min(exp, now + self.idle_timeout))
        return jwt.encode(claims, self._key, algorithm=JWT_ALGORITHM)

    def check(self, token: str, now: float | None = None) -> dict[str, Any]:
        try:
            claims = jwt.decode(token, self._key, algorithms=[JWT_ALGORITHM],
                                options={"require": ["sub", "jti", "iat", "exp", "kind"]})
        except jwt.PyJWTError as exc:
            raise TokenError(type(exc).__name__) from None
        if claims["kind"] == "cookie" and claims.get("idle", 0) < (now or time.time()):
            raise TokenError("idle timeout")
        return dict(claims)

    def csrf_token(self, jti: str) -> str:
        return hmac.new(self._key, f"csrf:{jti}".encode(), hashlib.sha256).hexdigest()

    def csrf_ok(self, jti: str, presented: str | None) -> bool:
        return bool(presented) and hmac.compare_digest(self.csrf_token(jti), str(presented))
