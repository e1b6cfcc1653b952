"""Reads of the units tables of the jobs view (projections/units.py) for the unit scheduler
(router/dispatch/units.py): units due for release and a unit's members not yet released."""

from __future__ import annotations

from typing import Any

from projections.db import Queryable

# Units with members waiting whose quiet time has passed, or complete before it (expected
# count reached), longest waiting first.
DUE_UNITS_SQL = (
    "SELECT unit_id, destination, granularity, study_instance_uid, series_instance_uid,"
    " amendments, dispatched_at, total_count, expected_count FROM units"
    " WHERE pending_count > 0 AND (pending_last_at + quiet_time <= ?"
    " OR (dispatched_at IS NULL AND expected_count IS NOT NULL"
    " AND total_count >= expected_count))"
    " ORDER BY pending_last_at LIMIT 100"
)
PENDING_SQL = ("SELECT job_id FROM unit_members WHERE unit_id = ? AND released = 0"
               " ORDER BY routed_at, job_id")


def due_units(db: Queryable, now: float) -> list[dict[str, Any]]:
    """Up to 100 units due for release at ``now``."""
    return db.query(DUE_UNITS_SQL, (now,))


def pending_members(db: Queryable, unit_id: str) -> list[str]:
    """Job ids of the unit's members not yet released, in routing order."""
    return [r["job_id"] for r in db.query(PENDING_SQL, (unit_id,))]
