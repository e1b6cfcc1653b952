"""The Unit aggregate of the ingest log: a series or study (per destination) sent as a whole.

A unit's instances are held until it is stable (no new instance for its quiet time) or its
expected count is reached; then it is dispatched. Instances that arrive later are released as
amendments. Event names and this module's path are stored topics: keep them.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from eventsourcing.domain import Aggregate, event


class Unit(Aggregate):
    """One destination's series or study; id = ``grouping.unit_id(key)``."""

    @staticmethod
    def create_id(unit_id: str, **_: Any) -> UUID:
        return UUID(unit_id)

    @event("Dispatched")
    def __init__(
        self,
        unit_id: str,
        *,
        actor: str,
        source_ip: str,
        correlation_id: str,
        destination: str,
        granularity: str,
        study_instance_uid: str,
        series_instance_uid: str | None,
        job_ids: list[str],
        reason: str,
        request_id: str | None,
    ) -> None:
        self.destination = destination
        self.granularity = granularity
        self.released: set[str] = set(job_ids)
        self.amendments = 0

    @event("Amended")
    def amend(
        self,
        *,
        actor: str,
        source_ip: str,
        correlation_id: str,
        job_ids: list[str],
        resend_unit: bool,
        request_id: str | None,
    ) -> None:
        """Instances that arrived after the unit was dispatched are released (``job_ids``);
        with ``resend_unit`` every instance of the unit is sent again."""
        self.released.update(job_ids)
        self.amendments += 1
