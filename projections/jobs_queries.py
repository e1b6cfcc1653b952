"""Reads of jobs for the jobs pages and API: filtered, paged lists with each job's status
derived from its deliveries, one job with its deliveries, and its event timeline (audit view).

Views only; ``?`` placeholders work on both backends. On SQLite each view is its own file, so
the jobs and audit views are never joined in one statement.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from projections.db import ViewDatabase
from projections.sql import like_pattern, page, where_clause
from router.domain.delivery_states import (
    DELIVERY_STATES,
    STORED_BY_SHOWN,
    shown,
    shown_sql,
)

# A job's status is the most urgent state among its deliveries, named as in
# router/domain/delivery_states.py ("failed": one is dead-lettered); a job without deliveries
# shows its routing (received, unrouted, duplicate, conflict).
ROUTING_STATUSES = ("received", "unrouted", "duplicate", "conflict")
JOB_STATUSES = (*DELIVERY_STATES, *ROUTING_STATUSES)
STATUS_SQL = "CASE " + " ".join(
    f"WHEN EXISTS (SELECT 1 FROM deliveries x WHERE x.job_id = j.job_id"
    f" AND x.status = '{STORED_BY_SHOWN[job]}') THEN '{job}'" for job in DELIVERY_STATES
) + " ELSE j.routing END"

FILTER_FIELDS = ("status", "destination", "calling_aet", "modality", "received_from",
                 "received_to", "patient_id", "study_uid")
LIST_COLUMNS = (
    "j.job_id, j.received_at, j.source, j.calling_aet, j.called_aet, j.source_ip, j.modality,"
    " j.patient_id, j.study_instance_uid, j.series_instance_uid, j.sop_instance_uid,"
    " j.sop_class_uid, j.size, j.routing, j.patient_name, j.transfer_id"
)
DETAIL_COLUMNS = LIST_COLUMNS + (
    ", j.actor, j.transfer_syntax_uid, j.sha256, j.matched_rules, j.destinations,"
    " j.duplicate_of, j.previous_job_id, j.correlation_id"
)
DELIVERY_COLUMNS = (
    f"delivery_id, job_id, destination, {shown_sql('status')} AS status, attempts, created_at,"
    " next_attempt_at, last_attempt_at, last_error, delivered_at, detail, last_failed_at,"
    " last_failure"
)


@dataclass(frozen=True)
class JobFilters:
    """What the jobs list is narrowed to; None means "any"."""

    status: str | None = None
    destination: str | None = None
    calling_aet: str | None = None  # wildcards allowed
    modality: str | None = None
    received_from: float | None = None  # Unix seconds, inclusive
    received_to: float | None = None  # Unix seconds, exclusive
    patient_id: str | None = None
    study_uid: str | None = None

    def where(self) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        if self.status is not None:
            clauses.append(f"({STATUS_SQL}) = ?")
            params.append(self.status)
        if self.destination is not None:
            clauses.append("EXISTS (SELECT 1 FROM deliveries y WHERE y.job_id = j.job_id"
                           " AND y.destination = ?)")
            params.append(self.destination)
        if self.calling_aet is not None:
            clauses.append("UPPER(j.calling_aet) LIKE UPPER(?) ESCAPE '\\'")
            params.append(like_pattern(self.calling_aet))
        for column, value in (("modality", self.modality), ("patient_id", self.patient_id),
                              ("study_instance_uid", self.study_uid)):
            if value is not None:
                clauses.append(f"j.{column} = ?")
                params.append(value)
        if self.received_from is not None:
            clauses.append("j.received_at >= ?")
            params.append(self.received_from)
        if self.received_to is not None:
            clauses.append("j.received_at < ?")
            params.append(self.received_to)
        return where_clause(clauses), params

    def used(self) -> list[str]:
        """Names of the filters in use (PHI-free, for the access record)."""
        return [name for name in FILTER_FIELDS if getattr(self, name) is not None]


def list_jobs(db: ViewDatabase, filters: JobFilters, limit: int, offset: int
              ) -> tuple[list[dict[str, Any]], int]:
    """One page of jobs, newest first, each with ``status`` and ``deliveries``; and the total."""
    rows, total = page(db, f"{LIST_COLUMNS}, {STATUS_SQL} AS status", "jobs j", filters.where(),
                       "j.received_at DESC, j.job_id", limit, offset)
    by_job: dict[str, list[dict[str, Any]]] = {row["job_id"]: [] for row in rows}
    if by_job:
        marks = ", ".join("?" for _ in by_job)
        for d in db.query(f"SELECT job_id, destination, status FROM deliveries"
                          f" WHERE job_id IN ({marks}) ORDER BY destination", list(by_job)):
            by_job[d["job_id"]].append({"destination": d["destination"],
                                        "status": shown(d["status"])})
    for row in rows:
        row["deliveries"] = by_job[row["job_id"]]
    return rows, total


def valid_job_id(job_id: str) -> bool:
    try:
        return str(uuid.UUID(job_id)) == job_id.lower()
    except ValueError:
        return False


def get_job(db: ViewDatabase, job_id: str) -> dict[str, Any] | None:
    """The job with its status, matched rules and deliveries; None if unknown."""
    if not valid_job_id(job_id):
        return None
    rows = db.query(f"SELECT {DETAIL_COLUMNS}, {STATUS_SQL} AS status FROM jobs j"
                    " WHERE j.job_id = ?", (job_id.lower(),))
    if not rows:
        return None
    job = rows[0]
    job["matched_rules"] = json.loads(job["matched_rules"] or "[]")
    job["destinations"] = json.loads(job["destinations"] or "[]")
    job["deliveries"] = db.query(f"SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE job_id = ?"
                                 " ORDER BY destination", (job["job_id"],))
    return job


def get_delivery(db: ViewDatabase, job_id: str, destination: str) -> dict[str, Any] | None:
    rows = db.query(f"SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE job_id = ?"
                    " AND destination = ?", (job_id, destination))
    return rows[0] if rows else None


def job_events(audit_db: ViewDatabase, job: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every recorded event of the job (receipt, routing, each delivery attempt and operator
    action) in the order it happened, with the destination each delivery event concerns.
    Views of the job (access log rows) are the audit trail's business, not the timeline's."""
    destination_of = {str(d["delivery_id"]): d["destination"] for d in job["deliveries"]}
    rows = audit_db.query(
        "SELECT occurred_at, application, position, actor, source_ip, action, object_id,"
        " outcome, correlation_id, detail FROM audit WHERE job_id = ?"
        " AND application IN ('ingest', 'delivery')"
        " ORDER BY occurred_at, application, position", (job["job_id"],))
    events = []
    for row in rows:
        detail = json.loads(row.pop("detail") or "{}")
        row["details"] = detail if isinstance(detail, dict) else {}
        row["destination"] = row["details"].get("destination") or destination_of.get(
            row["object_id"])
        events.append(row)
    return events
