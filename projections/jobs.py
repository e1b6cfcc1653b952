"""The ``jobs`` view: one row per receipt and one per delivery (status, attempts, next retry,
last error), and one per job whose stored object retention purged. The dispatcher's queue is
this view; the UI and API read it too.

Rows are written so that applying the ingest and delivery logs in either order gives the same
tables (a rebuild may interleave them differently from live processing).
"""

from __future__ import annotations

import json

from projections.ai_requests import AI_TABLES, AIRequestHandlers
from projections.commitments import COMMITMENT_TABLES, COMMITMENTS_SQL, CommitmentHandlers
from projections.db import Cursor
from projections.runner import EventRecord, View, drop_if_outdated
from projections.runner import index_text as _text
from projections.study_keys import series_key, study_key, transfer_id
from projections.units import UNIT_TABLES, UnitHandlers
from router.domain.delivery import delivery_id

JOBS_SQL = """CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY, received_at DOUBLE PRECISION NOT NULL, source TEXT NOT NULL,
    actor TEXT NOT NULL, source_ip TEXT NOT NULL, calling_aet TEXT NOT NULL,
    called_aet TEXT NOT NULL, sop_class_uid TEXT NOT NULL, sop_instance_uid TEXT NOT NULL,
    study_instance_uid TEXT, series_instance_uid TEXT, modality TEXT, patient_id TEXT,
    sha256 TEXT NOT NULL, size BIGINT NOT NULL, transfer_syntax_uid TEXT NOT NULL,
    routing TEXT NOT NULL, matched_rules TEXT, destinations TEXT, duplicate_of TEXT,
    previous_job_id TEXT, correlation_id TEXT, node TEXT, transfer_id TEXT,
    patient_name TEXT, study_description TEXT, study_date TEXT, series_number INTEGER,
    series_description TEXT, instance_number INTEGER)"""

DELIVERIES_SQL = """CREATE TABLE IF NOT EXISTS deliveries (
    delivery_id TEXT PRIMARY KEY, job_id TEXT NOT NULL, destination TEXT NOT NULL,
    status TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, created_at DOUBLE PRECISION,
    next_attempt_at DOUBLE PRECISION, last_attempt_at DOUBLE PRECISION, last_error TEXT,
    delivered_at DOUBLE PRECISION, detail TEXT, clock_from DOUBLE PRECISION, last_node TEXT,
    last_failed_at DOUBLE PRECISION, last_failure TEXT, transfer_id TEXT)"""

# One row per transfer: the instances of one study sent by one calling AE title (see
# projections/study_keys.py). Counts and progress come from the jobs and deliveries rows of
# the transfer (jobs_transfer index); this table is what the transfers list pages through.
TRANSFERS_SQL = """CREATE TABLE IF NOT EXISTS transfers (
    transfer_id TEXT PRIMARY KEY, study_instance_uid TEXT NOT NULL,
    study_uid_derived INTEGER NOT NULL DEFAULT 0, calling_aet TEXT NOT NULL,
    patient_name TEXT, patient_id TEXT, study_description TEXT, study_date TEXT,
    modality TEXT, receipts INTEGER NOT NULL DEFAULT 0,
    first_received_at DOUBLE PRECISION NOT NULL, last_received_at DOUBLE PRECISION NOT NULL)"""

FAILURES_SQL = """CREATE TABLE IF NOT EXISTS receipt_failures (
    failure_id TEXT PRIMARY KEY, failed_at DOUBLE PRECISION NOT NULL, source TEXT NOT NULL,
    source_ip TEXT NOT NULL, calling_aet TEXT NOT NULL, called_aet TEXT NOT NULL,
    status INTEGER NOT NULL, reason TEXT NOT NULL, sop_instance_uid TEXT)"""

# One row per job whose stored object retention purged (Job.BlobPurged); purge_id is the
# correlation id of the purge run, so a run's jobs, blobs and bytes can be summed.
PURGES_SQL = """CREATE TABLE IF NOT EXISTS blob_purges (
    job_id TEXT PRIMARY KEY, purge_id TEXT NOT NULL, purged_at DOUBLE PRECISION NOT NULL,
    actor TEXT NOT NULL, sha256 TEXT NOT NULL, size BIGINT NOT NULL)"""

