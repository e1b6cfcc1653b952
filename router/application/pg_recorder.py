"""The PostgreSQL recorder of our logs: the table lock is no longer held while the WAL is flushed.

eventsourcing's recorder takes ``LOCK TABLE <log> IN EXCLUSIVE MODE`` in every insert and keeps
it until the transaction ends, so that notification ids become visible in the order they were
given (a reader following the log never passes a gap that is filled later). The commit that
ends the transaction also waits for the WAL to reach the disk, so every writer of a log waited
for every other writer's flush: receipts were made durable one at a time across all receiver
processes (docs/benchmarks.md, "Where the time goes on PostgreSQL").

This recorder keeps the lock and the ordering, and moves the flush out of the lock:

1. the insert's transaction commits with ``synchronous_commit = off`` (``SET LOCAL``): the
   commit record is written to the WAL and the lock released at once, without waiting for the
   disk;
2. then, before ``insert_events`` returns (before a C-STORE is acknowledged), a small
   transaction that writes WAL commits synchronously: ``pg_logical_emit_message(true, ...)``
   assigns a transaction id and logs one record, so its commit flushes the WAL up to its own
   commit record, which lies after ours. Concurrent writers' flushes now overlap and are merged
   by PostgreSQL's group commit, as SQLite's are (router/application/sqlite_writes.py).

What a save guarantees is unchanged: when it returns, its events are on disk. In between, other
sessions may read events that are not yet durable. Anything they write in reaction commits
synchronously after them in the same WAL, so it can never survive a crash that the events it
depends on do not; the one effect that can escape is outside the database (a delivery sent for a
receipt that a crash then loses, whose C-STORE was never acknowledged: the resend is delivered
again, within our at-least-once promise).

The message needs no privilege (EXECUTE on it is granted to PUBLIC) and works at every
``wal_level``; logical decoding, if a site runs it, sees a tiny message per save under the
prefix ``dicom-router``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from eventsourcing.persistence import StoredEvent
from eventsourcing.postgres import PostgresApplicationRecorder
from eventsourcing.utils import retry
from psycopg import InterfaceError, OperationalError
from psycopg.sql import SQL

from router.application.sqlite_writes import LogNotDurable

_FLUSH = SQL("SELECT pg_logical_emit_message(true, 'dicom-router', 'flush')")


class FlushOutsideLockRecorder(PostgresApplicationRecorder):
    """eventsourcing's application recorder, committing under the table lock without waiting
    for the disk, then waiting for the disk after the lock is released."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Run before the LOCK TABLE, in the same (pipelined) transaction.
        self.lock_table_statements = [SQL("SET LOCAL synchronous_commit = off"),
                                      *self.lock_table_statements]

    def insert_events(self, stored_events: Sequence[StoredEvent],
                      **kwargs: Any) -> Sequence[int] | None:
        ids = super().insert_events(stored_events, **kwargs)
        if stored_events:
            try:
                self._flush_wal()
            except (InterfaceError, OperationalError) as exc:
                # Committed (other sessions may already read it) but not known to be on disk:
                # the caller must not acknowledge it; a resend is then a duplicate.
                raise LogNotDurable(f"WAL flush after commit failed: {type(exc).__name__}") \
                    from exc
        return ids

    @retry((InterfaceError, OperationalError), max_attempts=10, wait=0.2)
    def _flush_wal(self) -> None:
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(_FLUSH, prepare=True)
