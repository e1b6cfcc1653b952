"""Bulk requeue and cancel: every delivery matching a filter (destination, status, time range,
study), as one user action (``BulkAction.Requested``, with the reason) followed by the same
per-delivery events a single requeue or cancel records, under the action's correlation id.

Deliveries are read from the jobs view and changed in batches of BATCH, so a caller on an event
loop can run one batch per thread hop; the keyset (delivery id) only moves forward, so a run
ends even while the dispatcher changes statuses.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from projections.jobs_queries import DeliverySelection, count_deliveries, delivery_batch
from router.application.commands import Actor, CommandError, Commands
from router.application.stores import EventStores
from router.domain.delivery import BulkAction
from router.domain.delivery_states import shown, stored

BATCH = 200
# What each operation may change (a delivered delivery is never requeued or cancelled here;
# a pending or held one is already waiting for its attempt, so requeueing it means nothing).
OPERATIONS: dict[str, tuple[str, ...]] = {
    "requeue": ("retrying", "dead", "cancelled"),
    "cancel": ("pending", "retrying", "dead"),
}
STATUSES = ("pending", "held", "retrying", "dead", "delivered", "cancelled")


class BulkFilterError(CommandError):
    """A filter value cannot be used; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def parse_instant(value: str, field: str, end_of_day: bool = False) -> float:
    """Unix seconds from ``YYYY-MM-DD`` (as an upper bound: the end of that day) or an ISO 8601
    date-time (UTC unless it says otherwise)."""
    try:
        if len(value) == 10:
            day = datetime.combine(date.fromisoformat(value), datetime.min.time(), UTC)
            return (day + timedelta(days=1 if end_of_day else 0)).timestamp()
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise BulkFilterError(field, "expected YYYY-MM-DD or an ISO 8601 date-time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


@dataclass(frozen=True)
class DeliveryFilter:
    """Which deliveries a bulk action concerns; None means "any". ``everything`` must be set
    to act without any other criterion (a mistyped empty filter must not touch them all)."""

    destination: str | None = None
    status: str | None = None
    since: float | None = None  # the job was received at or after (Unix seconds)
    until: float | None = None  # ... and before
    study_uid: str | None = None
    everything: bool = False
    given: Mapping[str, Any] = field(default_factory=dict, compare=False)  # as typed

    def __post_init__(self) -> None:
        # A status as typed (the names people see, or their old aliases) as the view stores it.
        if self.status is not None:
            object.__setattr__(self, "status", stored(self.status))

    def is_empty(self) -> bool:
        return all(v is None for v in (self.destination, self.status, self.since,
                                       self.until, self.study_uid))

    def check(self, operation: str) -> None:
        if operation not in OPERATIONS:
            raise BulkFilterError("operation", "must be requeue or cancel")
        if self.is_empty() and not self.everything:
            raise BulkFilterError("all", "give at least one of destination, status, since, "
                                  "until, study_uid, or set all to act on every delivery")
        allowed = OPERATIONS[operation]
        if self.status is not None and self.status not in allowed:
            raise BulkFilterError("status", f"{operation} applies to deliveries that are "
                                  + ", ".join(shown(a) for a in allowed)
                                  + f", not {shown(self.status)}")
        if self.since is not None and self.until is not None and self.since >= self.until:
            raise BulkFilterError("until", "must be after since")

    def criteria(self) -> dict[str, Any]:
        """The filter as recorded in the event (what was typed, plus ``all``)."""
        return {**{k: v for k, v in self.given.items() if v not in (None, "")},
                "all": self.everything}

    def selection(self, operation: str) -> DeliverySelection:
        """The deliveries ``operation`` would change (projections/jobs_queries.py reads them)."""
        statuses = (self.status,) if self.status else tuple(OPERATIONS[operation])
        return DeliverySelection(statuses, self.destination, self.since, self.until,
                                 self.study_uid)


@dataclass
class BulkRun:
    """One bulk action under way: what it selects, who asked, how far it got."""

    operation: str
    filter: DeliveryFilter
    actor: Actor  # carries the action's correlation id
    reason: str
    matched: int
    after: str = ""  # the last delivery id handled (keyset)
    affected: int = 0
    skipped: int = 0  # changed meanwhile (delivered, already cancelled): left alone
    done: bool = False


class BulkDeliveries:
    """Bulk requeue and cancel over the jobs view, through the single-delivery commands."""

    def __init__(self, commands: Commands, stores: EventStores, jobs_db: Any) -> None:
        self._commands = commands
        self._stores = stores
        self._db = jobs_db

    def count(self, flt: DeliveryFilter, operation: str) -> int:
        """How many deliveries the action would change now (a dry run; records nothing)."""
        flt.check(operation)
        return count_deliveries(self._db, flt.selection(operation))

    def start(self, flt: DeliveryFilter, operation: str, reason: str, actor: Actor
              ) -> BulkRun:
        """Record the user action (with how many deliveries it matches now) and return the
        run; call :meth:`next_batch` until it answers False."""
        matched = self.count(flt, operation)
        acting = Actor(actor.name, actor.source_ip, actor.correlation_id or str(uuid.uuid4()))
        self._stores.delivery.save(BulkAction(
            **acting.ctx(), operation=operation, criteria=flt.criteria(), reason=reason,
            matched=matched))
        return BulkRun(operation, flt, acting, reason, matched)

    def next_batch(self, run: BulkRun) -> bool:
        """Change up to BATCH more deliveries; False once none is left."""
        rows = delivery_batch(self._db, run.filter.selection(run.operation), run.after, BATCH)
        if rows:
            run.after = rows[-1]["delivery_id"]
            affected, skipped = self._commands.change_many(
                run.operation, [(r["job_id"], r["destination"]) for r in rows], run.actor,
                run.reason or (f"cancelled by {run.actor.name} (bulk)"
                               if run.operation == "cancel" else ""))
            run.affected += affected
            run.skipped += skipped
        run.done = len(rows) < BATCH
        return not run.done

    def run(self, flt: DeliveryFilter, operation: str, reason: str, actor: Actor) -> BulkRun:
        """The whole action in this thread (the command line)."""
        run = self.start(flt, operation, reason, actor)
        while self.next_batch(run):
            pass
        return run
