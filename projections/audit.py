"""The ``audit`` view: one row per event of every log (time, actor, action, object, outcome,
source IP, correlation id), keyed by (application, position) so a rebuild is identical.

Study and patient identifiers are kept in their own columns for "history of this study"
queries; the detail column holds a short, PHI-free JSON summary built from an allow-list of
event fields (never password or token hashes, destination configs or rule criteria).
"""

from __future__ import annotations

import json
from typing import Any

from projections.audit_chain import CHAIN_SQL, ChainWriter, needs_rebuild
from projections.db import Cursor
from projections.positions import forget_positions
from projections.runner import EventRecord, View, existing_columns
from projections.runner import index_text as _text

AUDIT_SQL = """CREATE TABLE IF NOT EXISTS audit (
    application TEXT NOT NULL, position BIGINT NOT NULL, occurred_at DOUBLE PRECISION NOT NULL,
    actor TEXT NOT NULL, source_ip TEXT NOT NULL, action TEXT NOT NULL, object_type TEXT NOT NULL,
    object_id TEXT NOT NULL, outcome TEXT NOT NULL, correlation_id TEXT,
    study_instance_uid TEXT, patient_id TEXT, detail TEXT, job_id TEXT,
    PRIMARY KEY (application, position))"""

# The study and patient of each job, so that delivery rows (whose events carry only the job
# id) can be found by "history of this study". The delivery log may be read before the ingest
# log: rows are filled in when the job's receipt arrives, so the result does not depend on
# the order the logs are read in.
JOBS_SQL = """CREATE TABLE IF NOT EXISTS audit_jobs (
    job_id TEXT PRIMARY KEY, study_instance_uid TEXT, patient_id TEXT)"""
# Later delivery events carry only the delivery id; its Created event (always first, same log)
# says which job it belongs to.
DELIVERIES_SQL = """CREATE TABLE IF NOT EXISTS audit_deliveries (
    delivery_id TEXT PRIMARY KEY, job_id TEXT NOT NULL)"""
# The name of each rule, destination and user (given in its Created event, same log), so
# that the rows of later changes say which one changed.
NAMES_SQL = """CREATE TABLE IF NOT EXISTS audit_names (
    object_id TEXT PRIMARY KEY, name TEXT NOT NULL)"""

INDEXES = (
    "CREATE INDEX IF NOT EXISTS audit_time ON audit (occurred_at)",
    # Searches by user compare lower(actor); nothing reads actor by its exact value.
    "CREATE INDEX IF NOT EXISTS audit_actor_lower ON audit (lower(actor))",
    "DROP INDEX IF EXISTS audit_actor",  # made by versions before 2026-12-07
    "CREATE INDEX IF NOT EXISTS audit_action ON audit (action, occurred_at)",
    "CREATE INDEX IF NOT EXISTS audit_study ON audit (study_instance_uid)",
    "CREATE INDEX IF NOT EXISTS audit_object ON audit (object_id)",
    "CREATE INDEX IF NOT EXISTS audit_job ON audit (job_id)",
    # The patient access report (one patient's rows in a period) and every search by patient:
    # an index on patient_id alone would be its prefix, one more index to write per row.
    "CREATE INDEX IF NOT EXISTS audit_patient_time ON audit (patient_id, occurred_at)",
    "DROP INDEX IF EXISTS audit_patient",  # made by versions before 2026-12-07
    # Rows that name a study but not yet its patient (viewer opens, accesses read before the
    # receipt): filled in when the study's receipt is applied.
    "CREATE INDEX IF NOT EXISTS audit_study_no_patient ON audit (study_instance_uid)"
    " WHERE patient_id IS NULL",
    "CREATE INDEX IF NOT EXISTS audit_jobs_study ON audit_jobs (study_instance_uid)",
)

FAILURES = {"ReceiptFailure.Recorded", "Delivery.AttemptFailed", "Delivery.DeadLettered",
            "LoginFailure.Recorded", "Retrieve.Failed", "Commitment.ReportFailed",
            "Commitment.Abandoned", "AssociationRefusal.Recorded"}

# Fields that are safe and useful to show in the audit trail's detail column. Anything not
# listed (index, config, spec, password_hash, token_hash) never reaches the view.
DETAIL_FIELDS = (
    "source", "calling_aet", "called_aet", "sop_class_uid", "transfer_syntax_uid", "size",
    "destinations", "unrouted", "default_destination_used", "matched_rules", "status",
    "reason", "destination", "attempt", "error", "retry_at", "detail", "permanent",
    "original_job_id", "job_id", "name", "duration_ms", "role", "token_id", "label", "kind",
    "expires_at", "stopped_by", "value", "previous", "node", "node_ae", "method", "level",
    "completed", "failed", "warning", "remaining", "transaction_uid", "event_type",
    "committed", "via", "operation", "criteria", "matched", "count", "transforms",
    "project",
)
# What a rule change shows of the rule: not its criteria, which may quote tag values.
RULE_SUMMARY = ("priority", "enabled", "destinations", "stop")

