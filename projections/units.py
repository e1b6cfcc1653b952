"""The units part of the ``jobs`` view: series and study units, which jobs they hold and which
were released (dispatched or amended). The unit scheduler reads it; held deliveries stay in
status ``held`` until their unit releases them.

Only the ingest log feeds these tables, so live processing and a rebuild apply them in the
same order; delivery rows are upserted so that delivery events applied first are kept.
"""

from __future__ import annotations

from typing import Any

from projections.db import Cursor
from projections.runner import EventRecord
from router.domain.delivery import delivery_id

UNITS_SQL = """CREATE TABLE IF NOT EXISTS units (
    unit_id TEXT PRIMARY KEY, destination TEXT NOT NULL, granularity TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL, series_instance_uid TEXT,
    quiet_time DOUBLE PRECISION NOT NULL, expected_count INTEGER, amendments TEXT NOT NULL,
    first_at DOUBLE PRECISION NOT NULL, total_count INTEGER NOT NULL DEFAULT 0,
    pending_count INTEGER NOT NULL DEFAULT 0, pending_last_at DOUBLE PRECISION,
    dispatched_at DOUBLE PRECISION, dispatch_reason TEXT, amended_count INTEGER NOT NULL
    DEFAULT 0, last_released_at DOUBLE PRECISION)"""

MEMBERS_SQL = """CREATE TABLE IF NOT EXISTS unit_members (
    unit_id TEXT NOT NULL, job_id TEXT NOT NULL, routed_at DOUBLE PRECISION NOT NULL,
    released INTEGER NOT NULL DEFAULT 0, release_kind TEXT, PRIMARY KEY (unit_id, job_id))"""

UNIT_INDEXES = (
    "CREATE INDEX IF NOT EXISTS units_pending ON units (pending_count)",
    "CREATE INDEX IF NOT EXISTS units_study ON units (study_instance_uid)",
    "CREATE INDEX IF NOT EXISTS unit_members_job ON unit_members (job_id)",
)
UNIT_TABLES = ("units", "unit_members")

_HOLD_DELIVERY = (
    "INSERT INTO deliveries (delivery_id, job_id, destination, status, attempts, created_at,"
    " clock_from) VALUES (?, ?, ?, 'held', 0, ?, ?)"
    " ON CONFLICT (delivery_id) DO UPDATE SET created_at = excluded.created_at,"
    " clock_from = COALESCE(deliveries.clock_from, excluded.clock_from)"
)
# Released: held -> pending (a delivery event applied earlier keeps its own status).
_RELEASE_DELIVERY = (
    "INSERT INTO deliveries (delivery_id, job_id, destination, status, attempts, created_at,"
    " clock_from) VALUES (?, ?, ?, 'pending', 0, ?, ?)"
    " ON CONFLICT (delivery_id) DO UPDATE SET"
    " status = CASE WHEN deliveries.status = 'held' THEN 'pending' ELSE deliveries.status END,"
    " clock_from = CASE WHEN deliveries.status = 'held' THEN excluded.clock_from"
    " ELSE deliveries.clock_from END"
)
_RESEND_DELIVERY = (
    "UPDATE deliveries SET status = 'pending', next_attempt_at = NULL, clock_from = ?"
    " WHERE delivery_id = ? AND status IN ('delivered', 'dead')"
)


