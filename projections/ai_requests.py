"""The AI part of the ``jobs`` view: one row per AI request (status, attempts, deadline,
result tags, turnaround) and the jobs it covers. The AI worker's queue is this table; each
covered job's delivery row to the AI destination mirrors the round trip, so job pages and
filters show it like any delivery.

A request row is opened by ``Unit.Dispatched``/``Amended`` (ingest log) and filled by the
``AIRequest`` events (delivery log); both upsert, so either log may be applied first.
"""

from __future__ import annotations

import json
from typing import Any

from projections.db import Cursor
from projections.runner import EventRecord
from router.domain.delivery import delivery_id

AI_REQUESTS_SQL = """CREATE TABLE IF NOT EXISTS ai_requests (
    request_id TEXT PRIMARY KEY, destination TEXT NOT NULL, unit_id TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL, amendment INTEGER NOT NULL DEFAULT 0,
    status TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, created_at DOUBLE PRECISION,
    clock_from DOUBLE PRECISION, requested_at DOUBLE PRECISION, accepted_at DOUBLE PRECISION,
    deadline DOUBLE PRECISION, next_attempt_at DOUBLE PRECISION,
    completed_at DOUBLE PRECISION, result_status TEXT, tags TEXT, result_count INTEGER,
    last_error TEXT, deidentified INTEGER NOT NULL DEFAULT 0)"""
AI_JOBS_SQL = """CREATE TABLE IF NOT EXISTS ai_request_jobs (
    request_id TEXT NOT NULL, job_id TEXT NOT NULL, PRIMARY KEY (request_id, job_id))"""
AI_INDEXES = (
    "CREATE INDEX IF NOT EXISTS ai_requests_queue ON ai_requests (destination, status)",
    "CREATE INDEX IF NOT EXISTS ai_requests_study ON ai_requests (study_instance_uid)",
    "CREATE INDEX IF NOT EXISTS ai_request_jobs_job ON ai_request_jobs (job_id)",
)
AI_TABLES = ("ai_requests", "ai_request_jobs")

_OPEN_ROW = (
    "INSERT INTO ai_requests (request_id, destination, unit_id, study_instance_uid, amendment,"
    " status, created_at, clock_from) VALUES (?, ?, ?, ?, ?, 'pending', ?, ?)"
    " ON CONFLICT (request_id) DO UPDATE SET created_at = COALESCE(ai_requests.created_at,"
    " excluded.created_at), clock_from = COALESCE(ai_requests.clock_from, excluded.clock_from)"
)
_JOB_DELIVERY = (
    "INSERT INTO deliveries (delivery_id, job_id, destination, status, attempts, created_at,"
    " clock_from, last_attempt_at, last_error, detail, next_attempt_at, delivered_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (delivery_id) DO UPDATE SET"
    " status = excluded.status, attempts = excluded.attempts,"
    " last_attempt_at = excluded.last_attempt_at, last_error = excluded.last_error,"
    " detail = excluded.detail, next_attempt_at = excluded.next_attempt_at,"
    " delivered_at = excluded.delivered_at"
)


def tags_summary(tags: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(tags.items()))[:500]


