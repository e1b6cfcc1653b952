"""Reads of transfers (the instances of one study sent by one calling AE title) for the jobs
page, the dashboard and ``/api/v1/transfers``: a filtered, paged list with per-destination
progress, one transfer's series, and one series' instances.

The jobs view keeps one ``transfers`` row per study and sender (paged by its
``last_received_at`` index); counts and progress are read for the rows of one page only, from
the jobs rows of those transfers (``jobs_transfer`` index) and their deliveries (which
carry their transfer's id: ``deliveries_transfer`` index). Delivery
states are named as in router/domain/delivery_states.py.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from projections.db import ViewDatabase
from projections.jobs_queries import ROUTING_STATUSES
from projections.sql import like_pattern, page, where_clause
from router.domain.delivery_states import (
    DELIVERY_STATES,
    STORED_BY_SHOWN,
    shown,
    shown_sql,
)

FILTER_FIELDS = ("status", "destination", "calling_aet", "received_from", "received_to",
                 "patient_id", "study_uid")
TRANSFER_COLUMNS = (
    "t.transfer_id, t.study_instance_uid, t.study_uid_derived, t.calling_aet, t.patient_name,"
    " t.patient_id, t.study_description, t.study_date, t.modality, t.receipts,"
    " t.first_received_at, t.last_received_at"
)
MAX_INSTANCES = 2000  # listed per series; a bigger series says it was cut short



def _status_sql(name: str) -> tuple[str, list[str]]:
    """A transfer's status is its most urgent delivery state (the same rule as a job's):
    it has a delivery in state ``name`` and none in a more urgent one. Each test is a seek
    in the deliveries_transfer index."""
    urgent = [STORED_BY_SHOWN[s] for s in DELIVERY_STATES[:DELIVERY_STATES.index(name)]]
    sql = ("EXISTS (SELECT 1 FROM deliveries d WHERE d.transfer_id = t.transfer_id"
           " AND d.status = ?)")
    if urgent:
        marks = ", ".join("?" for _ in urgent)
        sql += (" AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.transfer_id ="
                f" t.transfer_id AND d.status IN ({marks}))")
    return sql, [STORED_BY_SHOWN[name], *urgent]


_BY_ROUTING_SQL = (
    "NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.transfer_id = t.transfer_id)"
    " AND EXISTS (SELECT 1 FROM jobs j WHERE j.transfer_id = t.transfer_id AND j.routing = ?)"
)


@dataclass(frozen=True)
class TransferFilters:
    """What the transfers list is narrowed to; None means "any"."""

    status: str | None = None  # a shown delivery state, or a routing status
    destination: str | None = None
    calling_aet: str | None = None  # wildcards allowed
    received_from: float | None = None  # Unix seconds: an instance received at or after
    received_to: float | None = None  # Unix seconds: an instance received before
    patient_id: str | None = None
    study_uid: str | None = None

    def where(self) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        if self.status in ROUTING_STATUSES:
            clauses.append(_BY_ROUTING_SQL)
            params.append(self.status)
        elif self.status is not None:
            sql, values = _status_sql(self.status)
            clauses.append(sql)
            params.extend(values)
        if self.destination is not None:
            clauses.append("EXISTS (SELECT 1 FROM deliveries d WHERE d.transfer_id ="
                           " t.transfer_id AND d.destination = ?)")
            params.append(self.destination)
        if self.calling_aet is not None:
            clauses.append("UPPER(t.calling_aet) LIKE UPPER(?) ESCAPE '\\'")
            params.append(like_pattern(self.calling_aet))
        for column, value in (("patient_id", self.patient_id),
                              ("study_instance_uid", self.study_uid)):
            if value is not None:
                clauses.append(f"t.{column} = ?")
                params.append(value)
        # A transfer spans first..last receipt: it matches when that span meets the range.
        if self.received_from is not None:
            clauses.append("t.last_received_at >= ?")
            params.append(self.received_from)
        if self.received_to is not None:
            clauses.append("t.first_received_at < ?")
            params.append(self.received_to)
        return where_clause(clauses), params

    def used(self) -> list[str]:
        """Names of the filters in use (PHI-free, for the access record)."""
        return [name for name in FILTER_FIELDS if getattr(self, name) is not None]


def valid_transfer_id(transfer_id: str) -> bool:
    try:
        return str(uuid.UUID(transfer_id)) == transfer_id
    except ValueError:
        return False


def list_transfers(db: ViewDatabase, filters: TransferFilters, limit: int, offset: int
                   ) -> tuple[list[dict[str, Any]], int]:
    """One page of transfers, latest receipt first, each with its counts, ``status`` and
    per-destination ``progress``; and the total."""
    rows, total = page(db, TRANSFER_COLUMNS, "transfers t", filters.where(),
                       "t.last_received_at DESC, t.transfer_id", limit, offset)
    _add_progress(db, rows)
    return rows, total


def get_transfer(db: ViewDatabase, transfer_id: str, with_series: bool = True
                 ) -> dict[str, Any] | None:
    """One transfer with its counts, status, progress and (``with_series``) its series;
    None if unknown."""
    if not valid_transfer_id(transfer_id):
        return None
    rows = db.query(f"SELECT {TRANSFER_COLUMNS} FROM transfers t WHERE t.transfer_id = ?",
                    (transfer_id,))
    if not rows:
        return None
    _add_progress(db, rows)
    transfer = rows[0]
    if with_series:
        transfer["series"] = transfer_series(db, transfer_id)
    return transfer


def transfer_series(db: ViewDatabase, transfer_id: str) -> list[dict[str, Any]]:
    """The series of a transfer, each with its instance count and per-destination progress."""
    series = db.query(
        "SELECT series_instance_uid, MAX(series_number) AS series_number,"
        " MAX(series_description) AS series_description, MAX(modality) AS modality,"
        " COUNT(DISTINCT sop_instance_uid) AS instances, MIN(received_at) AS first_received_at,"
        " MAX(received_at) AS last_received_at FROM jobs WHERE transfer_id = ?"
        " GROUP BY series_instance_uid ORDER BY MAX(series_number), series_instance_uid",
        (transfer_id,))
    counts = db.query(
        "SELECT j.series_instance_uid AS k, d.destination, d.status, COUNT(*) AS n"
        " FROM jobs j JOIN deliveries d ON d.job_id = j.job_id WHERE j.transfer_id = ?"
        " GROUP BY j.series_instance_uid, d.destination, d.status", (transfer_id,))
    _attach(series, "series_instance_uid", counts)
    return series


def series_instances(db: ViewDatabase, transfer_id: str, series_uid: str
                     ) -> tuple[list[dict[str, Any]], bool]:
    """The receipts of one series of a transfer (up to MAX_INSTANCES, by instance number),
    each with its deliveries; and whether the list was cut short."""
    rows = db.query(
        "SELECT job_id, received_at, sop_instance_uid, sop_class_uid, transfer_syntax_uid,"
        " instance_number, size, routing FROM jobs WHERE transfer_id = ?"
        " AND series_instance_uid = ? ORDER BY instance_number, received_at, job_id LIMIT ?",
        (transfer_id, series_uid, MAX_INSTANCES + 1))
    truncated = len(rows) > MAX_INSTANCES
    rows = rows[:MAX_INSTANCES]
    by_job: dict[str, list[dict[str, Any]]] = {row["job_id"]: [] for row in rows}
    if by_job:
        marks = ", ".join("?" for _ in by_job)
        for d in db.query(
                f"SELECT job_id, destination, {shown_sql('status')} AS status, attempts,"
                f" last_error FROM deliveries WHERE job_id IN ({marks}) ORDER BY destination",
                list(by_job)):
            by_job[d.pop("job_id")].append(d)
    for row in rows:
        row["deliveries"] = by_job[row["job_id"]]
    return rows, truncated


def _add_progress(db: ViewDatabase, rows: list[dict[str, Any]]) -> None:
    """Counts of instances and series, ``status`` and per-destination ``progress`` for the
    transfers of ``rows`` (reads only their jobs and deliveries)."""
    if not rows:
        return
    ids = [row["transfer_id"] for row in rows]
    marks = ", ".join("?" for _ in ids)
    sizes = {r["transfer_id"]: r for r in db.query(
        "SELECT transfer_id, COUNT(DISTINCT sop_instance_uid) AS instances,"
        " COUNT(DISTINCT series_instance_uid) AS series,"
        " MAX(CASE WHEN routing = 'unrouted' THEN 1 ELSE 0 END) AS unrouted"
        f" FROM jobs WHERE transfer_id IN ({marks}) GROUP BY transfer_id", ids)}
    counts = db.query(
        "SELECT transfer_id AS k, destination, status, COUNT(*) AS n FROM deliveries"
        f" WHERE transfer_id IN ({marks}) GROUP BY transfer_id, destination, status", ids)
    for row in rows:
        size = sizes.get(row["transfer_id"], {})
        row["instances"] = int(size.get("instances") or 0)
        row["series_count"] = int(size.get("series") or 0)
        row["unrouted"] = bool(size.get("unrouted"))
    _attach(rows, "transfer_id", counts)


def _attach(rows: list[dict[str, Any]], key: str, counts: list[dict[str, Any]]) -> None:
    """Set ``progress`` (destination -> counts by shown state, total and a summary text) and
    ``status`` (the most urgent state, or the routing when nothing was routed) on each row."""
    by_row: dict[str, dict[str, dict[str, int]]] = {}
    for c in counts:
        states = by_row.setdefault(c["k"], {}).setdefault(c["destination"], {})
        name = shown(c["status"])
        states[name] = states.get(name, 0) + int(c["n"])
    for row in rows:
        progress = {}
        present: set[str] = set()
        for destination, states in sorted(by_row.get(row[key], {}).items()):
            present.update(states)
            progress[destination] = {"total": sum(states.values()), "states": states,
                                     "summary": progress_text(states)}
        row["progress"] = progress
        row["status"] = next((s for s in DELIVERY_STATES if s in present),
                             "unrouted" if row.get("unrouted") else "received")


def progress_text(states: Mapping[str, int]) -> str:
    """``58/60 delivered, 2 retrying``: delivered of all, then the other states present."""
    total = sum(states.values())
    parts = [f"{states.get('delivered', 0)}/{total} delivered"]
    parts += [f"{states[s]} {s}" for s in DELIVERY_STATES if s != "delivered" and states.get(s)]
    return ", ".join(parts)


RECENT_KEYS = ("transfer_id", "calling_aet", "modality", "instances", "series_count",
               "status", "progress", "last_received_at")


def recent_activity(db: ViewDatabase, limit: int = 8) -> list[dict[str, Any]]:
    """The latest transfers for the dashboard, without PHI (no patient, no description, no
    UIDs): when, from which sender, how many instances and how far delivered."""
    rows, _ = list_transfers(db, TransferFilters(), limit, 0)
    return [{k: row[k] for k in RECENT_KEYS} for row in rows]
