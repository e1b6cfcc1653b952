"""The Commitment aggregate of the delivery log: one Storage Commitment request (PS3.4 Annex
J, push model) from a remote AE and the report that answers it.

Its id is derived from the requesting AE title and the Transaction UID, so a request is
recorded once. Event names and this module's path are stored topics: keep them.
"""

from __future__ import annotations

import uuid
from typing import Any

from eventsourcing.domain import Aggregate, event

_NAMESPACE = uuid.UUID("6f7d0a52-2b8e-4a57-9d7c-1c0e3b1f5a10")


def commitment_id(calling_aet: str, transaction_uid: str) -> uuid.UUID:
    return uuid.uuid5(_NAMESPACE, f"{calling_aet.strip()}\n{transaction_uid}")


class Commitment(Aggregate):
    """A request to commit instances, and the N-EVENT-REPORT sent for it."""

    @staticmethod
    def create_id(transaction_uid: str, calling_aet: str, **_: Any) -> uuid.UUID:
        return commitment_id(calling_aet, transaction_uid)

    @event("Requested")
    def __init__(
        self,
        transaction_uid: str,
        calling_aet: str,
        *,
        actor: str,
        source_ip: str,
        correlation_id: str,
        called_aet: str,
        references: list[list[str]],
        destination: str,
        deadline: float,
        node: str,
    ) -> None:
        """An N-ACTION asked to commit ``references`` ([SOP class, SOP instance] pairs).
        ``destination``: "" when committed means received, else the archive destination
        whose deliveries are waited for until ``deadline`` (Unix seconds)."""
        self.transaction_uid = transaction_uid
        self.calling_aet = calling_aet
        self.references = [list(r) for r in references]
        self.destination = destination
        self.deadline = deadline
        self.node = node
        self.status = "pending"
        self.attempts = 0

    @event("Reported")
    def report(self, *, actor: str, source_ip: str, correlation_id: str, event_type: int,
               committed: int, failed: int, committed_instances: list[list[str]],
               failed_instances: list[list[Any]], via: str) -> None:
        """The N-EVENT-REPORT was accepted by the requester (``via`` "same association" or
        "new association"); ``failed_instances`` are [SOP class, SOP instance, reason]."""
        self.status = "reported"

    @event("ReportFailed")
    def fail_report(self, *, actor: str, source_ip: str, correlation_id: str, attempt: int,
                    error: str, retry_at: float) -> None:
        """The report could not be delivered on a new association; tried again at
        ``retry_at``."""
        self.attempts = attempt

    @event("Abandoned")
    def abandon(self, *, actor: str, source_ip: str, correlation_id: str, attempt: int,
                reason: str) -> None:
        """No report could be delivered within the retry policy: given up."""
        self.status = "abandoned"
