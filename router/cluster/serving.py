"""The serving lock: a running router holds it, shared, from start to stop; ``dicom-router
projections rebuild`` takes it exclusively, so it refuses while any router serves the same
database (its views would be dropped under it) and a router does not start during a rebuild.

SQLite: an flock on ``serving.lock`` in the databases' folder. PostgreSQL: a session advisory
lock (shared by every node) on a connection of its own; the server releases a dead node's
share when its session ends.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from pathlib import Path
from typing import Any

from router.settings import Settings

logger = logging.getLogger(__name__)

LOCK_FILE = "serving.lock"
ADVISORY_KEY = "dicom-router:serving"


class ServingLock:
    """Held shared by a serving router, or exclusively by a rebuild."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._fd: int | None = None
        self._conn: Any = None

    @property
    def where(self) -> str:
        """What the lock guards, for messages (never a password: the URL's host and path)."""
        if self._settings.is_postgres:
            url = self._settings.database_url
            return "the PostgreSQL database " + url.rsplit("@", 1)[-1].split("?", 1)[0]
        return f"the SQLite databases in {self._settings.sqlite_dir}"

    def try_shared(self) -> bool:
        """Take a share unless a rebuild holds the lock."""
        return self._acquire(exclusive=False, wait=False)

    def hold_shared(self) -> None:
        """Take a share, waiting while a rebuild holds the lock (a router starting)."""
        if not self.try_shared():
            logger.warning("waiting for a projections rebuild on %s to finish", self.where)
            self._acquire(exclusive=False, wait=True)

    def try_exclusive(self) -> bool:
        """Take the lock alone if no router serves (a rebuild); False when one does."""
        return self._acquire(exclusive=True, wait=False)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None
        if self._conn is not None:
            with contextlib.suppress(Exception):  # the server releases the lock with it
                self._conn.close()
            self._conn = None

    def _acquire(self, exclusive: bool, wait: bool) -> bool:
        if self._settings.is_postgres:
            return self._advisory(exclusive, wait)
        return self._flock(exclusive, wait)

    def _flock(self, exclusive: bool, wait: bool) -> bool:
        folder = Path(self._settings.sqlite_dir)
        folder.mkdir(parents=True, exist_ok=True)
        if self._fd is None:
            self._fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if wait else fcntl.LOCK_NB)
        try:
            fcntl.flock(self._fd, mode)
        except BlockingIOError:
            return False
        return True

    def _advisory(self, exclusive: bool, wait: bool) -> bool:
        if self._conn is None:
            import psycopg

            self._conn = psycopg.connect(self._settings.database_url, autocommit=True,
                                         connect_timeout=10,
                                         application_name="dicom-router serving lock")
        name = "pg_advisory_lock" if wait else "pg_try_advisory_lock"
        function = name if exclusive else name + "_shared"
        row = self._conn.execute(f"SELECT {function}(hashtext(%s))", (ADVISORY_KEY,)).fetchone()
        return True if wait else bool(row[0])
