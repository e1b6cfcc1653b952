"""The unit scheduler: dispatches a held series or study when it is stable (no new instance for
its quiet time) or complete (expected count reached), and releases later instances as
amendments once they are stable in turn.

Its state is the ``units`` tables of the jobs view (rebuilt from the ingest log), so held
units survive a restart; the clock is injectable so tests need not wait minutes. What a unit
has released is read from the Unit aggregate before each save, so a lagging view or a second
node never releases an instance twice.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from eventsourcing.application import AggregateNotFoundError
from eventsourcing.persistence import IntegrityError

from projections.db import ViewDatabase
from projections.units_queries import due_units, pending_members
from router.application.admin_state import AdminState
from router.application.stores import EventStores
from router.domain.units import Unit
from router.ticker import Ticker

logger = logging.getLogger(__name__)



class UnitScheduler:
    """One thread; woken when the jobs view moves, else every ``poll_interval`` seconds."""

    def __init__(self, stores: EventStores, jobs_db: ViewDatabase, admin: AdminState,
                 clock: Callable[[], float] = time.time, poll_interval: float = 1.0,
                 on_saved: Callable[[], None] = lambda: None,
                 leads: Callable[[], bool] = lambda: True) -> None:
        self._app = stores.ingest
        self._leads = leads  # one node releases units at a time (router.cluster)
        self._db = jobs_db
        self._admin = admin
        self.clock = clock
        self._on_saved = on_saved
        self._ticker = Ticker("units", self.tick, poll_interval)

    def start(self) -> None:
        self._ticker.start()

    def wake(self) -> None:
        self._ticker.wake()

    def stop(self) -> None:
        self._ticker.stop()

    def tick(self) -> int:
        """Dispatch or amend every due unit; returns how many events were saved."""
        if not self._leads():
            return 0
        saved = 0
        for row in due_units(self._db, self.clock()):
            try:
                saved += self._release(row)
            except IntegrityError:
                continue  # another node (or a racing save) released it: read again next tick
        if saved:
            self._on_saved()
        return saved

    def _release(self, row: dict[str, Any]) -> int:
        unit = self._load(row["unit_id"])
        pending = pending_members(self._db, row["unit_id"])
        if unit is not None:
            pending = [job for job in pending if job not in unit.released]
        if not pending:
            return 0
        destination = self._admin.snapshot().destinations.get(row["destination"])
        is_ai = destination is not None and destination.config.get("type") == "ai"
        request_id = str(uuid.uuid4()) if is_ai else None
        ctx = {"actor": "system", "source_ip": "", "correlation_id": str(uuid.uuid4())}
        if unit is None:
            complete = (row["expected_count"] is not None
                        and row["total_count"] >= row["expected_count"])
            unit = Unit(row["unit_id"], **ctx, destination=row["destination"],
                        granularity=row["granularity"],
                        study_instance_uid=row["study_instance_uid"],
                        series_instance_uid=row["series_instance_uid"], job_ids=pending,
                        reason="expected_count" if complete else "quiet_time",
                        request_id=request_id)
        else:
            unit.amend(**ctx, job_ids=pending,
                       resend_unit=row["amendments"] == "whole_unit",
                       request_id=request_id)
        self._app.save(unit)
        logger.info("unit %s for %s: released %d instance(s)", row["unit_id"],
                    row["destination"], len(pending))
        return 1

    def _load(self, unit_id: str) -> Unit | None:
        try:
            unit: Any = self._app.repository.get(uuid.UUID(unit_id))
        except AggregateNotFoundError:
            return None
        return unit if isinstance(unit, Unit) else None