INDEXES = (
    "CREATE INDEX IF NOT EXISTS jobs_sha ON jobs (sha256)",
    "CREATE INDEX IF NOT EXISTS jobs_received ON jobs (received_at)",
    "CREATE INDEX IF NOT EXISTS jobs_study ON jobs (study_instance_uid)",
    "CREATE INDEX IF NOT EXISTS deliveries_queue"
    " ON deliveries (destination, status, next_attempt_at)",
    "CREATE INDEX IF NOT EXISTS deliveries_job ON deliveries (job_id)",
    "CREATE INDEX IF NOT EXISTS deliveries_failed ON deliveries (destination, last_failed_at)",
    "CREATE INDEX IF NOT EXISTS jobs_transfer"
    " ON jobs (transfer_id, series_instance_uid, sop_instance_uid, routing)",
    "CREATE INDEX IF NOT EXISTS deliveries_transfer"
    " ON deliveries (transfer_id, status, destination)",
    "CREATE INDEX IF NOT EXISTS transfers_last ON transfers (last_received_at)",
    "CREATE INDEX IF NOT EXISTS transfers_study ON transfers (study_instance_uid)",
    "CREATE INDEX IF NOT EXISTS blob_purges_run ON blob_purges (purge_id)",
    "CREATE INDEX IF NOT EXISTS blob_purges_sha ON blob_purges (sha256)",
)

_UPSERT_DELIVERY = (
    "INSERT INTO deliveries (delivery_id, job_id, destination, status, attempts, created_at,"
    " clock_from) VALUES (?, ?, ?, 'pending', 0, ?, ?)"
    " ON CONFLICT (delivery_id) DO UPDATE SET created_at = excluded.created_at,"
    " clock_from = COALESCE(deliveries.clock_from, excluded.clock_from)"
)


