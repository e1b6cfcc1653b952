"""A background loop that calls ``tick`` when woken, else every ``interval`` seconds.

Shared by the AI worker and the unit scheduler: one daemon thread each; an exception in a tick
is logged and the next tick tries again (the database may be away for a while).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)


class Ticker:
    def __init__(self, name: str, tick: Callable[[], object], interval: float) -> None:
        self._name = name
        self._tick = tick
        self._interval = interval
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                self._tick()
            except Exception:
                logger.exception("%s tick failed; retrying", self._name)
            self._wake.wait(self._interval)
