"""Short-lived bearer tokens that let one AI processor read (WADO-RS, QIDO-RS) and add to
(STOW-RS) the one study of one AI request, and nothing else.

A token is ``drai_`` + a JWT (HS256, key derived from the master key) naming the destination,
the request and the study. The web layer checks the scope on every call; the token also stops
working once its request is closed (result received, dead-lettered or cancelled).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import jwt

PREFIX = "drai_"
ALGORITHM = "HS256"
MAX_LIFETIME = 24 * 3600.0


class AITokenError(Exception):
    """Not a valid AI token (malformed, tampered with or expired)."""


@dataclass(frozen=True)
class AIGrant:
    """What a token allows: one study, for one request of one AI destination."""

    destination: str
    request_id: str
    study_instance_uid: str
    expires_at: int

    @property
    def actor(self) -> str:
        return f"ai:{self.destination}"


class AITokens:
    """Issues and checks AI tokens."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def issue(self, destination: str, request_id: str, study: str, lifetime: float,
              now: float | None = None) -> str:
        issued = int(now if now is not None else time.time())
        claims = {"sub": f"ai:{destination}", "rid": request_id, "study": study,
                  "iat": issued, "exp": issued + int(min(lifetime, MAX_LIFETIME)), "kind": "ai"}
        return PREFIX + jwt.encode(claims, self._key, algorithm=ALGORITHM)

    def check(self, token: str) -> AIGrant:
        if not token.startswith(PREFIX):
            raise AITokenError("not an AI token")
        try:
            claims = jwt.decode(token[len(PREFIX):], self._key, algorithms=[ALGORITHM],
                                options={"require": ["sub", "rid", "study", "exp", "kind"]})
        except jwt.PyJWTError as exc:
            raise AITokenError(type(exc).__name__) from None
        if claims["kind"] != "ai" or not str(claims["sub"]).startswith("ai:"):
            raise AITokenError("not an AI token")
        return AIGrant(str(claims["sub"])[3:], str(claims["rid"]), str(claims["study"]),
                       int(claims["exp"]))