class AIRequestHandlers:
    """Mixed into the jobs view: the AI request tables and their handlers."""

    def create_ai(self, cur: Cursor) -> None:
        for sql in (AI_REQUESTS_SQL, AI_JOBS_SQL, *AI_INDEXES):
            cur.execute(sql)

    def open_request(self, cur: Cursor, r: EventRecord, request_id: str, unit: dict[str, Any],
                     job_ids: list[str], amendment: bool) -> None:
        cur.execute(_OPEN_ROW, (request_id, unit["destination"], r.originator_id,
                                unit["study_instance_uid"], int(amendment), r.timestamp,
                                r.timestamp))
        self._link(cur, request_id, job_ids)

    def _link(self, cur: Cursor, request_id: str, job_ids: list[str]) -> None:
        for job_id in job_ids:
            cur.execute("INSERT INTO ai_request_jobs (request_id, job_id) VALUES (?, ?)"
                        " ON CONFLICT (request_id, job_id) DO NOTHING", (request_id, job_id))

    def _row(self, cur: Cursor, request_id: str) -> Any:
        cur.execute("SELECT destination, created_at FROM ai_requests WHERE request_id = ?",
                    (request_id,))
        return cur.fetchone()

    def _mirror(self, cur: Cursor, r: EventRecord, status: str, *, attempts: int,
                error: str | None = None, detail: str | None = None,
                retry_at: float | None = None) -> None:
        """Set the delivery row of every job of the request to the round trip's state."""
        row = self._row(cur, r.originator_id)
        if row is None:
            return
        cur.execute("SELECT job_id FROM ai_request_jobs WHERE request_id = ?",
                    (r.originator_id,))
        delivered = r.timestamp if status == "delivered" else None
        for job in cur.fetchall():
            cur.execute(_JOB_DELIVERY, (
                str(delivery_id(job["job_id"], row["destination"])), job["job_id"],
                row["destination"], status, attempts, row["created_at"] or r.timestamp,
                row["created_at"] or r.timestamp, r.timestamp, error, detail, retry_at,
                delivered))

    def _update(self, cur: Cursor, r: EventRecord, **values: Any) -> None:
        columns = ", ".join(f"{k} = ?" for k in values)
        cur.execute(f"UPDATE ai_requests SET {columns} WHERE request_id = ?",
                    (*values.values(), r.originator_id))

    def _AIRequest_Requested(self, cur: Cursor, r: EventRecord) -> None:
        e = r.event
        cur.execute(_OPEN_ROW, (r.originator_id, e.destination, e.unit_id,
                                e.study_instance_uid, int(e.amendment), r.timestamp,
                                r.timestamp))
        self._link(cur, r.originator_id, list(e.job_ids))
        self._update(cur, r, status="requested", attempts=1, requested_at=r.timestamp,
                     deidentified=int(e.deidentified), next_attempt_at=None)
        self._mirror(cur, r, "pending", attempts=1, detail="sent to the AI processor")

    def _AIRequest_Resent(self, cur: Cursor, r: EventRecord) -> None:
        attempt = r.event.attempt
        self._update(cur, r, status="requested", attempts=attempt, next_attempt_at=None)
        self._mirror(cur, r, "pending", attempts=attempt,
                     detail=f"sent to the AI processor (attempt {attempt})")

    def _AIRequest_Accepted(self, cur: Cursor, r: EventRecord) -> None:
        e = r.event
        self._update(cur, r, status="accepted", accepted_at=r.timestamp, deadline=e.deadline)
        self._mirror(cur, r, "pending", attempts=e.attempt,
                     detail=f"accepted (HTTP {e.http_status}); waiting for the result")

    def _AIRequest_AttemptFailed(self, cur: Cursor, r: EventRecord) -> None:
        e = r.event
        self._update(cur, r, status="retrying", next_attempt_at=e.retry_at, last_error=e.error)
        self._mirror(cur, r, "retrying", attempts=e.attempt, error=e.error, retry_at=e.retry_at)

    def _AIRequest_TimedOut(self, cur: Cursor, r: EventRecord) -> None:
        e = r.event
        error = "no callback from the AI processor before the deadline"
        self._update(cur, r, status="retrying", next_attempt_at=e.retry_at, last_error=error)
        self._mirror(cur, r, "retrying", attempts=e.attempt, error=error, retry_at=e.retry_at)

    def _AIRequest_DeadLettered(self, cur: Cursor, r: EventRecord) -> None:
        e = r.event
        self._update(cur, r, status="dead", next_attempt_at=None, last_error=e.reason)
        self._mirror(cur, r, "dead", attempts=e.attempt, error=e.reason)

    def _AIRequest_ResultReceived(self, cur: Cursor, r: EventRecord) -> None:
        e = r.event
        tags = dict(e.tags)
        self._update(cur, r, status=e.status, completed_at=r.timestamp, result_status=e.status,
                     tags=json.dumps(tags, sort_keys=True),
                     result_count=len(e.result_job_ids), next_attempt_at=None)
        cur.execute("SELECT attempts FROM ai_requests WHERE request_id = ?", (r.originator_id,))
        found = cur.fetchone()
        attempts = int(found["attempts"]) if found else 1
        if e.status == "completed":
            self._mirror(cur, r, "delivered", attempts=attempts,
                         detail=f"AI result: {tags_summary(tags) or 'no tags'}")
        else:
            self._mirror(cur, r, "dead", attempts=attempts,
                         error=f"the AI processor reported a failure: {e.detail}"[:1000])

    def _AIRequest_Requeued(self, cur: Cursor, r: EventRecord) -> None:
        self._update(cur, r, status="retrying", next_attempt_at=None, clock_from=r.timestamp)
        cur.execute("SELECT attempts FROM ai_requests WHERE request_id = ?", (r.originator_id,))
        found = cur.fetchone()
        self._mirror(cur, r, "pending", attempts=int(found["attempts"]) if found else 0,
                     detail="requeued by an operator")
