"""Reads of jobs for the jobs pages and API: filtered, paged lists with each job's status
derived from its deliveries, one job with its deliveries, and its event timeline (audit view).

Views only; ``?`` placeholders work on both backends. On SQLite each view is its own file, so
the jobs and audit views are never joined in one statement.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from projections.db import Queryable, Row, ViewDatabase
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


# --- the router's reads of the jobs view ------------------------------------------------------
# The dispatcher, retention, the CLI, dry runs, bulk actions, sends, storage commitment and
# transform previews read the jobs view through these (the same statements they ran
# themselves before). The view's projection (projections/jobs.py) is its only writer.

# Deliveries of one destination due now, oldest first: the dispatcher's queue (hot path: one
# statement per destination and tick, nothing else).
DUE_SQL = (
    "SELECT d.delivery_id, d.job_id, d.destination, d.attempts, d.clock_from, j.sha256,"
    " j.size, j.sop_class_uid, j.sop_instance_uid, j.transfer_syntax_uid, j.correlation_id,"
    " j.matched_rules, j.calling_aet"
    " FROM deliveries d JOIN jobs j ON j.job_id = d.job_id"
    " WHERE d.destination = ? AND d.status IN ('pending', 'retrying')"
    " AND COALESCE(d.next_attempt_at, 0) <= ?"
    " ORDER BY COALESCE(d.next_attempt_at, 0), d.created_at LIMIT ?"
)
BLOB_IN_USE_SQL = "SELECT 1 FROM jobs WHERE sha256 = ? LIMIT 1"

# Retention (router/application/retention.py). A job that may lose its object: old enough,
# and a duplicate or fully delivered.
_MAY_GO = (
    "({j}.received_at < ? AND ({j}.routing = 'duplicate' OR ({j}.routing = 'routed'"
    " AND EXISTS (SELECT 1 FROM deliveries d WHERE d.job_id = {j}.job_id)"
    " AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.job_id = {j}.job_id"
    " AND d.status <> 'delivered'))))"
)
_PURGED = "EXISTS (SELECT 1 FROM blob_purges p WHERE p.job_id = {j}.job_id)"
# Jobs whose blob may go: every job sharing its sha256 may lose it too (or already has).
CANDIDATES_SQL = (
    "SELECT j.job_id, j.sha256, j.size FROM jobs j"
    f" WHERE NOT {_PURGED.format(j='j')} AND {_MAY_GO.format(j='j')}"
    " AND NOT EXISTS (SELECT 1 FROM jobs o WHERE o.sha256 = j.sha256"
    f" AND NOT {_PURGED.format(j='o')} AND NOT {_MAY_GO.format(j='o')})"
    " ORDER BY j.received_at, j.job_id LIMIT ?"
)
# Blobs of recent purges that no unpurged job references (a crash between save and delete).
SWEEP_SQL = (
    "SELECT DISTINCT p.sha256 FROM blob_purges p"
    " WHERE p.purged_at >= (SELECT MAX(purged_at) FROM blob_purges) - ?"
    " AND NOT EXISTS (SELECT 1 FROM jobs o WHERE o.sha256 = p.sha256"
    f" AND NOT {_PURGED.format(j='o')})"
)
DRY_RUN_JOB_SQL = (
    "SELECT job_id, received_at, calling_aet, called_aet, source_ip, sha256, modality,"
    " sop_class_uid, study_instance_uid, patient_id, routing, destinations"
    " FROM jobs WHERE job_id = ?"
)
RECENT_JOBS_SQL = (
    "SELECT job_id, received_at, calling_aet, called_aet, modality, sop_class_uid, routing"
    " FROM jobs ORDER BY received_at DESC LIMIT ?"
)
LATEST_OF_INSTANCE_SQL = (
    "SELECT job_id, sha256, calling_aet, matched_rules, study_instance_uid, patient_id"
    " FROM jobs WHERE sop_instance_uid = ? AND duplicate_of IS NULL"
    " ORDER BY received_at DESC LIMIT 1"
)


def due_deliveries(db: Queryable, destination: str, now: float, limit: int) -> list[Row]:
    """Up to ``limit`` pending or retrying deliveries to ``destination`` due at ``now``, with
    their job's columns the sender needs, soonest first."""
    return db.query(DUE_SQL, (destination, now, limit))


def job_exists_with_blob(db: Queryable, sha256: str) -> bool:
    """Whether any job references the stored object ``sha256`` (blob recovery at start)."""
    return bool(db.query(BLOB_IN_USE_SQL, (sha256,)))


def purge_candidates(db: Queryable, cutoff: float, limit: int) -> list[Row]:
    """Jobs (job_id, sha256, size) received before ``cutoff`` whose blob may be purged."""
    return db.query(CANDIDATES_SQL, (cutoff, cutoff, limit))


def unreferenced_purged_blobs(db: Queryable, window: float) -> list[str]:
    """sha256 of blobs purged within ``window`` seconds of the latest purge that no unpurged
    job references."""
    return [r["sha256"] for r in db.query(SWEEP_SQL, (window,))]