class JobsView(AIRequestHandlers, CommitmentHandlers, UnitHandlers, View):
    name = "jobs"
    follows = ("ingest", "delivery")
    tables = ("jobs", "deliveries", "transfers", "receipt_failures", "blob_purges",
              *UNIT_TABLES, *AI_TABLES, *COMMITMENT_TABLES)

    def create(self, cur: Cursor, dialect: str) -> None:
        drop_if_outdated(self, cur, dialect, {"jobs": JOBS_SQL, "deliveries": DELIVERIES_SQL,
                                              "transfers": TRANSFERS_SQL,
                                              "storage_commitments": COMMITMENTS_SQL})
        for sql in (JOBS_SQL, DELIVERIES_SQL, TRANSFERS_SQL, FAILURES_SQL, PURGES_SQL,
                    *INDEXES):
            cur.execute(sql)
        self.create_units(cur)
        self.create_ai(cur)
        self.create_commitments(cur)

    def apply(self, cur: Cursor, record: EventRecord) -> None:
        handler = getattr(self, "_" + record.topic.replace(".", "_"), None)
        if handler is not None:
            handler(cur, record)

    def end_batch(self, cur: Cursor) -> None:
        # Each delivery carries its job's transfer, so that a transfer's progress, status and
        # destination filter read the deliveries_transfer index alone. Deliveries are added
        # by several handlers (and in a rebuild may come before their job): their transfer
        # is filled here, once per batch, for every row whose job is known by now.
        cur.execute(
            "UPDATE deliveries SET transfer_id = (SELECT j.transfer_id FROM jobs j"
            " WHERE j.job_id = deliveries.job_id) WHERE transfer_id IS NULL"
            " AND EXISTS (SELECT 1 FROM jobs j WHERE j.job_id = deliveries.job_id)")

    # ingest
    def _Job_Received(self, cur: Cursor, r: EventRecord) -> None:
        e = r.event
        idx = e.index
        study, derived = study_key(idx, e.sop_instance_uid)
        transfer = transfer_id(study, e.calling_aet)
        cur.execute(
            "INSERT INTO jobs (job_id, received_at, source, actor, source_ip, calling_aet,"
            " called_aet, sop_class_uid, sop_instance_uid, study_instance_uid,"
            " series_instance_uid, modality, patient_id, sha256, size, transfer_syntax_uid,"
            " routing, previous_job_id, correlation_id, node, transfer_id, patient_name,"
            " study_description, study_date, series_number, series_description,"
            " instance_number)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'received', ?, ?, ?, ?, ?,"
            " ?, ?, ?, ?, ?)",
            (r.originator_id, r.timestamp, e.source, e.actor, e.source_ip, e.calling_aet,
             e.called_aet, e.sop_class_uid, e.sop_instance_uid, study,
             series_key(idx, e.sop_instance_uid), _text(idx.get("Modality")),
             _text(idx.get("PatientID")), e.sha256, e.size, e.transfer_syntax_uid,
             e.previous_job_id, e.correlation_id, getattr(e, "node", None) or None, transfer,
             _text(idx.get("PatientName")), _text(idx.get("StudyDescription")),
             _text(idx.get("StudyDate")), _int(idx.get("SeriesNumber")),
             _text(idx.get("SeriesDescription")), _int(idx.get("InstanceNumber"))),
        )
        # The latest receipt's patient and study attributes win, as in the studies view.
        cur.execute(
            "INSERT INTO transfers (transfer_id, study_instance_uid, study_uid_derived,"
            " calling_aet, patient_name, patient_id, study_description, study_date, modality,"
            " receipts, first_received_at, last_received_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?) ON CONFLICT (transfer_id) DO UPDATE"
            " SET patient_name = excluded.patient_name, patient_id = excluded.patient_id,"
            " study_description = excluded.study_description,"
            " study_date = excluded.study_date,"
            " modality = COALESCE(excluded.modality, transfers.modality),"
            " receipts = transfers.receipts + 1,"
            " last_received_at = excluded.last_received_at",
            (transfer, study, int(derived), e.calling_aet, _text(idx.get("PatientName")),
             _text(idx.get("PatientID")), _text(idx.get("StudyDescription")),
             _text(idx.get("StudyDate")), _text(idx.get("Modality")), r.timestamp,
             r.timestamp),
        )

    def _Job_Routed(self, cur: Cursor, r: EventRecord) -> None:
        e = r.event
        cur.execute(
            "UPDATE jobs SET routing = ?, matched_rules = ?, destinations = ? WHERE job_id = ?",
            ("unrouted" if e.unrouted else "routed", json.dumps(e.matched_rules),
             json.dumps(e.destinations), r.originator_id),
        )
        held = self.hold(cur, r, getattr(e, "units", None) or [])
        self._add_deliveries(cur, r, [d for d in e.destinations if d not in held])

    def _Job_Rerouted(self, cur: Cursor, r: EventRecord) -> None:
        row = cur.execute("SELECT destinations FROM jobs WHERE job_id = ?", (r.originator_id,))
        row = cur.fetchone()
        known = json.loads(row["destinations"] or "[]") if row else []
        merged = sorted(set(known) | set(r.event.destinations))
        cur.execute("UPDATE jobs SET routing = 'routed', destinations = ? WHERE job_id = ?",
                    (json.dumps(merged), r.originator_id))
        held = self.hold(cur, r, getattr(r.event, "units", None) or [])
        self._add_deliveries(cur, r, [d for d in r.event.destinations if d not in held])

    def _add_deliveries(self, cur: Cursor, r: EventRecord, destinations: list[str]) -> None:
        for name in destinations:
            cur.execute(_UPSERT_DELIVERY, (str(delivery_id(r.originator_id, name)),
                                           r.originator_id, name, r.timestamp, r.timestamp))

    def _Job_DuplicateIgnored(self, cur: Cursor, r: EventRecord) -> None:
        cur.execute("UPDATE jobs SET routing = 'duplicate', duplicate_of = ? WHERE job_id = ?",
                    (r.event.original_job_id, r.originator_id))

    def _Job_ConflictKept(self, cur: Cursor, r: EventRecord) -> None:
        cur.execute("UPDATE jobs SET routing = 'conflict', duplicate_of = ? WHERE job_id = ?",
                    (r.event.original_job_id, r.originator_id))

    def _Job_BlobPurged(self, cur: Cursor, r: EventRecord) -> None:
        e = r.event
        cur.execute(
            "INSERT INTO blob_purges (job_id, purge_id, purged_at, actor, sha256, size)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (job_id) DO NOTHING",
            (r.originator_id, e.correlation_id, r.timestamp, e.actor, e.sha256, e.size),
        )

    def _ReceiptFailure_Recorded(self, cur: Cursor, r: EventRecord) -> None:
        e = r.event
        cur.execute(
            "INSERT INTO receipt_failures (failure_id, failed_at, source, source_ip,"
            " calling_aet, called_aet, status, reason, sop_instance_uid)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (r.originator_id, r.timestamp, e.source, e.source_ip, e.calling_aet, e.called_aet,
             e.status, e.reason, e.sop_instance_uid),
        )

    # delivery
    def _Delivery_Created(self, cur: Cursor, r: EventRecord) -> None:
        e = r.event
        cur.execute(
            "INSERT INTO deliveries (delivery_id, job_id, destination, status, attempts)"
            " VALUES (?, ?, ?, 'pending', 0) ON CONFLICT (delivery_id) DO NOTHING",
            (r.originator_id, e.job_id, e.destination),
        )

    def _Delivery_Succeeded(self, cur: Cursor, r: EventRecord) -> None:
        cur.execute(
            "UPDATE deliveries SET status = 'delivered', attempts = ?, last_attempt_at = ?,"
            " delivered_at = ?, detail = ?, next_attempt_at = NULL, last_node = ?,"
            " last_error = NULL"
            " WHERE delivery_id = ?",
            (r.event.attempt, r.timestamp, r.timestamp, r.event.detail, _node(r),
             r.originator_id),
        )

    def _Delivery_AttemptFailed(self, cur: Cursor, r: EventRecord) -> None:
        cur.execute(
            "UPDATE deliveries SET status = 'retrying', attempts = ?, last_attempt_at = ?,"
            " last_error = ?, next_attempt_at = ?, last_node = ?, last_failed_at = ?,"
            " last_failure = ? WHERE delivery_id = ?",
            (r.event.attempt, r.timestamp, r.event.error, r.event.retry_at, _node(r),
             r.timestamp, r.event.error, r.originator_id),
        )

    def _Delivery_DeadLettered(self, cur: Cursor, r: EventRecord) -> None:
        cur.execute(
            "UPDATE deliveries SET status = 'dead', attempts = ?, last_attempt_at = ?,"
            " last_error = ?, next_attempt_at = NULL, last_node = ?, last_failed_at = ?,"
            " last_failure = ? WHERE delivery_id = ?",
            (r.event.attempt, r.timestamp, r.event.reason, _node(r), r.timestamp,
             r.event.reason, r.originator_id),
        )

    def _Delivery_Requeued(self, cur: Cursor, r: EventRecord) -> None:
        cur.execute(
            "UPDATE deliveries SET status = 'pending', next_attempt_at = NULL, clock_from = ?"
            " WHERE delivery_id = ?", (r.timestamp, r.originator_id),
        )

    def _Delivery_Cancelled(self, cur: Cursor, r: EventRecord) -> None:
        cur.execute(
            "UPDATE deliveries SET status = 'cancelled', next_attempt_at = NULL,"
            " last_error = ? WHERE delivery_id = ?", (r.event.reason, r.originator_id),
        )


def _int(value: object) -> int | None:
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None


def _node(r: EventRecord) -> str | None:
    """The node that made an attempt (None in events recorded before several nodes)."""
    return getattr(r.event, "node", None) or None
