"""Reads for the destinations and rules screens: delivery health and backlog per destination
(from the ``jobs`` view's deliveries table) and which items the TOML file declared (from the
``audit`` view: their Created event was recorded by the actor ``config``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from projections.db import Queryable
from router.domain.admin import destination_id, rule_id, transform_id

PENDING = "('pending', 'retrying')"
FAILED = "('retrying', 'dead')"

STATS_SQL = (
    "SELECT destination,"
    f" SUM(CASE WHEN status IN {PENDING} THEN 1 ELSE 0 END) AS backlog,"
    f" MIN(CASE WHEN status IN {PENDING} THEN created_at END) AS oldest_pending_at,"
    " SUM(CASE WHEN status = 'dead' THEN 1 ELSE 0 END) AS dead,"
    " MAX(delivered_at) AS last_success_at,"
    " MAX(last_failed_at) AS last_failure_at"
    " FROM deliveries GROUP BY destination"
)
# The latest failed attempt, whatever became of its delivery since (a delivery that failed
# during an outage and succeeded once it ended keeps its failure in last_failed_at and
# last_failure): the outage that just ended, not an older dead letter.
LAST_ERROR_SQL = (
    "SELECT last_failure FROM deliveries WHERE destination = ?"
    " AND last_failed_at IS NOT NULL ORDER BY last_failed_at DESC LIMIT 1"
)
FAILING_SINCE_SQL = (
    f"SELECT COUNT(*) AS n FROM deliveries WHERE destination = ? AND status IN {FAILED}"
    " AND last_attempt_at > ?"
)
CONFIG_CREATED_SQL = (
    "SELECT object_id FROM audit WHERE action = ? AND actor = 'config'"
)



@dataclass(frozen=True)
class Health:
    """Delivery health of one destination, as the jobs view has it.

    ``consecutive_failures`` counts the deliveries whose latest attempt failed after the
    destination's last success (all of them when it never succeeded).
    """

    destination: str
    paused: bool
    backlog: int = 0
    oldest_pending_at: float | None = None
    oldest_pending_age: float | None = None
    dead: int = 0
    last_success_at: float | None = None
    last_failure_at: float | None = None
    last_error: str | None = None
    consecutive_failures: int = 0

    @property
    def state(self) -> str:
        """paused | failing | pending | healthy | idle (for a badge)."""
        if self.paused:
            return "paused"
        if self.consecutive_failures:
            return "failing"
        if self.backlog:
            return "pending"
        return "healthy" if self.last_success_at else "idle"

    def to_dict(self) -> dict[str, Any]:
        # "failed" is the shown name of the dead-lettered count ("dead", kept for clients).
        return {**asdict(self), "failed": self.dead, "state": self.state}


def health(jobs_db: Queryable, paused: dict[str, bool], now: float | None = None
           ) -> dict[str, Health]:
    """Health of every destination in ``paused`` (name -> paused) and of any other destination
    that still has deliveries in the view (a deleted one with a backlog, say)."""
    now = time.time() if now is None else now
    stats = {row["destination"]: row for row in jobs_db.query(STATS_SQL)}
    out: dict[str, Health] = {}
    for name in sorted(set(paused) | set(stats)):
        row = stats.get(name)
        if row is None:
            out[name] = Health(name, paused.get(name, False))
            continue
        out[name] = _health_of(jobs_db, name, paused.get(name, False), row, now)
    return out


def _health_of(jobs_db: Queryable, name: str, paused: bool, row: dict[str, Any],
               now: float) -> Health:
    oldest = _float(row["oldest_pending_at"])
    success = _float(row["last_success_at"])
    failure = _float(row["last_failure_at"])
    error = None
    failing = 0
    if failure is not None:
        found = jobs_db.query(LAST_ERROR_SQL, (name,))
        error = found[0]["last_failure"] if found else None
        counted = jobs_db.query(FAILING_SINCE_SQL, (name, success or 0.0))
        failing = int(counted[0]["n"]) if counted else 0
    return Health(
        destination=name, paused=paused, backlog=int(row["backlog"] or 0),
        oldest_pending_at=oldest,
        oldest_pending_age=None if oldest is None else max(0.0, now - oldest),
        dead=int(row["dead"] or 0), last_success_at=success, last_failure_at=failure,
        last_error=error, consecutive_failures=failing)


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def declared_by_config(audit_db: Queryable, kind: str, names: Iterable[str],
                       declared: Iterable[str] = ()) -> set[str]:
    """The names among ``names`` that the TOML file declared: created by the actor ``config``
    (any file applied so far) or ``declared`` by the file this router was started with."""
    make_id = {"rule": rule_id, "transform": transform_id}.get(kind, destination_id)
    action = {"rule": "Rule.Created", "transform": "Transform.Created"}.get(
        kind, "Destination.Created")
    created = {row["object_id"] for row in audit_db.query(CONFIG_CREATED_SQL, (action,))}
    wanted = set(declared)
    return {n for n in names if n in wanted or str(make_id(n)) in created}


def age_text(seconds: float | None) -> str:
    """``42 s``, ``5 min``, ``3 h``, ``2 d``; empty for None."""
    if seconds is None:
        return ""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} d"


def when_text(timestamp: float | None, now: float | None = None) -> str:
    """``UTC time (age ago)``; empty for None."""
    if timestamp is None:
        return ""
    now = time.time() if now is None else now
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))
    return f"{stamp} ({age_text(max(0.0, now - timestamp))} ago)"
