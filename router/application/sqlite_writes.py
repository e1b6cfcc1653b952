"""SQLite logs: writers of several processes take turns on a lock that wakes its waiter, and
each commit is made durable after the lock is released.

The receivers and the supervisor write to the same SQLite files. SQLite makes a writer that
finds the file locked sleep and retry (1, 2, 5, 10... ms), while a commit here takes about
0.3 ms: with four associations on two receivers, ``strace`` counted 144 such sleeps per 500
instances. An exclusive ``flock`` on ``<log>.sqlite.lock``, taken around every write
transaction, queues writers in the kernel instead, and the next one starts as soon as the
previous commit ends. SQLite's own locking still applies underneath (a writer that does not
take the flock stays correct, only slower). Readers never take it: WAL readers do not block.

Durability: with ``synchronous=FULL`` SQLite fsyncs the WAL inside the commit, holding the
write lock, and every other writer waited for that disk flush (about 1 ms, more while spool
files are being flushed too): the lock was held 1.7 ms per receipt and for about 60% of the
time with four associations. The logs run ``synchronous=NORMAL`` instead (the commit writes the
WAL without fsync) and every write transaction, once the lock is released, ``fdatasync``s the
WAL itself before it returns. So a save still returns only once its commit is on disk, as with
FULL, but the flushes of concurrent writers overlap instead of queueing. A WAL that SQLite
replaced meanwhile needs nothing: it is replaced only after a checkpoint, which under NORMAL
syncs the WAL before and the database after copying it.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from eventsourcing.sqlite import SQLiteConnection, SQLiteConnectionPool, SQLiteDatastore

_applied = False


class LogNotDurable(OSError):
    """The transaction was committed (other readers see it) but its WAL could not be synced:
    the caller must not report it as durable."""


class WriteLock:
    """One log's lock: a thread lock (flock is per open file, shared by this process's
    threads) and the flock that orders the processes."""

    def __init__(self, path: str, wal: str) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._threads = threading.Lock()
        self._wal = wal
        self._wal_fds: dict[int, int] = {}  # inode -> descriptor, kept open until close()
        self._wal_lock = threading.Lock()

    @contextmanager
    def held(self) -> Iterator[None]:
        with self._threads:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def sync_log(self) -> None:
        """fdatasync the WAL: what was committed before this call is then on disk."""
        try:
            fd = self._wal_descriptor()
        except FileNotFoundError:
            return  # checkpointed and removed: in the database file, synced by the checkpoint
        try:
            os.fdatasync(fd)
        except OSError as exc:
            raise LogNotDurable(exc.errno, f"WAL sync failed: {exc.strerror}") from None

    def _wal_descriptor(self) -> int:
        """A descriptor of the current WAL file (FileNotFoundError when there is none)."""
        inode = os.stat(self._wal).st_ino
        with self._wal_lock:
            fd = self._wal_fds.get(inode)
            if fd is None:
                fd = os.open(self._wal, os.O_RDONLY | os.O_CLOEXEC)
                known = self._wal_fds.setdefault(os.fstat(fd).st_ino, fd)
                if known != fd:  # replaced since the stat, by one already held
                    os.close(fd)
                    fd = known
            return fd

    def close(self) -> None:
        os.close(self._fd)
        with self._wal_lock:
            for fd in self._wal_fds.values():
                os.close(fd)
            self._wal_fds.clear()


def _lock_of(datastore: SQLiteDatastore) -> WriteLock | None:
    lock = datastore.__dict__.get("_router_write_lock", False)
    if lock is False:
        name = datastore.pool.db_name
        memory = datastore.pool.is_sqlite_memory_mode or not name
        lock = None if memory else WriteLock(f"{name}.lock", f"{name}-wal")
        datastore.__dict__["_router_write_lock"] = lock
    return lock


def _ordered(transaction: Callable[..., Any]) -> Callable[..., Any]:
    @contextmanager
    def ordered_transaction(self: SQLiteDatastore, *, commit: bool) -> Iterator[Any]:
        lock = _lock_of(self) if commit else None
        if lock is None:
            with transaction(self, commit=commit) as cursor:
                yield cursor
            return
        with lock.held(), transaction(self, commit=commit) as cursor:
            yield cursor
        lock.sync_log()  # committed; durable once this returns (see the module's docstring)

    return ordered_transaction


def _synchronous_normal(create: Callable[..., SQLiteConnection]) -> Callable[..., Any]:
    def create_connection(self: SQLiteConnectionPool) -> SQLiteConnection:
        connection = create(self)
        if not self.is_sqlite_memory_mode:
            # The WAL is synced by every write transaction itself, after the write lock.
            connection._sqlite_conn.execute("PRAGMA synchronous=NORMAL")
        return connection

    return create_connection


def order_sqlite_writes() -> None:
    """Make every write transaction on an SQLite log take its log's WriteLock and sync the WAL
    after it (idempotent)."""
    global _applied
    if _applied:
        return
    SQLiteDatastore.transaction = _ordered(  # type: ignore[method-assign]
        SQLiteDatastore.transaction)
    SQLiteConnectionPool._create_connection = _synchronous_normal(  # type: ignore[method-assign]
        SQLiteConnectionPool._create_connection)
    _applied = True


def release(datastore: Any) -> None:
    """Close the lock file of a datastore being closed (nothing if it never wrote)."""
    lock = getattr(datastore, "__dict__", {}).pop("_router_write_lock", None)
    if lock is not None:
        lock.close()
