"""Where views live: one SQLite file per view (embedded default) or PostgreSQL tables.

SQL is written once with ``?`` placeholders and upserts both engines understand; this module
translates placeholders for psycopg and hands out per-thread SQLite connections.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

Row = dict[str, Any]


class Cursor(Protocol):
    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any: ...
    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> Any: ...
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...


class Queryable(Protocol):
    """What a read needs of a view database: ``?`` placeholders, rows as dicts. A
    ViewDatabase is one; tests pass small fakes."""

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]: ...


class ViewDatabase:
    """A connection factory for one view's tables."""

    dialect: str

    def transaction(self) -> Any:
        raise NotImplementedError

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class SqliteViews(ViewDatabase):
    """One SQLite file, WAL mode; each thread has its own connection."""

    dialect = "sqlite"

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None,
                                   check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # views are rebuildable from the log
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Cursor]:
        conn = self._conn()
        cur = conn.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            yield cur
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        cur.execute("COMMIT")

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return [dict(r) for r in self._conn().execute(sql, params).fetchall()]

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()
        self._local = threading.local()


class _PgCursor:
    """psycopg cursor that accepts ``?`` placeholders."""

    def __init__(self, cur: Any) -> None:
        self._cur = cur

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self._cur.execute(sql.replace("?", "%s"), params)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> Any:
        return self._cur.executemany(sql.replace("?", "%s"), rows)

    def fetchone(self) -> Any:
        return self._cur.fetchone()

    def fetchall(self) -> list[Any]:
        return list(self._cur.fetchall())


class PostgresViews(ViewDatabase):
    """Tables in the events database. The views of one process share one small connection
    pool (``_SharedPool``): one pool per view held a connection each while idle, and several
    nodes share the server's connections."""

    dialect = "postgres"

    def __init__(self, url: str) -> None:
        self._url = url
        self._pool = _SharedPool.take(url)
        self._closed = False

    @contextmanager
    def transaction(self) -> Iterator[_PgCursor]:
        # Pipeline mode: a statement whose result is not read (a view's INSERTs and UPDATEs)
        # is sent without waiting for the server's answer; a fetch or the commit waits for
        # all before it. Without it a batch waited for one round trip per statement, and the
        # views' threads spent most of their time there (docs/benchmarks.md, 2026-12-07).
        with (self._pool.connection() as conn, conn.pipeline(), conn.transaction(),
              conn.cursor() as cur):
            yield _PgCursor(cur)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        with self._pool.connection() as conn, conn.cursor() as cur:
            cur.execute(sql.replace("?", "%s"), params)
            rows = [dict(r) for r in cur.fetchall()]
            conn.rollback()
            return rows

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            _SharedPool.give_back(self._url)


class _SharedPool:
    """One psycopg pool per database URL and process, closed with its last user."""

    MIN_SIZE = 0  # kept open (as the event stores' pools, router.application.stores)
    MAX_SIZE = 8  # a batch per view at once, and the web server's queries

    _pools: dict[str, tuple[Any, int]] = {}
    _lock = threading.Lock()

    @classmethod
    def take(cls, url: str) -> Any:
        from psycopg.rows import dict_row
        from psycopg_pool import ConnectionPool

        with cls._lock:
            pool, users = cls._pools.get(url, (None, 0))
            if pool is None:
                # check: a pooled connection is tested (one empty query) before it is handed
                # out. Without it, after PostgreSQL restarted or terminated our sessions, each
                # dead connection failed once in the hands of a caller: a view batch, a page.
                pool = ConnectionPool(url, min_size=cls.MIN_SIZE, max_size=cls.MAX_SIZE,
                                      open=True, check=ConnectionPool.check_connection,
                                      kwargs={"row_factory": dict_row, "autocommit": False})
            cls._pools[url] = (pool, users + 1)
            return pool

    @classmethod
    def give_back(cls, url: str) -> None:
        with cls._lock:
            pool, users = cls._pools.pop(url, (None, 0))
            if pool is None:
                return
            if users > 1:
                cls._pools[url] = (pool, users - 1)
                return
        pool.close()


def open_views(database_url: str, name: str) -> ViewDatabase:
    """The database of view ``name`` for a router whose events are at ``database_url``."""
    if database_url.startswith(("postgresql://", "postgres://")):
        return PostgresViews(database_url)
    if database_url.startswith("sqlite:///"):
        return SqliteViews(Path(database_url.removeprefix("sqlite:///")) / f"view_{name}.sqlite")
    raise ValueError(f"unsupported database_url for views: {database_url[:20]}...")
