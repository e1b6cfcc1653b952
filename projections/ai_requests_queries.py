"""Reads of AI round trips from the jobs view: the request list, a job's and a study's round
trips with their result tags, and turnaround times per AI destination for the dashboard.
"""

from __future__ import annotations

import json
from typing import Any

from projections.db import Queryable, ViewDatabase

COLUMNS = (
    "r.request_id, r.destination, r.study_instance_uid, r.amendment, r.status, r.attempts,"
    " r.created_at, r.requested_at, r.accepted_at, r.deadline, r.next_attempt_at,"
    " r.completed_at, r.result_status, r.tags, r.result_count, r.last_error, r.deidentified"
)


def _shaped(row: dict[str, Any]) -> dict[str, Any]:
    row["tags"] = json.loads(row["tags"]) if row.get("tags") else {}
    row["amendment"] = bool(row["amendment"])
    row["deidentified"] = bool(row["deidentified"])
    done, started = row.get("completed_at"), row.get("created_at")
    row["turnaround"] = done - started if done is not None and started is not None else None
    return row


def list_requests(db: ViewDatabase, destination: str | None, study: str | None, limit: int,
                  offset: int) -> list[dict[str, Any]]:
    clauses, params = [], []
    if destination is not None:
        clauses.append("r.destination = ?")
        params.append(destination)
    if study is not None:
        clauses.append("r.study_instance_uid = ?")
        params.append(study)
    where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
    rows = db.query(f"SELECT {COLUMNS} FROM ai_requests r{where}"
                    " ORDER BY r.created_at DESC, r.request_id LIMIT ? OFFSET ?",
                    [*params, limit, offset])
    return [_shaped(r) for r in rows]


def requests_for_job(db: ViewDatabase, job_id: str) -> list[dict[str, Any]]:
    rows = db.query(f"SELECT {COLUMNS} FROM ai_requests r JOIN ai_request_jobs j"
                    " ON j.request_id = r.request_id WHERE j.job_id = ?"
                    " ORDER BY r.created_at, r.request_id", (job_id,))
    return [_shaped(r) for r in rows]


def requests_for_study(db: ViewDatabase, study: str) -> list[dict[str, Any]]:
    return list_requests(db, None, study, 100, 0)


def turnaround(db: ViewDatabase, since: float) -> list[dict[str, Any]]:
    """Per AI destination: completed round trips since ``since``, their average and slowest
    turnaround (released to result, seconds), and how many are still open or dead."""
    rows = db.query(
        "SELECT destination, count(*) AS requests,"
        " sum(CASE WHEN completed_at IS NOT NULL THEN 1 ELSE 0 END) AS completed,"
        " avg(CASE WHEN completed_at IS NOT NULL THEN completed_at - created_at END) AS average,"
        " max(CASE WHEN completed_at IS NOT NULL THEN completed_at - created_at END) AS slowest,"
        " sum(CASE WHEN status IN ('pending', 'requested', 'accepted', 'retrying') THEN 1"
        " ELSE 0 END) AS open, sum(CASE WHEN status = 'dead' THEN 1 ELSE 0 END) AS dead"
        " FROM ai_requests WHERE created_at >= ? GROUP BY destination ORDER BY destination",
        (since,))
    return [{**r, "average": float(r["average"]) if r["average"] is not None else None,
             "slowest": float(r["slowest"]) if r["slowest"] is not None else None}
            for r in rows]


# --- the AI worker's reads (router/ai/worker.py, router/ai/requests.py) ----------------------
DUE_SQL = (
    "SELECT * FROM ai_requests WHERE destination = ? AND status IN ('pending', 'retrying')"
    " AND COALESCE(next_attempt_at, 0) <= ? ORDER BY COALESCE(next_attempt_at, 0), created_at"
    " LIMIT 50"
)
OVERDUE_SQL = ("SELECT * FROM ai_requests WHERE status = 'accepted' AND deadline <= ?"
               " ORDER BY deadline LIMIT 100")
MEMBERS_SQL = (
    "SELECT j.job_id, j.sha256, j.series_instance_uid, j.sop_instance_uid"
    " FROM ai_request_jobs r JOIN jobs j ON j.job_id = r.job_id WHERE r.request_id = ?"
    " ORDER BY j.series_instance_uid, j.received_at, j.job_id"
)


def due_requests(db: Queryable, destination: str, now: float) -> list[dict[str, Any]]:
    """Up to 50 pending or retrying requests to ``destination`` due at ``now``."""
    return db.query(DUE_SQL, (destination, now))


def overdue_requests(db: Queryable, now: float) -> list[dict[str, Any]]:
    """Up to 100 accepted requests whose callback deadline has passed."""
    return db.query(OVERDUE_SQL, (now,))


def request_members(db: Queryable, request_id: str) -> list[dict[str, Any]]:
    """The jobs a request covers (job_id, sha256, series and SOP instance UIDs), by series."""
    return db.query(MEMBERS_SQL, (request_id,))
