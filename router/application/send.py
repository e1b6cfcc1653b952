"""Send a stored study (or one series) to a destination on a user's request: one user action
(``BulkAction.Requested``, operation ``send``) and, per instance, a ``Job.Rerouted`` that adds
the destination (no matched rules, the user as actor), or a requeue of a delivery to it that
already ran. The deliveries then go out like any routed job's, each with its own timeline.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError

from projections.jobs_queries import sendable_jobs
from router.application.admin_state import AdminState
from router.application.bulk import BulkFilterError
from router.application.commands import Actor, Commands, NotFoundError
from router.application.stores import EventStores
from router.domain.delivery import BulkAction
from router.domain.ingest import Job

SAVE_BATCH = 100
# Jobs whose object is stored and may be delivered (not duplicates or kept conflicts).
SENDABLE = ("routed", "unrouted", "received")


@dataclass(frozen=True)
class SendResult:
    instances: int  # the study's (series') stored instances, latest version of each
    scheduled: int  # deliveries added or requeued
    waiting: int  # already waiting for an attempt to the destination: left as they are
    correlation_id: str


class Sender:
    """Sends stored instances to a destination as a user asked."""

    def __init__(self, stores: EventStores, admin: AdminState, commands: Commands,
                 jobs_db: Any) -> None:
        self._stores = stores
        self._admin = admin
        self._commands = commands
        self._db = jobs_db

    def jobs_of(self, study_uid: str, series_uid: str | None) -> list[str]:
        """The job of the latest stored version of each instance of the study (series)."""
        latest: dict[str, str] = {}
        for row in sendable_jobs(self._db, study_uid, series_uid, SENDABLE):
            latest[row["sop_instance_uid"]] = row["job_id"]
        return list(latest.values())

    def send(self, study_uid: str, series_uid: str | None, destination: str, reason: str,
             actor: Actor) -> SendResult:
        state = self._admin.refresh().live_destinations().get(destination)
        if state is None:
            raise BulkFilterError("destination", f"no destination named {destination!r}")
        if state.config.get("type") == "ai":
            raise BulkFilterError("destination", "an AI processor receives studies through "
                                  "its rules, not by sending")
        job_ids = self.jobs_of(study_uid, series_uid)
        if not job_ids:
            what = "series of this study" if series_uid else "study"
            raise NotFoundError(f"no stored instance of this {what}")
        acting = Actor(actor.name, actor.source_ip, actor.correlation_id or str(uuid.uuid4()))
        criteria = {"study_uid": study_uid, "series_uid": series_uid,
                    "destination": destination}
        self._stores.delivery.save(BulkAction(**acting.ctx(), operation="send",
                                              criteria=criteria, reason=reason,
                                              matched=len(job_ids)))
        scheduled = waiting = 0
        batch: list[Job] = []
        for job_id in job_ids:
            job = self._job(job_id)
            if job is None:
                continue
            if destination not in job.destinations:
                job.reroute(None, **acting.ctx(), matched_rules=[], destinations=[destination],
                            reason=reason)
                batch.append(job)
            elif self._commands.resend(job_id, destination, acting, reason):
                scheduled += 1
            else:
                waiting += 1
            if len(batch) >= SAVE_BATCH:
                scheduled += self._save(batch)
        scheduled += self._save(batch)
        return SendResult(len(job_ids), scheduled, waiting, acting.correlation_id)

    def _job(self, job_id: str) -> Job | None:
        try:
            job: Any = self._stores.ingest.repository.get(UUID(job_id))
        except AggregateNotFoundError:
            return None
        return job if isinstance(job, Job) else None

    def _save(self, batch: list[Job]) -> int:
        if not batch:
            return 0
        self._stores.ingest.save(*batch)
        count = len(batch)
        batch.clear()
        return count
