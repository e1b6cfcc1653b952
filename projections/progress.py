"""How far each view has got: its positions per log, read from ``projection_positions`` or
published by the projection runner after each committed batch, and waits until they pass a
target (the logs' heads a query noted when it started, see freshness.py).

The runner's process waits on :class:`ViewProgress`: threads on a condition variable, event
loops on futures the runner's thread resolves, so a waiter wakes at the batch that passes its
target, not at a poll. Processes that run no views (the receivers) use :class:`PolledProgress`.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Mapping
from typing import Protocol

from projections.db import ViewDatabase
from projections.positions import view_positions

Positions = Mapping[str, int]  # application (log) -> last position applied

# PolledProgress: first pause and ceiling between reads of the positions table (seconds).
POLL_FIRST = 0.002
POLL_MAX = 0.05


def passed(done: Positions, target: Positions) -> bool:
    """Every log of ``target`` is applied up to its position."""
    return all(done.get(app, 0) >= position for app, position in target.items())


class Progress(Protocol):
    """Where a query learns whether a view has passed its target, and waits for it."""

    def reached(self, view: str, target: Positions) -> bool: ...

    def wait(self, view: str, target: Positions, timeout: float) -> bool: ...

    async def wait_async(self, view: str, target: Positions, timeout: float) -> bool: ...


class ViewProgress:
    """Positions the runner of this process has committed; waiters wake on each batch."""

    def __init__(self) -> None:
        self._done: dict[str, dict[str, int]] = {}
        self._changed = threading.Condition()
        self._futures: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]]] = {}

    def advanced(self, view: str, done: Positions) -> None:
        """The runner committed a batch of ``view`` (or learnt its stored positions)."""
        if self._done.get(view) == done:
            return  # a poll that found nothing new: nobody to wake
        with self._changed:
            self._done[view] = dict(done)  # replaced, never changed: readers need no lock
            self._changed.notify_all()
            futures = list(self._futures.get(view, ()))
        for loop, future in futures:
            with contextlib.suppress(RuntimeError):  # that loop has closed meanwhile
                loop.call_soon_threadsafe(_resolve, future)

    def positions(self, view: str) -> dict[str, int]:
        return dict(self._done.get(view, {}))

    def reached(self, view: str, target: Positions) -> bool:
        return passed(self._done.get(view, {}), target)

    def wait(self, view: str, target: Positions, timeout: float) -> bool:
        """Block until ``view`` has passed ``target``; False after ``timeout`` seconds."""
        with self._changed:
            return self._changed.wait_for(lambda: self.reached(view, target), timeout)

    async def wait_async(self, view: str, target: Positions, timeout: float) -> bool:
        """As :meth:`wait`, without holding a thread: the runner resolves a future."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.reached(view, target):
            left = deadline - loop.time()
            if left <= 0:
                return False
            waiter = (loop, loop.create_future())
            with self._changed:
                self._futures.setdefault(view, set()).add(waiter)
            try:
                if self.reached(view, target):  # a batch committed before we registered
                    return True
                await asyncio.wait((waiter[1],), timeout=left)
            finally:
                with self._changed:
                    self._futures[view].discard(waiter)
        return True


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class PolledProgress:
    """Positions read from each view's database, for a process that runs no views.

    Nothing there signals a batch across processes, so a wait polls: after 2 ms, then doubling
    up to 50 ms. A query waits only when its view is behind, which is rare outside load.
    """

    def __init__(self, databases: Mapping[str, Callable[[], ViewDatabase]]) -> None:
        self._databases = databases

    def reached(self, view: str, target: Positions) -> bool:
        return passed(view_positions(self._databases[view](), view), target)

    def wait(self, view: str, target: Positions, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        pause = POLL_FIRST
        while not self.reached(view, target):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(pause, left))
            pause = min(pause * 2, POLL_MAX)
        return True

    async def wait_async(self, view: str, target: Positions, timeout: float) -> bool:
        return await asyncio.to_thread(self.wait, view, target, timeout)
