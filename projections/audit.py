"""The ``audit`` view: one row per event of every log (time, actor, action, object, outcome,
source IP, correlation id), keyed by (application, position) so a rebuild is identical.

Study and patient identifiers are kept in their own columns for "history of this study"
queries; the detail column holds a short, PHI-free summary.
"""

from __future__ import annotations

import json
from typing import Any

from projections.db import Cursor
from projections.runner import EventRecord, View
from projections.runner import index_text as _text

AUDIT_SQL = """CREATE TABLE IF NOT EXISTS audit (
    application TEXT NOT NULL, position BIGINT NOT NULL, occurred_at DOUBLE PRECISION NOT NULL,
    actor TEXT NOT NULL, source_ip TEXT NOT NULL, action TEXT NOT NULL, object_type TEXT NOT NULL,
    object_id TEXT NOT NULL, outcome TEXT NOT NULL, correlation_id TEXT,
    study_instance_uid TEXT, patient_id TEXT, detail TEXT,
    PRIMARY KEY (application, position))"""

INDEXES = (
    "CREATE INDEX IF NOT EXISTS audit_time ON audit (occurred_at)",
    "CREATE INDEX IF NOT EXISTS audit_actor ON audit (actor)",
    "CREATE INDEX IF NOT EXISTS audit_study ON audit (study_instance_uid)",
    "CREATE INDEX IF NOT EXISTS audit_object ON audit (object_id)",
)

FAILURES = {"ReceiptFailure.Recorded", "Delivery.AttemptFailed", "Delivery.DeadLettered"}

# Fields that are safe and useful to show in the audit trail's detail column.
DETAIL_FIELDS = (
    "source", "calling_aet", "called_aet", "sop_class_uid", "transfer_syntax_uid", "size",
    "destinations", "unrouted", "default_destination_used", "matched_rules", "status",
    "reason", "destination", "attempt", "error", "retry_at", "detail", "permanent",
    "original_job_id", "job_id", "name", "duration_ms",
)


def _detail(event: Any) -> str:
    out = {f: getattr(event, f) for f in DETAIL_FIELDS if hasattr(event, f)}
    return json.dumps(out, sort_keys=True, default=str)


class AuditView(View):
    name = "audit"
    follows = ("ingest", "delivery", "admin")
    tables = ("audit",)

    def create(self, cur: Cursor, dialect: str) -> None:
        for sql in (AUDIT_SQL, *INDEXES):
            cur.execute(sql)

    def apply(self, cur: Cursor, record: EventRecord) -> None:
        e = record.event
        index = getattr(e, "index", None) or {}
        object_type = record.topic.split(".", 1)[0].lower()
        cur.execute(
            "INSERT INTO audit (application, position, occurred_at, actor, source_ip, action,"
            " object_type, object_id, outcome, correlation_id, study_instance_uid, patient_id,"
            " detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (application, position) DO NOTHING",
            (record.application, record.position, record.timestamp,
             getattr(e, "actor", "system"), getattr(e, "source_ip", ""), record.topic,
             object_type, record.originator_id,
             "failure" if record.topic in FAILURES else "success",
             getattr(e, "correlation_id", None), _text(index.get("StudyInstanceUID")),
             _text(index.get("PatientID")), _detail(e)),
        )
