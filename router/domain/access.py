"""Aggregates of the access log: who looked at what, logins and sessions.

The access log is written on every page view and API call that shows PHI, so it is an
application of its own (like ingest), never replayed at start. Each aggregate holds one or two
events. Event names and this module's path are stored topics: keep them.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from eventsourcing.domain import Aggregate, event


class Access(Aggregate):
    """One access to PHI or to the audit trail, by a user, with its outcome."""

    @event("Recorded")
    def __init__(
        self, *, actor: str, source_ip: str, correlation_id: str, action: str,
        object_type: str, object_id: str, outcome: str, study_instance_uid: str | None,
        patient_id: str | None, detail: str,
    ) -> None:
        self.action = action
        self.outcome = outcome


class LoginFailure(Aggregate):
    """A refused login (wrong password, unknown or disabled user, locked out)."""

    @event("Recorded")
    def __init__(
        self, *, actor: str, source_ip: str, correlation_id: str, reason: str,
    ) -> None:
        self.reason = reason


class Session(Aggregate):
    """A login session (browser cookie or short-lived bearer token); id = the JWT's ``jti``."""

    @staticmethod
    def create_id(jti: str, **_: Any) -> UUID:
        return UUID(jti)

    @event("Started")
    def __init__(
        self, jti: str, *, actor: str, source_ip: str, correlation_id: str, kind: str,
        expires_at: float,
    ) -> None:
        self.user = actor
        self.kind = kind
        self.expires_at = expires_at
        self.ended = False

    @event("Ended")
    def end(self, *, actor: str, source_ip: str, correlation_id: str, reason: str) -> None:
        """Logged out (or revoked); the token is refused from now on."""
        self.ended = True


class AssociationRefusal(Aggregate):
    """A-ASSOCIATE-RQs refused at the DICOM front door from one address and calling AE for
    one reason, counted over a minute (one event per minute, not per refusal: a flood of
    refused connections must not flood the log)."""

    @event("Recorded")
    def __init__(
        self, *, actor: str, source_ip: str, correlation_id: str, reason: str, count: int,
        first_at: float, last_at: float, node: str,
    ) -> None:
        self.count = count
