"""Read-your-writes: a query sees every write acknowledged before it started.

A write is acknowledged once its events are committed to a log; the views apply them a batch
later. So a query first notes the head (last position) of each log its view follows, then
waits until the view has applied them (progress.py), at most ``READ_WAIT`` seconds; after that
it answers from the view as it is and says that the view lags. Logs' positions are committed in
order (one writer at a time on SQLite; PostgreSQL inserts under eventsourcing's table lock), so
a view past the head holds everything committed before it was read.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from projections.progress import Progress

READ_WAIT = 2.0  # seconds a query waits for its view before answering with a lag flag


class LogHeads:
    """The head of each log, read when a query starts.

    SQLite: straight from the log files on a connection of the calling thread (about 8 us a
    log, against 75 us through eventsourcing's recorder), cheap enough for an event loop.
    PostgreSQL: every log asked for in one statement; from a thread on a connection of the
    first log's pool, from an event loop on a connection of that loop (given ``database_url``):
    one round trip, where a thread hop and the pool's check of its connection cost two more.
    """

    def __init__(self, apps: Mapping[str, Any], database_url: str | None = None) -> None:
        self._recorders = {name: app.recorder for name, app in apps.items()}
        files = {name: _sqlite_file(r) for name, r in self._recorders.items()}
        self._files = {name: path for name, path in files.items() if path is not None}
        self.local = len(self._files) == len(files)  # no network: may be read on an event loop
        # Each thread's own connections: they go (closed) with their thread, or with this
        # object's local on close().
        self._threads = threading.local()
        postgres = any(hasattr(r, "max_notification_id_statement")
                       for r in self._recorders.values())
        self._on_loop = _LoopConnections(database_url) if postgres and database_url else None
        self._statements: dict[tuple[str, ...], Any] = {}

    def read(self, logs: Sequence[str]) -> dict[str, int]:
        if self.local:
            return {name: self._sqlite_head(name) for name in logs}
        first = self._recorders[logs[0]]
        if hasattr(first, "max_notification_id_statement"):
            with first.datastore.get_connection() as conn:
                row = conn.execute(self._statement(logs)).fetchone()  # a dict: its row factory
            return {name: int(row[name] or 0) for name in logs}
        return {name: int(self._recorders[name].max_notification_id() or 0) for name in logs}

    async def read_async(self, logs: Sequence[str]) -> dict[str, int]:
        """:meth:`read` from an event loop, without blocking it."""
        if self.local:
            return self.read(logs)
        if self._on_loop is None:
            return await asyncio.to_thread(self.read, logs)
        row = await self._on_loop.fetch(self._statement(logs))
        return {name: int(row[name] or 0) for name in logs}

    def _sqlite_head(self, name: str) -> int:
        conns: dict[str, sqlite3.Connection] | None = getattr(self._threads, "conns", None)
        if conns is None:
            conns = self._threads.conns = {}
        conn = conns.get(name)
        if conn is None:
            # Autocommit: each SELECT is its own read transaction, so it sees every commit
            # made before it. WAL readers do not wait for writers; the short busy timeout
            # bounds the rare wait (WAL recovery) where this runs on an event loop.
            conn = conns[name] = sqlite3.connect(self._files[name], timeout=1,
                                                 isolation_level=None, check_same_thread=False)
        statement = self._recorders[name].select_max_notification_id_statement
        return int(conn.execute(statement).fetchone()[0] or 0)

    def _statement(self, logs: Sequence[str]) -> Any:
        """PostgreSQL: ``SELECT (SELECT MAX(notification_id) FROM ...) AS ingest, ...``."""
        statement = self._statements.get(tuple(logs))
        if statement is None:
            from psycopg.sql import SQL, Identifier

            statement = self._statements[tuple(logs)] = SQL("SELECT ") + SQL(", ").join(
                SQL("({}) AS {}").format(self._recorders[name].max_notification_id_statement,
                                         Identifier(name))
                for name in logs)
        return statement

    def close(self) -> None:
        self._threads = threading.local()  # drops every thread's SQLite connections
        if self._on_loop is not None:
            self._on_loop.close()


class _LoopConnections:
    """PostgreSQL: one connection per event loop, autocommit, used by one query at a time
    (a statement takes one round trip), opened again once after an error."""

    def __init__(self, database_url: str) -> None:
        self._url = database_url
        self._held: dict[asyncio.AbstractEventLoop, tuple[asyncio.Lock, list[Any]]] = {}

    async def fetch(self, statement: Any) -> Any:
        import psycopg
        from psycopg.rows import dict_row

        lock, held = self._held.setdefault(asyncio.get_running_loop(), (asyncio.Lock(), []))
        async with lock:
            for attempt in (1, 2):
                if not held:
                    held.append(await psycopg.AsyncConnection.connect(
                        self._url, autocommit=True, connect_timeout=2, row_factory=dict_row))
                try:
                    cursor = await held[0].execute(statement)
                    return await cursor.fetchone()
                except psycopg.OperationalError:  # the server restarted or dropped us
                    await held.pop().close()
                    if attempt == 2:
                        raise
        return None  # not reached

    def close(self) -> None:
        """Close every loop's connection (from any thread: closing sends nothing)."""
        for _, held in self._held.values():
            for conn in held:
                conn.pgconn.finish()
        self._held.clear()


def _sqlite_file(recorder: Any) -> str | None:
    pool = getattr(getattr(recorder, "datastore", None), "pool", None)
    if pool is None or getattr(pool, "is_sqlite_memory_mode", True):
        return None
    return str(pool.db_name) or None


class FreshReads:
    """Waits, before a query, for its view to pass the heads of the logs it follows."""

    def __init__(self, heads: LogHeads, follows: Mapping[str, Sequence[str]],
                 progress: Progress, hurry: Callable[[str], None] = lambda view: None,
                 timeout: float = READ_WAIT) -> None:
        self._heads = heads
        self._follows = follows
        self._progress = progress
        self._hurry = hurry  # the runner's: a waiting query has it apply what is recorded now
        self.timeout = timeout

    def heads(self, view: str) -> dict[str, int]:
        return self._heads.read(self._follows[view])

    def wait(self, view: str, timeout: float | None = None) -> bool:
        """Block until ``view`` holds every write committed before this call; False when it
        still lags after ``timeout`` (default ``self.timeout``) seconds."""
        target = self.heads(view)
        if self._progress.reached(view, target):
            return True
        self._hurry(view)
        return self._progress.wait(view, target, self.timeout if timeout is None else timeout)

    async def wait_async(self, view: str, timeout: float | None = None) -> bool:
        """:meth:`wait` for an event loop, which it does not block."""
        target = await self._heads.read_async(self._follows[view])
        if self._progress.reached(view, target):
            return True
        self._hurry(view)
        return await self._progress.wait_async(
            view, target, self.timeout if timeout is None else timeout)

    def close(self) -> None:
        self._heads.close()
