"""Turning attempt results into Delivery events, saved in batches by one thread.

Lanes hand over a result and go on sending; the recorder saves whatever has piled up in one
transaction (one commit for many deliveries) and only then releases the deliveries, so that
none is offered again before its outcome is in the log. The retry policy lives here.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from eventsourcing.application import AggregateNotFoundError
from eventsourcing.persistence import IntegrityError

from router.application.conflicts import save_changed
from router.dispatch.base import TransientDeliveryError
from router.dispatch.lanes import AttemptResult, DueDelivery
from router.domain.delivery import Delivery, delivery_id
from router.priority import lower_this_thread
from router.settings import DispatchSettings

logger = logging.getLogger(__name__)

BATCH = 200


def next_delay(attempt: int, settings: DispatchSettings) -> float:
    """Seconds before attempt ``attempt + 1`` after ``attempt`` transient failures."""
    delays = settings.retry_delays
    return delays[attempt - 1] if attempt <= len(delays) else settings.retry_every_after


class OutcomeRecorder:
    """Applies the retry policy to results and saves them, batched, to the delivery log."""

    def __init__(self, app: Any, settings: DispatchSettings, clock: Callable[[], float],
                 on_saved: Callable[[], None], node: str = "") -> None:
        self._app = app
        self._node = node  # recorded in each attempt's event
        self._settings = settings
        self._clock = clock
        self._on_saved = on_saved
        # None: wakes the saver at stop.
        self._queue: queue.Queue[tuple[AttemptResult, Callable[[], None]] | None] = \
            queue.Queue()
        self._recent: dict[str, int] = {}  # delivery id -> notification id of its outcome
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outcomes", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, result: AttemptResult, done: Callable[[], None]) -> None:
        """Queue a result; ``done()`` runs once it is saved (or could not be)."""
        self._queue.put((result, done))

    def stop(self, timeout: float = 10.0) -> None:
        """Save what is queued, then stop."""
        self._stop.set()
        self._queue.put(None)  # wakes the saver now, not at its next 0.2 s poll
        self._thread.join(timeout)

    def recent(self) -> set[str]:
        with self._lock:
            return set(self._recent)

    def forget_upto(self, position: int) -> None:
        """Deliveries whose outcome the jobs view has applied need no longer be skipped."""
        with self._lock:
            for key in [k for k, v in self._recent.items() if v <= position]:
                del self._recent[key]

    def _run(self) -> None:
        lower_this_thread()
        while not (self._stop.is_set() and self._queue.empty()):
            try:
                first = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            batch = [first] if first is not None else []
            while len(batch) < BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    batch.append(item)
            if batch:
                self._save_batch(batch)

    def _save_batch(self, batch: list[tuple[AttemptResult, Callable[[], None]]]) -> None:
        try:
            try:
                pending = [d for d in (self._apply(r, read_first=False) for r, _ in batch) if d]
                self._remember(self._app.save(*pending))
            except IntegrityError:
                # An operator's requeue or cancel raced with an attempt: one at a time, reading
                # each Delivery first so that the outcome lands on top of the command.
                for result, _ in batch:
                    self.record(result)
        except Exception:
            # The outcome is lost, not the delivery: it is still pending in the view and will
            # be attempted again (at least once delivery).
            logger.exception("saving %d delivery outcomes failed", len(batch))
        finally:
            for _, done in batch:
                done()
            self._on_saved()

    def record(self, result: AttemptResult) -> None:
        """Save one outcome, retrying on version conflicts with a fresh read."""
        recordings = save_changed(lambda: self._apply(result, read_first=True),
                                  lambda delivery: delivery, self._app.save)
        if recordings is not None:
            self._remember(recordings)

    def _remember(self, recordings: list[Any]) -> None:
        with self._lock:
            for recording in recordings:
                self._recent[str(recording.domain_event.originator_id)] = (
                    recording.notification.id)

    def _apply(self, result: AttemptResult, read_first: bool) -> Any:
        """The Delivery with the outcome's event triggered, or None when there is nothing to do.

        A success is recorded even after a cancel (the object did arrive); a failure after a
        cancel is not (the cancel stands).
        """
        due, error = result.due, result.error
        ctx = {"actor": "system", "source_ip": "", "correlation_id": due.correlation_id}
        delivery = self._load_or_create(due, ctx, read_first)
        attempt = delivery.attempts + 1
        if error is not None and delivery.status == "cancelled":
            logger.info("delivery to %s was cancelled during a failed attempt", due.destination)
            return None
        if error is None:
            delivery.succeed(**ctx, attempt=attempt, detail=result.detail[:500],
                             duration_ms=result.duration_ms, node=self._node,
                             transforms=list(result.transforms))
            return delivery
        logger.warning("delivery to %s failed (attempt %d): %s", due.destination, attempt, error)
        if not isinstance(error, TransientDeliveryError):
            delivery.dead_letter(**ctx, attempt=attempt, permanent=True, reason=str(error)[:1000],
                                 node=self._node, transforms=list(result.transforms))
            return delivery
        retry_at = self._clock() + next_delay(attempt, self._settings)
        if retry_at - due.clock_from > self._settings.max_age:
            delivery.dead_letter(**ctx, attempt=attempt, permanent=False,
                                 reason=f"gave up after {attempt} attempts: {error}"[:1000],
                                 node=self._node, transforms=list(result.transforms))
        else:
            delivery.fail_attempt(**ctx, attempt=attempt, error=str(error)[:1000],
                                  retry_at=retry_at, duration_ms=result.duration_ms,
                                  node=self._node, transforms=list(result.transforms))
        return delivery

    def _load_or_create(self, due: DueDelivery, ctx: dict[str, str], read_first: bool) -> Any:
        if due.attempts == 0 and not read_first:
            # First attempt per the view: create without a read. If an operator's command
            # created it meanwhile, the save conflicts and the batch is redone with reads.
            return Delivery(due.job_id, due.destination, **ctx, sha256=due.sha256)
        try:
            return self._app.repository.get(delivery_id(due.job_id, due.destination))
        except AggregateNotFoundError:
            return Delivery(due.job_id, due.destination, **ctx, sha256=due.sha256)
