"""Duties that one node at a time performs: building a view, sending to a destination, the
series/study timers, retention, the AI worker.

On PostgreSQL a duty is a session-level advisory lock held on one connection of this node
(``pg_try_advisory_lock``). The server releases a dead node's locks as soon as its session
ends: a killed process's connection is closed by its kernel, so another node takes the duty
at its next try (every second). A node that loses its connection loses its duties at once and
stops performing them within a second, before it tries to take them back.

On SQLite the database belongs to one node, which holds every duty.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from router.cluster.schema import is_postgres

logger = logging.getLogger(__name__)

RETRY = 1.0  # seconds between tries for a duty another node holds
CHECK = 1.0  # seconds between checks that our connection (and so our locks) is alive


class Leadership:
    """Which duties this node holds; :meth:`holds` is cheap and thread-safe."""

    def holds(self, duty: str) -> bool:
        raise NotImplementedError

    def held(self) -> list[str]:
        raise NotImplementedError

    def close(self) -> None:
        """Give every duty up (another node takes them at its next try)."""


class SoleNode(Leadership):
    """One node owns the database (SQLite): every duty is ours."""

    def holds(self, duty: str) -> bool:
        return True

    def held(self) -> list[str]:
        return ["all"]


class AdvisoryLocks(Leadership):
    """Duties as PostgreSQL session advisory locks on one dedicated connection."""

    def __init__(self, database_url: str, node_id: str,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._url = database_url
        self._node = node_id
        self._clock = clock
        self._lock = threading.Lock()
        self._conn: Any = None
        self._held: set[str] = set()
        self._tried: dict[str, float] = {}  # duty -> when we last tried and failed
        self._checked = 0.0
        self._closed = False

    def holds(self, duty: str) -> bool:
        with self._lock:
            if self._closed:
                return False
            now = self._clock()
            if not self._alive(now):
                return False
            if duty in self._held:
                return True
            if now - self._tried.get(duty, -RETRY) < RETRY:
                return False
            self._tried[duty] = now
            try:
                got = self._conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))",
                                         (_key(duty),)).fetchone()[0]
            except Exception as exc:
                self._lost(type(exc).__name__)
                return False
            if got:
                self._held.add(duty)
                self._tried.pop(duty, None)
                logger.info("node %s took %s", self._node, duty)
            return bool(got)

    def held(self) -> list[str]:
        with self._lock:
            return sorted(self._held)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._held.clear()
            if self._conn is not None:
                with contextlib.suppress(Exception):  # closing a broken connection
                    self._conn.close()  # the server releases every lock of the session
                self._conn = None

    def _alive(self, now: float) -> bool:
        """Our connection is open (opened if need be); checked at most once per CHECK s."""
        if self._conn is None:
            import psycopg

            try:
                self._conn = psycopg.connect(self._url, autocommit=True, connect_timeout=5,
                                             application_name=f"dicom-router {self._node}")
            except Exception as exc:
                logger.warning("duties: cannot connect to the database (%s); this node "
                               "performs none until it can", type(exc).__name__)
                return False
            self._checked = now
            return True
        if now - self._checked >= CHECK:
            self._checked = now
            try:
                self._conn.execute("SELECT 1")
            except Exception as exc:
                self._lost(type(exc).__name__)
                return False
        return True

    def _lost(self, why: str) -> None:
        if self._held:
            logger.warning("node %s lost its database session (%s): it gives up %s", self._node,
                           why, ", ".join(sorted(self._held)))
        self._held.clear()
        with contextlib.suppress(Exception):  # already broken
            self._conn.close()
        self._conn = None


def _key(duty: str) -> str:
    return f"dicom-router:duty:{duty}"


def leadership_for(database_url: str, node_id: str) -> Leadership:
    return AdvisoryLocks(database_url, node_id) if is_postgres(database_url) else SoleNode()
