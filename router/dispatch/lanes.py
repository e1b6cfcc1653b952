"""One lane per destination: a queue and ``concurrency`` worker threads, each with its own
adapter (so a DICOM lane holds up to that many associations). A slow or dead destination
only ever blocks its own lane.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from router.dispatch.base import (
    Adapter,
    DeliveryError,
    Outgoing,
    SeatUnavailable,
    TransientDeliveryError,
)
from router.priority import lower_this_thread

logger = logging.getLogger(__name__)

_PARKED_POLL = 0.2  # seconds between looks at the peer's seats by a worker holding none


@dataclass(frozen=True)
class DueDelivery:
    """A row of the deliveries queue, with what is needed to send it."""

    delivery_id: str
    job_id: str
    destination: str
    attempts: int
    clock_from: float
    sha256: str
    size: int
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    correlation_id: str
    matched_rules: str = ""  # the routing decision's rules (JSON), for their transforms
    calling_aet: str = ""  # for transforms' conditions on the sender


@dataclass(frozen=True)
class AttemptResult:
    due: DueDelivery
    error: DeliveryError | None
    detail: str
    duration_ms: int
    transforms: tuple[dict[str, object], ...] = ()  # what router.transforms did to the copy


class Lane:
    """Workers for one destination at one configuration version."""

    def __init__(
        self,
        name: str,
        version: int,
        concurrency: int,
        make_adapter: Callable[[], Adapter],
        prepare: Callable[[DueDelivery], Outgoing],
        record: Callable[[AttemptResult, Callable[[], None]], None],
    ) -> None:
        self.name = name
        self.version = version
        # None: wakes a worker at stop (without it, stop waited for the 0.5 s poll).
        self.queue: queue.Queue[DueDelivery | None] = queue.Queue()
        self.in_flight: set[str] = set()
        # Two versions of one SOP Instance UID never travel at once: they would race for the
        # same file, key or PACS record, and the older one could win.
        self._uids: dict[str, str] = {}
        self._lock = threading.Lock()
        self._make_adapter = make_adapter
        self._prepare = prepare
        self._record = record
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._work, name=f"lane-{name}-{i}", daemon=True)
            for i in range(concurrency)
        ]
        self.concurrency = concurrency

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def offer(self, due: DueDelivery) -> bool:
        with self._lock:
            if due.delivery_id in self.in_flight or due.sop_instance_uid in self._uids:
                return False
            self.in_flight.add(due.delivery_id)
            self._uids[due.sop_instance_uid] = due.delivery_id
        self.queue.put(due)
        return True

    def busy_ids(self) -> set[str]:
        with self._lock:
            return set(self.in_flight)

    def backlog(self) -> int:
        return self.queue.qsize()

    def stop(self, grace: float) -> None:
        """Workers finish the instance in hand (up to ``grace`` s); queued items stay pending."""
        self._stop.set()
        for _ in self._threads:
            self.queue.put(None)
        deadline = time.monotonic() + grace
        for t in self._threads:
            if t.is_alive():
                t.join(timeout=max(0.0, deadline - time.monotonic()))

    def _work(self) -> None:
        lower_this_thread()
        adapter: Adapter | None = None
        try:
            while not self._stop.is_set():
                if adapter is not None and not _ready(adapter):
                    self._stop.wait(_PARKED_POLL)  # the peer's seats are taken by our others
                    continue
                try:
                    due = self.queue.get(timeout=0.5)
                except queue.Empty:
                    if adapter is not None and self.queue.empty():
                        adapter = self._idle(adapter)
                    continue
                if due is None or self._stop.is_set():
                    if due is not None:
                        self._release(due)
                    break
                adapter = self._attempt(adapter, due)
        finally:
            if adapter is not None:
                _close(adapter)

    def _idle(self, adapter: Adapter) -> Adapter | None:
        idle = getattr(adapter, "idle", None)
        if callable(idle):
            idle()  # adapters close idle associations themselves
        return adapter

    def _attempt(self, adapter: Adapter | None, due: DueDelivery) -> Adapter | None:
        started = time.monotonic()
        error: DeliveryError | None = None
        detail = ""
        item: Outgoing | None = None
        try:
            if adapter is None:
                adapter = self._make_adapter()
            item = self._prepare(due)
            detail = adapter.send(item)
        except SeatUnavailable:
            self.queue.put(due)  # not attempted: a worker holding an association takes it
            return adapter
        except DeliveryError as exc:
            error = exc
        except Exception as exc:  # an adapter bug must not kill the lane or lose the item
            logger.exception("destination %s: unexpected error", self.name)
            error = TransientDeliveryError(f"internal error: {type(exc).__name__}")
            if adapter is not None:
                _close(adapter)
            adapter = None
        finally:
            if item is not None and item.scratch:
                _discard(item.path)
        duration = int((time.monotonic() - started) * 1000)
        transforms = item.transforms if item is not None else getattr(error, "transforms", ())
        try:
            # Released once the outcome is saved: until then it must not be offered again.
            self._record(AttemptResult(due, error, detail, duration, tuple(transforms)),
                         lambda: self._release(due))
        except Exception:
            logger.exception("destination %s: handing over an outcome failed", self.name)
            self._release(due)
        return adapter

    def _release(self, due: DueDelivery) -> None:
        with self._lock:
            self.in_flight.discard(due.delivery_id)
            if self._uids.get(due.sop_instance_uid) == due.delivery_id:
                del self._uids[due.sop_instance_uid]


def _ready(adapter: Any) -> bool:
    ready = getattr(adapter, "ready", None)
    return not callable(ready) or bool(ready())


def _discard(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        logger.warning("cannot remove the transformed copy %s", path.name)


def _close(adapter: Any) -> None:
    try:
        adapter.close()
    except Exception:
        logger.exception("closing adapter failed")
