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

How: the applications' ``PERSISTENCE_MODULE`` setting names :class:`OrderedSQLiteFactory`
(:data:`SQLITE_FACTORY_TOPIC`, router/application/stores.py), eventsourcing's SQLite factory
with :class:`OrderedSQLiteDatastore`, a subclass of its datastore that does the above around
eventsourcing's own ``transaction`` and ``get_connection``. Nothing of eventsourcing is patched.
"""

from __future__ import annotations

import fcntl
import os
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from eventsourcing.sqlite import SQLiteConnection, SQLiteCursor, SQLiteDatastore, SQLiteFactory


class LogNotDurable(OSError):
    """A save that is not known to be on disk: committed (other readers see it) but its WAL
    could not be synced, or, on PostgreSQL, sent on a connection that was lost and whose
    outcome could not be read back. The caller must not report it as durable; the message
    says which (it names no data)."""


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


class OrderedSQLiteDatastore(SQLiteDatastore):
    """eventsourcing's SQLite datastore whose write transactions take the log's WriteLock and
    sync the WAL after releasing it, on connections that run ``synchronous=NORMAL``."""

    def __init__(self, db_name: str, **kwargs: Any) -> None:
        self._write_lock: WriteLock | None = None
        self._write_lock_made = threading.Lock()
        self._prepared: weakref.WeakSet[SQLiteConnection] = weakref.WeakSet()
        super().__init__(db_name, **kwargs)
        self._memory = self.pool.is_sqlite_memory_mode or not db_name

    def _lock(self) -> WriteLock | None:
        """The log's WriteLock, made (and its file created) by the first write."""
        lock = self._write_lock
        if lock is None and not self._memory:
            with self._write_lock_made:
                if self._write_lock is None:
                    name = self.pool.db_name
                    self._write_lock = WriteLock(f"{name}.lock", f"{name}-wal")
                lock = self._write_lock
        return lock

    @contextmanager
    def transaction(self, *, commit: bool) -> Iterator[SQLiteCursor]:
        lock = self._lock() if commit else None
        if lock is None:
            with super().transaction(commit=commit) as cursor:
                yield cursor
            return
        with lock.held(), super().transaction(commit=commit) as cursor:
            yield cursor
        lock.sync_log()  # committed; durable once this returns (see the module's docstring)

    @contextmanager
    def get_connection(self, *, commit: bool) -> Iterator[SQLiteConnection]:
        with super().get_connection(commit=commit) as connection:
            if not self._memory and connection not in self._prepared:
                # The WAL is synced by every write transaction itself, after the write lock.
                with connection.cursor() as cursor:
                    cursor.execute("PRAGMA synchronous=NORMAL")
                self._prepared.add(connection)
            yield connection

    def close(self) -> None:
        super().close()
        with self._write_lock_made:
            lock, self._write_lock = self._write_lock, None
        if lock is not None:
            lock.close()


class OrderedSQLiteFactory(SQLiteFactory):
    """eventsourcing's SQLite persistence with :class:`OrderedSQLiteDatastore`, chosen by the
    applications' ``PERSISTENCE_MODULE`` setting (:data:`SQLITE_FACTORY_TOPIC`)."""

    def __init__(self, env: Any) -> None:
        super().__init__(env)  # reads and checks the SQLITE_* settings
        plain = self.datastore  # a pool not yet connected
        self.datastore = OrderedSQLiteDatastore(
            plain.pool.db_name, lock_timeout=plain.pool.lock_timeout,
            single_row_tracking=plain.single_row_tracking,
            originator_id_type=plain.originator_id_type)
        plain.close()


SQLITE_FACTORY_TOPIC = f"{__name__}:{OrderedSQLiteFactory.__qualname__}"