class UnitHandlers:
    """Mixed into the jobs view: handlers for units, called from its ingest handlers."""

    def open_request(self, cur: Cursor, r: EventRecord, request_id: str, unit: dict[str, Any],
                     job_ids: list[str], amendment: bool) -> None:
        raise NotImplementedError  # the AI request handlers provide it

    def create_units(self, cur: Cursor) -> None:
        for sql in (UNITS_SQL, MEMBERS_SQL, *UNIT_INDEXES):
            cur.execute(sql)

    def hold(self, cur: Cursor, r: EventRecord, units: list[dict[str, Any]]) -> set[str]:
        """Record each held destination's unit membership; returns the held destinations."""
        held: set[str] = set()
        for unit in units:
            name = unit["destination"]
            held.add(name)
            cur.execute(_HOLD_DELIVERY, (str(delivery_id(r.originator_id, name)),
                                         r.originator_id, name, r.timestamp, r.timestamp))
            cur.execute(
                "INSERT INTO units (unit_id, destination, granularity, study_instance_uid,"
                " series_instance_uid, quiet_time, expected_count, amendments, first_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (unit_id) DO UPDATE SET"
                " quiet_time = excluded.quiet_time, expected_count = excluded.expected_count,"
                " amendments = excluded.amendments",
                (unit["unit_id"], name, unit["granularity"], unit["study_instance_uid"],
                 unit["series_instance_uid"], unit["quiet_time"], unit["expected_count"],
                 unit["amendments"], r.timestamp))
            cur.execute(
                "INSERT INTO unit_members (unit_id, job_id, routed_at) VALUES (?, ?, ?)"
                " ON CONFLICT (unit_id, job_id) DO NOTHING",
                (unit["unit_id"], r.originator_id, r.timestamp))
            self._recount(cur, unit["unit_id"])
        return held

    def _recount(self, cur: Cursor, unit: str) -> None:
        cur.execute(
            "UPDATE units SET"
            " total_count = (SELECT count(*) FROM unit_members m WHERE m.unit_id = units.unit_id),"
            " pending_count = (SELECT count(*) FROM unit_members m"
            "  WHERE m.unit_id = units.unit_id AND m.released = 0),"
            " pending_last_at = (SELECT max(routed_at) FROM unit_members m"
            "  WHERE m.unit_id = units.unit_id AND m.released = 0)"
            " WHERE unit_id = ?", (unit,))

    def _Unit_Dispatched(self, cur: Cursor, r: EventRecord) -> None:
        e = r.event
        cur.execute("UPDATE units SET dispatched_at = ?, dispatch_reason = ?,"
                    " last_released_at = ? WHERE unit_id = ?",
                    (r.timestamp, e.reason, r.timestamp, r.originator_id))
        self._release(cur, r, e.destination, e.job_ids, "dispatched")
        if e.request_id:
            self.open_request(cur, r, e.request_id, {"destination": e.destination,
                              "study_instance_uid": e.study_instance_uid}, e.job_ids, False)

    def _Unit_Amended(self, cur: Cursor, r: EventRecord) -> None:
        e = r.event
        cur.execute("SELECT destination, study_instance_uid FROM units WHERE unit_id = ?",
                    (r.originator_id,))
        row = cur.fetchone()
        if row is None:
            return
        destination = row["destination"]
        cur.execute("UPDATE units SET amended_count = amended_count + 1, last_released_at = ?"
                    " WHERE unit_id = ?", (r.timestamp, r.originator_id))
        self._release(cur, r, destination, e.job_ids, "amendment")
        if e.request_id:
            self.open_request(cur, r, e.request_id, dict(row), e.job_ids, True)
        if e.resend_unit:
            cur.execute("SELECT job_id FROM unit_members WHERE unit_id = ?", (r.originator_id,))
            for member in cur.fetchall():
                cur.execute(_RESEND_DELIVERY, (r.timestamp, str(delivery_id(
                    member["job_id"], destination))))

    def _release(self, cur: Cursor, r: EventRecord, destination: str, job_ids: list[str],
                 kind: str) -> None:
        for job_id in job_ids:
            cur.execute(_RELEASE_DELIVERY, (str(delivery_id(job_id, destination)), job_id,
                                            destination, r.timestamp, r.timestamp))
            cur.execute("UPDATE unit_members SET released = 1, release_kind = ?"
                        " WHERE unit_id = ? AND job_id = ?", (kind, r.originator_id, job_id))
        self._recount(cur, r.originator_id)