_INSERT = (
    "INSERT INTO audit (application, position, occurred_at, actor, source_ip, action,"
    " object_type, object_id, outcome, correlation_id, study_instance_uid, patient_id,"
    " detail, job_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (application, position) DO NOTHING"
)


_COLUMNS = ("application", "position", "occurred_at", "actor", "source_ip", "action",
            "object_type", "object_id", "outcome", "correlation_id", "study_instance_uid",
            "patient_id", "detail", "job_id")
_DETAIL_SET = frozenset(DETAIL_FIELDS)


def _fields(event: Any) -> dict[str, Any]:
    # An event's fields are its instance attributes: no event class has one of these names
    # as a class attribute (tests/unit/test_audit_fields.py checks), so scanning its
    # __dict__ once replaces 38 hasattr calls per event.
    return {f: v for f, v in vars(event).items() if f in _DETAIL_SET}


def _dump(detail: dict[str, Any]) -> str:
    return json.dumps(detail, sort_keys=True, default=str)


class Links:
    """Which job each delivery belongs to, and each job's study and patient: facts that never
    change once recorded, remembered here as the view writes them to audit_deliveries and
    audit_jobs, so that most rows need no query back (each was a round trip on PostgreSQL,
    four per instance). Bounded: forgotten at once past ``LIMIT`` entries, then read back."""

    LIMIT = 100_000

    def __init__(self) -> None:
        self.job_of: dict[str, str] = {}
        self.study_of: dict[str, tuple[str | None, str | None]] = {}

    def remember_delivery(self, delivery_id: str, job_id: str | None) -> None:
        if job_id:
            if len(self.job_of) >= self.LIMIT:
                self.job_of.clear()
            self.job_of[delivery_id] = job_id

    def remember_job(self, job_id: str, study: str | None, patient: str | None) -> None:
        if len(self.study_of) >= self.LIMIT:
            self.study_of.clear()
        self.study_of[job_id] = (study, patient)


class AuditView(View):
    name = "audit"
    follows = ("ingest", "delivery", "admin", "access")
    tables = ("audit", "audit_jobs", "audit_deliveries", "audit_names", "audit_chain")

    def __init__(self) -> None:
        self.links = Links()
        self._chain = ChainWriter()  # each row's hash link (projections/audit_chain.py)

    def create(self, cur: Cursor, dialect: str) -> None:
        if needs_rebuild(cur, lambda c, table: existing_columns(c, dialect, table)):
            for table in self.tables:  # built before the chain: replayed with it
                cur.execute(f"DROP TABLE IF EXISTS {table}")
            forget_positions(cur, self.name)
        for sql in (AUDIT_SQL, JOBS_SQL, DELIVERIES_SQL, NAMES_SQL, CHAIN_SQL, *INDEXES):
            cur.execute(sql)

    def begin_batch(self, cur: Cursor) -> None:
        self._chain.begin()

    def end_batch(self, cur: Cursor) -> None:
        self._chain.end(cur)

    def apply(self, cur: Cursor, record: EventRecord) -> None:
        e = record.event
        row = _row(record)
        if record.application == "admin":
            row["detail"] = _dump(_admin_detail(cur, record))
        elif record.topic.startswith("Delivery."):
            _link_delivery(cur, record, row, self.links)
        _link_job(cur, record, row, self.links)
        if record.topic == "Access.Recorded":
            _link_patient(cur, row)
        values = (
            record.application, record.position, record.timestamp,
            getattr(e, "actor", "system"), getattr(e, "source_ip", ""), row["action"],
            row["object_type"], row["object_id"], row["outcome"],
            getattr(e, "correlation_id", None), row["study"], row["patient"], row["detail"],
            row["job_id"])
        cur.execute(_INSERT, values)
        self._chain.add(dict(zip(_COLUMNS, values, strict=True)))


def _row(record: EventRecord) -> dict[str, Any]:
    """Action, object, outcome, job, study and patient of one event."""
    e = record.event
    if record.topic == "Access.Recorded":
        return {"action": e.action, "object_type": e.object_type, "object_id": e.object_id,
                "outcome": e.outcome, "study": _text(e.study_instance_uid),
                "patient": _text(e.patient_id),
                "job_id": e.object_id if e.object_type == "job" and e.object_id else None,
                "detail": _dump({"detail": e.detail})}
    index = getattr(e, "index", None) or {}
    job_id = None
    if record.topic.startswith("Job."):
        job_id = record.originator_id
    elif record.topic.startswith(("Delivery.", "Instance.")):
        job_id = getattr(e, "job_id", None)
    return {"action": record.topic, "object_type": record.topic.split(".", 1)[0].lower(),
            "object_id": record.originator_id,
            "outcome": "failure" if record.topic in FAILURES else "success",
            "study": _text(index.get("StudyInstanceUID")),
            "patient": _text(index.get("PatientID")), "job_id": job_id,
            "detail": _dump(_fields(e))}


