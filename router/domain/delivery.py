"""Aggregates of the delivery log: one Delivery per job x destination (id derived from both).

A Delivery is created by the dispatcher when its first attempt ends, in the same save as that
attempt's outcome. Event names and this module's path are stored topics: keep them.
"""

from __future__ import annotations

from typing import Any
from uuid import NAMESPACE_OID, UUID, uuid5

from eventsourcing.domain import Aggregate, event

DELIVERY_NAMESPACE = uuid5(NAMESPACE_OID, "dicom-router/delivery")


def delivery_id(job_id: str, destination: str) -> UUID:
    """The stable id of the delivery of one job to one destination."""
    return uuid5(DELIVERY_NAMESPACE, f"{job_id}/{destination}")


class Delivery(Aggregate):
    """Sending one received object to one destination, with every attempt and its outcome."""

    @staticmethod
    def create_id(job_id: str, destination: str, **_: Any) -> UUID:
        return delivery_id(job_id, destination)

    @event("Created")
    def __init__(
        self,
        job_id: str,
        destination: str,
        *,
        actor: str,
        source_ip: str,
        correlation_id: str,
        sha256: str,
    ) -> None:
        self.job_id = job_id
        self.destination = destination
        self.sha256 = sha256
        self.attempts = 0
        self.status = "pending"

    @event("Succeeded")
    def succeed(
        self,
        *,
        actor: str,
        source_ip: str,
        correlation_id: str,
        attempt: int,
        detail: str,
        duration_ms: int,
        node: str = "",
        transforms: list[dict[str, Any]] | None = None,
    ) -> None:
        """The destination confirmed the object (for DICOM: status 0x0000 or a warning).
        ``node``: the router node that made the attempt (here and in the next two; absent in
        events recorded before several nodes). ``transforms``: what was applied to the copy
        sent, one ``{name, kind, version, engine, changed}`` each in order (here and in the
        next two; empty when the stored object was sent as is, absent in events recorded
        before transforms). eventsourcing wants every keyword argument passed, those with
        defaults included."""
        self.attempts = attempt
        self.status = "delivered"

    @event("AttemptFailed")
    def fail_attempt(
        self,
        *,
        actor: str,
        source_ip: str,
        correlation_id: str,
        attempt: int,
        error: str,
        retry_at: float,
        duration_ms: int,
        node: str = "",
        transforms: list[dict[str, Any]] | None = None,
    ) -> None:
        """A transient failure; the next attempt is due at ``retry_at`` (Unix seconds, UTC)."""
        self.attempts = attempt
        self.status = "retrying"

    @event("DeadLettered")
    def dead_letter(
        self,
        *,
        actor: str,
        source_ip: str,
        correlation_id: str,
        attempt: int,
        reason: str,
        permanent: bool,
        node: str = "",
        transforms: list[dict[str, Any]] | None = None,
    ) -> None:
        """Given up: a permanent error, or retries exhausted after the maximum age."""
        self.attempts = attempt
        self.status = "dead"

    @event("Requeued")
    def requeue(self, *, actor: str, source_ip: str, correlation_id: str, reason: str) -> None:
        """An operator asked for a new attempt now (resets the maximum-age clock), saying why
        (may be empty; events recorded before it was asked for have none)."""
        self.status = "pending"

    @event("Cancelled")
    def cancel(self, *, actor: str, source_ip: str, correlation_id: str, reason: str) -> None:
        """An operator stopped this delivery; it will not be attempted again unless requeued."""
        self.status = "cancelled"


class BulkAction(Aggregate):
    """One user action on many deliveries at once (requeue, cancel, or send a study or series
    to a destination). The per-delivery events it causes share its ``correlation_id``."""

    @event("Requested")
    def __init__(
        self,
        *,
        actor: str,
        source_ip: str,
        correlation_id: str,
        operation: str,
        criteria: dict[str, Any],
        reason: str,
        matched: int,
    ) -> None:
        """``operation``: requeue | cancel | send; ``criteria``: the filter (or study, series
        and destination) as given; ``matched``: how many deliveries or jobs it selected."""
        self.operation = operation
        self.matched = matched