def delivered_destinations(db: Queryable, job_ids: Sequence[str]) -> dict[str, set[str]]:
    """Job id -> the destinations it was delivered to (jobs without any are left out)."""
    marks = ", ".join("?" for _ in job_ids)
    rows = db.query(
        f"SELECT job_id, destination FROM deliveries WHERE status = 'delivered'"
        f" AND job_id IN ({marks})", job_ids)
    out: dict[str, set[str]] = {}
    for row in rows:
        out.setdefault(row["job_id"], set()).add(row["destination"])
    return out


def deliveries_of_job(db: Queryable, job_id: str) -> list[Row]:
    """A job's deliveries: destination and stored status."""
    return db.query("SELECT destination, status FROM deliveries WHERE job_id = ?", (job_id,))


def recent_deliveries(db: Queryable, status: str | None, destination: str | None,
                      limit: int) -> list[Row]:
    """The latest deliveries, newest first (``status``: a stored status), for the CLI."""
    sql = ("SELECT d.job_id, d.destination, d.status, d.attempts, d.next_attempt_at,"
           " d.last_error FROM deliveries d WHERE 1 = 1")
    params: list[Any] = []
    if status:
        sql += " AND d.status = ?"
        params.append(status)
    if destination:
        sql += " AND d.destination = ?"
        params.append(destination)
    sql += " ORDER BY d.created_at DESC LIMIT ?"
    params.append(limit)
    return db.query(sql, params)


def dry_run_job(db: Queryable, job_id: str) -> Row | None:
    """What a dry run of a past job needs of it (None: no such job)."""
    rows = db.query(DRY_RUN_JOB_SQL, (job_id,))
    return rows[0] if rows else None


def recent_jobs(db: Queryable, limit: int) -> list[Row]:
    """The latest jobs, newest first, without patient identifiers."""
    return db.query(RECENT_JOBS_SQL, (limit,))


def latest_job_of_instance(db: Queryable, sop_instance_uid: str) -> Row | None:
    """The latest non-duplicate job storing ``sop_instance_uid`` (transform previews)."""
    rows = db.query(LATEST_OF_INSTANCE_SQL, (sop_instance_uid,))
    return rows[0] if rows else None


@dataclass(frozen=True)
class DeliverySelection:
    """Deliveries a bulk action selects: any of ``statuses`` (stored names), narrowed by
    destination, the job's receipt time [since, until) and its study."""

    statuses: tuple[str, ...]
    destination: str | None = None
    since: float | None = None
    until: float | None = None
    study_uid: str | None = None

    def where(self) -> tuple[str, list[Any]]:
        clauses = ["d.status IN (" + ", ".join("?" for _ in self.statuses) + ")"]
        params: list[Any] = list(self.statuses)
        for clause, value in (("d.destination = ?", self.destination),
                              ("j.received_at >= ?", self.since),
                              ("j.received_at < ?", self.until),
                              ("j.study_instance_uid = ?", self.study_uid)):
            if value is not None:
                clauses.append(clause)
                params.append(value)
        return " AND ".join(clauses), params


def count_deliveries(db: Queryable, selection: DeliverySelection) -> int:
    where, params = selection.where()
    rows = db.query("SELECT count(*) AS n FROM deliveries d JOIN jobs j"
                    f" ON j.job_id = d.job_id WHERE {where}", params)
    return int(rows[0]["n"])


def delivery_batch(db: Queryable, selection: DeliverySelection, after: str, limit: int
                   ) -> list[Row]:
    """The next ``limit`` selected deliveries (delivery_id, job_id, destination) after the
    delivery id ``after``, in delivery id order (keyset)."""
    where, params = selection.where()
    return db.query(
        "SELECT d.delivery_id, d.job_id, d.destination FROM deliveries d JOIN jobs j"
        f" ON j.job_id = d.job_id WHERE {where} AND d.delivery_id > ?"
        " ORDER BY d.delivery_id LIMIT ?", [*params, after, limit])


def sendable_jobs(db: Queryable, study_uid: str, series_uid: str | None,
                  routings: Sequence[str]) -> list[Row]:
    """Jobs (job_id, sop_instance_uid) of a study (series) with one of ``routings`` whose
    object is not purged, oldest first."""
    sql = ("SELECT j.job_id, j.sop_instance_uid FROM jobs j WHERE j.study_instance_uid = ?"
           " AND j.routing IN (" + ", ".join("?" for _ in routings) + ")"
           " AND NOT EXISTS (SELECT 1 FROM blob_purges p WHERE p.job_id = j.job_id)")
    params: list[Any] = [study_uid, *routings]
    if series_uid is not None:
        sql += " AND j.series_instance_uid = ?"
        params.append(series_uid)
    return db.query(sql + " ORDER BY j.received_at, j.job_id", params)


def jobs_of_instance(db: Queryable, sop_instance_uid: str) -> list[Row]:
    """Every job (job_id, sop_class_uid, sha256) that received ``sop_instance_uid``."""
    return db.query(
        "SELECT job_id, sop_class_uid, sha256 FROM jobs WHERE sop_instance_uid = ?",
        (sop_instance_uid,))


def delivery_statuses(db: Queryable, destination: str, job_ids: Sequence[str]) -> set[str]:
    """The stored statuses of the deliveries of ``job_ids`` to ``destination``."""
    marks = ",".join("?" * len(job_ids))
    return {str(r["status"]) for r in db.query(
        f"SELECT status FROM deliveries WHERE destination = ? AND job_id IN ({marks})",
        (destination, *job_ids))}
