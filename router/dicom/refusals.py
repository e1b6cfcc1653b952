"""Refused associations in the audit trail: the DICOM front door (router/dicom/gate.py) notes
each refused A-ASSOCIATE-RQ here, and once a minute one ``AssociationRefusal.Recorded`` event
per address, calling AE title and reason is saved with its count (ATNA's Security Alert,
docs/atna.md). At most MAX_KEYS sources are told apart per minute; the rest are counted
together, so a flood costs a bounded number of events.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from router.application.commands import Actor
from router.domain.access import AssociationRefusal
from router.ticker import Ticker

logger = logging.getLogger(__name__)

MAX_KEYS = 200
OTHERS = ("", "various", "refusals from further sources this minute")


class RefusalRecorder:
    """Counts refusals (``note``, called by the gate's thread) and saves them (``flush``)."""

    def __init__(self, save: Callable[[list[Any]], None], node: str,
                 interval: float = 60.0) -> None:
        self._save = save
        self._node = node
        self._interval = interval
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str, str], list[float]] = {}  # [count, first, last]
        self._ticker: Ticker | None = None

    def note(self, address: str, calling_aet: str, why: str) -> None:
        """One refusal; quick and never raises (it runs in the front door's loop)."""
        now = time.time()
        key = (address[:64], calling_aet.strip()[:16], why[:200])
        with self._lock:
            if key not in self._counts and len(self._counts) >= MAX_KEYS:
                key = OTHERS
            entry = self._counts.setdefault(key, [0, now, now])
            entry[0] += 1
            entry[2] = now

    def flush(self) -> int:
        """Save what was counted since the last flush; returns how many events."""
        with self._lock:
            counts, self._counts = self._counts, {}
        if not counts:
            return 0
        events = [AssociationRefusal(**Actor(calling or "unknown", address).ctx(),
                                     reason=why, count=int(count), first_at=first,
                                     last_at=last, node=self._node)
                  for (address, calling, why), (count, first, last) in counts.items()]
        self._save(events)
        return len(events)

    def start(self) -> None:
        self._ticker = Ticker("refusals", self._flush_logged, self._interval)
        self._ticker.start()

    def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.stop(timeout=10)
            self._ticker = None
        self._flush_logged()

    def _flush_logged(self) -> None:
        try:
            self.flush()
        except Exception as exc:  # the counts of this minute are lost; the log has each one
            logger.error("refused associations not recorded: %s", type(exc).__name__)
