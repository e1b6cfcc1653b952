"""The Storage Commitment part of the ``jobs`` view: one row per commitment request (who
asked, what, in which mode, whether and how it was reported). The commitment worker's queue
of outstanding reports is this table (``status = 'pending'``); the audit view shows the events.
"""

from __future__ import annotations

from typing import Any

from projections.db import Cursor
from projections.runner import EventRecord

COMMITMENTS_SQL = """CREATE TABLE IF NOT EXISTS storage_commitments (
    commitment_id TEXT PRIMARY KEY, transaction_uid TEXT NOT NULL, calling_aet TEXT NOT NULL,
    node TEXT, destination TEXT NOT NULL, instances INTEGER NOT NULL, status TEXT NOT NULL,
    requested_at DOUBLE PRECISION NOT NULL, deadline DOUBLE PRECISION NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at DOUBLE PRECISION, last_error TEXT,
    reported_at DOUBLE PRECISION, event_type INTEGER, committed INTEGER, failed INTEGER,
    via TEXT)"""
COMMITMENT_INDEXES = (
    "CREATE INDEX IF NOT EXISTS storage_commitments_status"
    " ON storage_commitments (status, next_attempt_at)",
    # Commitment checks look instances up by UID.
    "CREATE INDEX IF NOT EXISTS jobs_sop_instance ON jobs (sop_instance_uid)",
)
COMMITMENT_TABLES = ("storage_commitments",)


class CommitmentHandlers:
    """Mixed into the jobs view: the storage_commitments table and its handlers."""

    def create_commitments(self, cur: Cursor) -> None:
        for sql in (COMMITMENTS_SQL, *COMMITMENT_INDEXES):
            cur.execute(sql)

    def _set_commitment(self, cur: Cursor, r: EventRecord, **values: Any) -> None:
        columns = ", ".join(f"{k} = ?" for k in values)
        cur.execute(f"UPDATE storage_commitments SET {columns} WHERE commitment_id = ?",
                    (*values.values(), str(r.originator_id)))

    def _Commitment_Requested(self, cur: Cursor, r: EventRecord) -> None:
        e = r.event
        cur.execute(
            "INSERT INTO storage_commitments (commitment_id, transaction_uid, calling_aet, node,"
            " destination, instances, status, requested_at, deadline)"
            " VALUES (?, ?, ?, ?, ?, ?, 'pending', ?, ?) ON CONFLICT (commitment_id) DO NOTHING",
            (str(r.originator_id), e.transaction_uid, e.calling_aet, e.node or None,
             e.destination, len(e.references), r.timestamp, e.deadline))

    def _Commitment_Reported(self, cur: Cursor, r: EventRecord) -> None:
        e = r.event
        self._set_commitment(cur, r, status="reported", reported_at=r.timestamp,
                             event_type=e.event_type, committed=e.committed, failed=e.failed,
                             via=e.via, next_attempt_at=None)

    def _Commitment_ReportFailed(self, cur: Cursor, r: EventRecord) -> None:
        e = r.event
        self._set_commitment(cur, r, attempts=e.attempt, last_error=e.error,
                             next_attempt_at=e.retry_at)

    def _Commitment_Abandoned(self, cur: Cursor, r: EventRecord) -> None:
        e = r.event
        self._set_commitment(cur, r, status="abandoned", attempts=e.attempt,
                             last_error=e.reason, next_attempt_at=None)
