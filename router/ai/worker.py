"""The AI worker: makes the requests of released units to their AI processors and watches for
callbacks that do not come.

Due requests are rows of the jobs view's ``ai_requests`` table (pending, or retrying and due);
each attempt is recorded as ``AIRequest.Requested``/``Resent`` before the POST (so a callback
that overtakes our own bookkeeping finds its request) and ``Accepted``, ``AttemptFailed`` or
``DeadLettered`` after it. An accepted request with no callback by its deadline is
``TimedOut`` and made again under the dispatcher's retry policy, then dead-lettered.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from eventsourcing.persistence import IntegrityError

from projections.ai_requests_queries import due_requests, overdue_requests
from projections.db import ViewDatabase
from router.ai.requests import AIRequests, RequestRow
from router.application.admin_state import AdminState
from router.dispatch.base import DeliveryError, TransientDeliveryError
from router.dispatch.outcomes import next_delay
from router.domain.ai import AIRequest
from router.settings import DispatchSettings
from router.ticker import Ticker

logger = logging.getLogger(__name__)



class AIWorker:
    """One feeder thread; attempts run on a small pool per destination."""

    def __init__(self, requests: AIRequests, jobs_db: ViewDatabase, admin: AdminState,
                 settings: DispatchSettings, clock: Callable[[], float] = time.time,
                 on_saved: Callable[[], None] = lambda: None,
                 leads: Callable[[], bool] = lambda: True) -> None:
        self.requests = requests
        self._leads = leads  # one node sends AI requests at a time (router.cluster)
        self._db = jobs_db
        self._admin = admin
        self._settings = settings
        self.clock = clock
        self._on_saved = on_saved
        self._pools: dict[str, ThreadPoolExecutor] = {}
        self._busy: set[str] = set()
        self._lock = threading.Lock()
        self._ticker = Ticker("ai-worker", self.tick, settings.poll_interval)

    def start(self) -> None:
        self._ticker.start()

    def wake(self) -> None:
        self._ticker.wake()

    def stop(self) -> None:
        self._ticker.stop()
        for pool in self._pools.values():
            pool.shutdown(wait=True, cancel_futures=True)

    def tick(self) -> None:
        """Start due attempts and record overdue callbacks."""
        if not self._leads():
            return
        now = self.clock()
        for name, state in self._admin.snapshot().live_destinations().items():
            if state.config.get("type") != "ai" or state.paused:
                continue
            for row in due_requests(self._db, name, now):
                self._submit(name, int(state.config.get("concurrency") or 1), RequestRow.of(row))
        for row in overdue_requests(self._db, now):
            self._saving(functools.partial(self._overdue, RequestRow.of(row)))

    def _submit(self, destination: str, concurrency: int, row: RequestRow) -> None:
        with self._lock:
            if row.request_id in self._busy:
                return
            self._busy.add(row.request_id)
        pool = self._pools.get(destination)
        if pool is None:
            pool = self._pools[destination] = ThreadPoolExecutor(
                max_workers=concurrency, thread_name_prefix=f"ai-{destination}")
        pool.submit(self._attempt, row)

    def _attempt(self, row: RequestRow) -> None:
        try:
            self._saving(lambda: self._make_attempt(row))
        finally:
            with self._lock:
                self._busy.discard(row.request_id)

    def _saving(self, action: Callable[[], Any]) -> None:
        try:
            action()
        except IntegrityError:
            pass  # a callback or another node got there first: read again next tick
        except Exception:
            logger.exception("AI request bookkeeping failed")
        self._on_saved()

    def _make_attempt(self, row: RequestRow) -> None:
        aggregate = self.requests.load(row.request_id)
        if aggregate is not None and (aggregate.attempts != row.attempts
                                      or aggregate.status != "retrying"):
            return  # the view has not caught up with the last attempt yet
        ctx = self._ctx(row)
        attempt = row.attempts + 1
        started = time.monotonic()
        try:
            prepared = self.requests.prepare(row)
        except DeliveryError as exc:
            aggregate = self.requests.record_request(aggregate, row, attempt, None, ctx)
            self._failed(row, aggregate, attempt, exc, started, ctx)
            return
        try:
            recorded = self.requests.record_request(aggregate, row, attempt, prepared, ctx)
            try:
                answer = self.requests.post(row, prepared)
            except DeliveryError as exc:
                self._failed(row, recorded, attempt, exc, started, ctx)
                return
        finally:
            prepared.body.discard()
        aggregate = recorded
        aggregate = self._fresh(row, aggregate)
        if aggregate.status == "requested":
            deadline = self.clock() + self.requests.callback_timeout(row.destination)
            aggregate.accept(**ctx, attempt=attempt, http_status=answer.status,
                             deadline=deadline, duration_ms=_ms(started))
            self.requests.save(aggregate)

    def _failed(self, row: RequestRow, aggregate: AIRequest, attempt: int,
                error: DeliveryError, started: float, ctx: dict[str, str]) -> None:
        logger.warning("AI request to %s failed (attempt %d): %s", row.destination, attempt,
                       error)
        aggregate = self._fresh(row, aggregate)
        if not aggregate.is_open:
            return
        retry_at = self.clock() + next_delay(attempt, self._settings)
        if not isinstance(error, TransientDeliveryError):
            aggregate.dead_letter(**ctx, attempt=attempt, permanent=True, reason=str(error)[:1000])
        elif retry_at - row.clock_from > self._settings.max_age:
            aggregate.dead_letter(**ctx, attempt=attempt, permanent=False,
                                  reason=f"gave up after {attempt} attempts: {error}"[:1000])
        else:
            aggregate.fail_attempt(**ctx, attempt=attempt, error=str(error)[:1000],
                                   retry_at=retry_at, duration_ms=_ms(started))
        self.requests.save(aggregate)

    def _overdue(self, row: RequestRow) -> None:
        aggregate = self.requests.load(row.request_id)
        if aggregate is None or aggregate.status != "accepted" \
                or aggregate.attempts != row.attempts:
            return
        ctx = self._ctx(row)
        waited = _duration_text(self.requests.callback_timeout(row.destination))
        retry_at = self.clock() + next_delay(row.attempts, self._settings)
        if retry_at - row.clock_from > self._settings.max_age:
            aggregate.dead_letter(**ctx, attempt=row.attempts, permanent=False,
                                  reason=f"no callback within {waited}; gave up after "
                                         f"{row.attempts} attempts")
        else:
            aggregate.time_out(**ctx, attempt=row.attempts, retry_at=retry_at)
        self.requests.save(aggregate)

    def _fresh(self, row: RequestRow, aggregate: AIRequest) -> AIRequest:
        """The aggregate as stored now (a callback may have been recorded meanwhile)."""
        return self.requests.load(row.request_id) or aggregate

    @staticmethod
    def _ctx(row: RequestRow) -> dict[str, str]:
        return {"actor": "system", "source_ip": "", "correlation_id": row.request_id}


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def _duration_text(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)} {unit}"
    return f"{int(seconds)} s"

