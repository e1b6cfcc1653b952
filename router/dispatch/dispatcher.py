"""The dispatcher: reads due deliveries from the jobs view and feeds each destination's lane;
the outcome recorder (outcomes.py) turns results into Delivery events and decides retries.

Pending work resumes after a restart because the queue is the view, rebuilt from the log.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from projections.db import ViewDatabase
from projections.jobs_queries import due_deliveries
from projections.positions import view_positions
from router.application.admin_state import AdminState, DestinationState
from router.application.stores import EventStores
from router.dicom.header import HeaderError, read_header
from router.dispatch.base import (
    Adapter,
    Outgoing,
    PermanentDeliveryError,
    TransientDeliveryError,
)
from router.dispatch.lanes import DueDelivery, Lane
from router.dispatch.outcomes import OutcomeRecorder
from router.dispatch.transforming import SendTransforms
from router.priority import lower_this_thread
from router.settings import DispatchSettings
from router.storage.blobs import BlobCorruptError, BlobError, BlobStore

logger = logging.getLogger(__name__)

class Dispatcher:
    """Feeds lanes from the view and turns attempt results into events."""

    def __init__(
        self,
        stores: EventStores,
        jobs_db: ViewDatabase,
        admin_state: AdminState,
        blobs: BlobStore,
        settings: DispatchSettings,
        build_adapter: Callable[[DestinationState], Adapter],
        clock: Callable[[], float] = time.time,
        on_saved: Callable[[], None] = lambda: None,
        node: str = "",
        leads: Callable[[str], bool] = lambda destination: True,
        settle: Callable[[], object] = lambda: None,
        transforms: SendTransforms | None = None,
    ) -> None:
        # Applies the transforms of a delivery's rules and destination to a copy (None: none).
        self._transforms = transforms
        self._app = stores.delivery
        # Whether this node sends to a destination now (router.cluster: one node at a time,
        # so a destination's concurrency is a limit for the whole cluster).
        self._leads = leads
        # Before sending for a destination this node has just taken over, the jobs view must
        # hold every outcome recorded so far (the node before us may have recorded some that
        # it had not yet projected): else those deliveries would be sent again.
        self._settle = settle
        self._led: set[str] = set()
        self._db = jobs_db
        self._admin = admin_state
        self._blobs = blobs
        self._settings = settings
        self._build_adapter = build_adapter
        self._clock = clock
        self.outcomes = OutcomeRecorder(stores.delivery, settings, clock, on_saved, node)
        self._lanes: dict[str, Lane] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dispatcher", daemon=True)

    def start(self) -> None:
        self.outcomes.start()
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, grace: float) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)
        deadline = time.monotonic() + grace
        for lane in list(self._lanes.values()):
            lane.stop(max(0.1, deadline - time.monotonic()))
        self.outcomes.stop()  # after the lanes: their last outcomes are saved too

    def _run(self) -> None:
        lower_this_thread()
        while not self._stop.is_set():
            self._wake.clear()
            try:
                self.feed()
            except Exception:
                logger.exception("dispatcher feed failed; retrying")
            self._wake.wait(self._settings.poll_interval)

    def feed(self) -> int:
        """Offer due deliveries to their lanes; returns how many were offered."""
        # AI processors get whole units from the AI worker, not instances from lanes.
        destinations = {name: state for name, state
                        in self._admin.snapshot().live_destinations().items()
                        if state.config.get("type") != "ai" and self._leads(name)}
        if set(destinations) - self._led:
            self._settle()
        self._led = set(destinations)
        self._sync_lanes(destinations)
        self._forget_projected()
        offered = 0
        for name, lane in self._lanes.items():
            if destinations[name].paused:
                continue
            room = max(0, lane.concurrency * 64 - lane.backlog())
            if room == 0:
                continue
            # Busy first, then recent: a delivery leaves "busy" only after its outcome is in
            # "recent", so read in this order it is in one of the two until the view has it.
            busy = lane.busy_ids()
            skip = busy | self.outcomes.recent()
            rows = due_deliveries(self._db, name, self._clock(), room + len(skip))
            for row in rows:
                if row["delivery_id"] in skip:
                    continue
                offered += lane.offer(_due(row))
        return offered

    def _sync_lanes(self, destinations: dict[str, DestinationState]) -> None:
        for name in list(self._lanes):
            state = destinations.get(name)
            if state is None or state.version != self._lanes[name].version:
                self._lanes.pop(name).stop(self._settings.shutdown_grace)
        for name, state in destinations.items():
            if name not in self._lanes:
                self._lanes[name] = self._new_lane(state)

    def _new_lane(self, state: DestinationState) -> Lane:
        concurrency = int(state.config.get("concurrency") or 1)
        lane = Lane(state.name, state.version, concurrency,
                    make_adapter=lambda: self._build_adapter(state),
                    prepare=self._prepare, record=self.outcomes.submit)
        lane.start()
        return lane

    def _forget_projected(self) -> None:
        self.outcomes.forget_upto(view_positions(self._db, "jobs").get("delivery", 0))

    def _prepare(self, due: DueDelivery) -> Outgoing:
        try:
            path = self._blobs.wait_for(due.sha256, timeout=5.0)
        except BlobCorruptError as exc:
            raise PermanentDeliveryError(str(exc)) from None
        except BlobError as exc:  # a remote store unreachable: tried again later
            raise TransientDeliveryError(str(exc)) from None
        if path is None:
            raise PermanentDeliveryError("stored object is missing from the blob store")
        item = Outgoing(
            delivery_id=due.delivery_id, path=path, sha256=due.sha256, size=due.size,
            sop_class_uid=due.sop_class_uid, sop_instance_uid=due.sop_instance_uid,
            transfer_syntax_uid=due.transfer_syntax_uid, load_header=lambda: _header(path),
        )
        return item if self._transforms is None else self._transforms.prepare(due, item)


def _header(path: Any) -> Any:
    try:
        return read_header(path, check=False)
    except HeaderError as exc:
        raise PermanentDeliveryError(f"stored object unreadable: {exc}") from None


def _due(row: dict[str, Any]) -> DueDelivery:
    return DueDelivery(
        delivery_id=row["delivery_id"], job_id=row["job_id"], destination=row["destination"],
        attempts=int(row["attempts"]), clock_from=float(row["clock_from"] or 0.0),
        sha256=row["sha256"], size=int(row["size"]), sop_class_uid=row["sop_class_uid"],
        sop_instance_uid=row["sop_instance_uid"],
        transfer_syntax_uid=row["transfer_syntax_uid"],
        correlation_id=row["correlation_id"] or "",
        matched_rules=row["matched_rules"] or "", calling_aet=row["calling_aet"] or "",
    )
