"""The AIRequest aggregate of the delivery log: one round trip of a series or study to an AI
processor (requested, accepted, result received or timed out), with every attempt.

Its id is the request id chosen when the unit was released (``Unit.Dispatched.request_id``);
it is also the correlation id of the callback URL. Event names and this module's path are
stored topics: keep them.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from eventsourcing.domain import Aggregate, event

OPEN = frozenset({"requested", "accepted", "retrying"})


class AIRequest(Aggregate):
    """Sending one unit to one AI destination and hearing back."""

    @staticmethod
    def create_id(request_id: str, **_: Any) -> UUID:
        return UUID(request_id)

    @event("Requested")
    def __init__(
        self,
        request_id: str,
        *,
        actor: str,
        source_ip: str,
        correlation_id: str,
        destination: str,
        unit_id: str,
        study_instance_uid: str,
        series_instance_uids: list[str],
        job_ids: list[str],
        amendment: bool,
        send: str,
        deidentified: bool,
        reidentify: str | None,
        node: str = "",
    ) -> None:
        """``node``: the router node that sent it (here and in Resent; absent in events
        recorded before node ids; eventsourcing wants it passed even so)."""
        self.destination = destination
        self.study_instance_uid = study_instance_uid
        self.job_ids = list(job_ids)
        self.reidentify = reidentify  # sealed mapping pseudonym -> original, or None
        self.attempts = 1
        self.status = "requested"
        self.signatures: list[str] = []

    @event("Resent")
    def resend(self, *, actor: str, source_ip: str, correlation_id: str, attempt: int,
               node: str = "") -> None:
        """Another attempt after a failure or a timeout."""
        self.attempts = attempt
        self.status = "requested"

    @event("Accepted")
    def accept(self, *, actor: str, source_ip: str, correlation_id: str, attempt: int,
               http_status: int, deadline: float, duration_ms: int) -> None:
        """The processor answered 2xx; its callback is due by ``deadline`` (Unix seconds)."""
        self.status = "accepted"

    @event("AttemptFailed")
    def fail_attempt(self, *, actor: str, source_ip: str, correlation_id: str, attempt: int,
                     error: str, retry_at: float, duration_ms: int) -> None:
        """The request could not be made or was refused for now; retried at ``retry_at``."""
        self.status = "retrying"

    @event("TimedOut")
    def time_out(self, *, actor: str, source_ip: str, correlation_id: str, attempt: int,
                 retry_at: float) -> None:
        """No callback by the deadline; the request is made again at ``retry_at``."""
        self.status = "retrying"

    @event("DeadLettered")
    def dead_letter(self, *, actor: str, source_ip: str, correlation_id: str, attempt: int,
                    reason: str, permanent: bool) -> None:
        """Given up: a permanent error, or no result within the retry policy's maximum age."""
        self.status = "dead"

    @event("ResultReceived")
    def receive_result(self, *, actor: str, source_ip: str, correlation_id: str, status: str,
                       tags: dict[str, Any], result_job_ids: list[str], signature: str,
                       detail: str) -> None:
        """The processor's signed callback: ``completed`` with tags (and result objects, now
        jobs of their own) or ``failed``."""
        self.status = "completed" if status == "completed" else "failed"
        self.signatures.append(signature)

    @event("Requeued")
    def requeue(self, *, actor: str, source_ip: str, correlation_id: str) -> None:
        """An operator asked for a new attempt now (restarts the maximum-age clock)."""
        self.status = "retrying"

    @property
    def is_open(self) -> bool:
        return self.status in OPEN