def _admin_detail(cur: Cursor, record: EventRecord) -> dict[str, Any]:
    """Name and version of the rule, destination or user changed, and a safe summary."""
    e = record.event
    detail = _fields(e)
    name = getattr(e, "name", None)
    if isinstance(name, str):
        cur.execute("INSERT INTO audit_names (object_id, name) VALUES (?, ?)"
                    " ON CONFLICT (object_id) DO UPDATE SET name = excluded.name",
                    (record.originator_id, name))
    else:
        cur.execute("SELECT name FROM audit_names WHERE object_id = ?", (record.originator_id,))
        found = cur.fetchone()
        name = found["name"] if found is not None else None
    detail["name"] = name
    detail["version"] = e.originator_version
    spec = getattr(e, "spec", None)
    if isinstance(spec, dict) and record.topic.startswith("Transform."):
        detail["kind"] = spec.get("kind")  # not its options: a pattern may quote an ID
    elif isinstance(spec, dict):
        detail.update({key: spec.get(key) for key in RULE_SUMMARY})
    config = getattr(e, "config", None)
    if isinstance(config, dict) and "type" in config:
        detail["type"] = config["type"]
    return detail


def _link_delivery(cur: Cursor, record: EventRecord, row: dict[str, Any],
                   links: Links) -> None:
    """Remember each delivery's job; later events of the delivery carry only its id."""
    if record.topic == "Delivery.Created":
        cur.execute("INSERT INTO audit_deliveries (delivery_id, job_id) VALUES (?, ?)"
                    " ON CONFLICT (delivery_id) DO NOTHING",
                    (record.originator_id, row["job_id"]))
        links.remember_delivery(record.originator_id, row["job_id"])
        return
    known = links.job_of.get(record.originator_id)
    if known is not None:
        row["job_id"] = known
        return
    cur.execute("SELECT job_id FROM audit_deliveries WHERE delivery_id = ?",
                (record.originator_id,))
    found = cur.fetchone()
    row["job_id"] = found["job_id"] if found is not None else None
    links.remember_delivery(record.originator_id, row["job_id"])


def _link_job(cur: Cursor, record: EventRecord, row: dict[str, Any], links: Links) -> None:
    """Tie rows of a job to its study and patient, whichever log is read first."""
    if record.topic == "Job.Received":
        links.remember_job(row["job_id"], row["study"], row["patient"])
        cur.execute("INSERT INTO audit_jobs (job_id, study_instance_uid, patient_id)"
                    " VALUES (?, ?, ?) ON CONFLICT (job_id) DO UPDATE SET"
                    " study_instance_uid = excluded.study_instance_uid,"
                    " patient_id = excluded.patient_id",
                    (row["job_id"], row["study"], row["patient"]))
        # The job's rows read before its receipt, and (one statement: one round trip)
        # access rows of its study that have no patient yet (see _link_patient).
        cur.execute("UPDATE audit SET study_instance_uid = ?, patient_id = ?"
                    " WHERE (job_id = ? AND study_instance_uid IS NULL)"
                    " OR (study_instance_uid = ? AND patient_id IS NULL)",
                    (row["study"], row["patient"], row["job_id"],
                     row["study"] if row["patient"] else None))
    elif row["job_id"] and row["study"] is None:
        known = links.study_of.get(row["job_id"])
        if known is not None:
            row["study"], row["patient"] = known
            return
        cur.execute("SELECT study_instance_uid, patient_id FROM audit_jobs WHERE job_id = ?",
                    (row["job_id"],))
        found = cur.fetchone()
        if found is not None:
            row["study"] = found["study_instance_uid"]
            row["patient"] = found["patient_id"]
            links.remember_job(row["job_id"], row["study"], row["patient"])


def _link_patient(cur: Cursor, row: dict[str, Any]) -> None:
    """Give an access row that names a study but no patient (a viewer open, a failed
    retrieval) the patient of the study's receipt. Rows written before the receipt get it
    from the receipt (``_link_job``), so the result does not depend on the order of the logs.
    """
    if row["study"] and not row["patient"]:
        cur.execute("SELECT patient_id FROM audit_jobs WHERE study_instance_uid = ?"
                    " AND patient_id IS NOT NULL LIMIT 1", (row["study"],))
        found = cur.fetchone()
        if found is not None:
            row["patient"] = found["patient_id"]
