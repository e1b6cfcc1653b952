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

A save is one statement: a PL/pgSQL procedure per log (``router_save_<table>``, made with
the log's table) sets the two ``SET LOCAL``s, takes the lock, notifies, inserts and commits (1),
then logs the message and commits again, which waits for the disk (2). Its arguments are four
arrays, one per column, sent in binary. eventsourcing's own path pipelines five statements, a
sync and a commit, then our flush was a second round trip. One writer here: 0.53-0.71 ms of
CPU and 0.98-1.23 ms per save with the first function (composite array, flush apart) against
0.31-0.36 ms and 0.70-0.75 ms with the procedure (docs/benchmarks.md, "Sixteenth session").
eventsourcing's optional database function (``enable_db_functions``) takes no table lock, so
it is not used. A database made by an older version has no procedure until the serving
process or ``dicom-router migrate`` makes the tables again; until then a save falls back to
eventsourcing's path and the flush as a statement of its own.

A call whose connection is lost may or may not have committed. The log tells: if its events
are there, the WAL is flushed by a statement of its own and the save succeeds (or is not
durable, if that fails too); if they are not, the call is sent again; if the log cannot be
read, the save is not durable (the receiver answers 0xA700 and keeps the blob). A pool that
cannot give a connection (nothing was sent) is retried as eventsourcing retries a save
(10 tries, 0.2 s apart).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import psycopg
from eventsourcing.persistence import (
    InterfaceError,
    OperationalError,
    ProgrammingError,
    StoredEvent,
)
from eventsourcing.postgres import PostgresApplicationRecorder
from eventsourcing.utils import retry
from psycopg.errors import UndefinedFunction
from psycopg.sql import SQL, Composed, Identifier

from router.application.sqlite_writes import LogNotDurable

# The message whose transactional commit waits for the disk: run alone by _FLUSH, and at the
# end of each log's save procedure.
_FLUSH_MESSAGE = SQL("pg_logical_emit_message(true, 'dicom-router', 'flush')")
_FLUSH = SQL("SELECT {0}").format(_FLUSH_MESSAGE)

# eventsourcing's connections raise its own errors (psycopg's, translated) and it retries
# those; psycopg's are listed too for errors raised outside a datastore connection.
_CONNECTION_ERRORS = (InterfaceError, OperationalError, psycopg.InterfaceError,
                      psycopg.OperationalError)
_ATTEMPTS, _WAIT = 10, 0.2  # as eventsourcing's retry of a save
_NOTHING = SQL("")


class _Sent(Exception):
    """The call went out and its connection failed: it may have committed."""


class FlushOutsideLockRecorder(PostgresApplicationRecorder):
    """eventsourcing's application recorder, committing under the table lock without waiting
    for the disk, then waiting for the disk after the lock is released."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # eventsourcing's path (the fallback): run before the LOCK TABLE, in the same
        # (pipelined) transaction.
        self.lock_table_statements = [SQL("SET LOCAL synchronous_commit = off"),
                                      *self.lock_table_statements]
        table = self.events_table_name.replace(".", "_")
        procedure = Identifier(self.datastore.schema, f"router_save_{table}")
        old_function = Identifier(self.datastore.schema, f"router_insert_{table}")
        self.sql_create_statements += [
            # The functions of the first versions (2026-12-07): the insert alone, its flush a
            # second statement. Dropped, so that one way of saving remains.
            SQL("DROP FUNCTION IF EXISTS {0}({1}[])").format(
                old_function, Identifier(self.datastore.schema, self.stored_event_type_name)),
            SQL("DROP FUNCTION IF EXISTS {0}({1}[], bigint[], text[], bytea[])").format(
                old_function, Identifier(self.datastore.originator_id_type)),
            self.save_procedure(procedure)]
        self._call_save = SQL("CALL {0}(%b, %b::bigint[], %b::text[], %b, NULL)").format(
            procedure)
        self._select_saved = SQL(
            "SELECT notification_id FROM {0} WHERE (originator_id, originator_version) IN "
            "(SELECT * FROM unnest(%b, %b::bigint[])) ORDER BY notification_id").format(
            Identifier(self.datastore.schema, self.events_table_name))
        self._has_procedure = True

    def save_procedure(self, procedure: Identifier, after_commit: SQL = _NOTHING) -> Composed:
        """The one-statement save: eventsourcing's pipelined statements in their order, the
        commit (without waiting for the disk), then the flush in a transaction of its own.
        ``after_commit`` is for tests (a statement run between the two transactions).

        The arguments are four arrays, one per column, sent in binary: an array of the
        composite ``stored_event`` type (eventsourcing's own function's argument) goes as text,
        which psycopg builds in Python and the server parses back, escaping every byte of each
        event's state as hex (0.68 against 0.45 ms of CPU per receipt here)."""
        return SQL(
            "CREATE OR REPLACE PROCEDURE {procedure}(ids {id_type}[], versions bigint[], "
            "topics text[], states bytea[], INOUT notification_ids bigint[] DEFAULT NULL) "
            "LANGUAGE plpgsql AS $body$ BEGIN "
            "SET LOCAL synchronous_commit = off; "
            "SET LOCAL lock_timeout = '{lock_timeout}s'; "
            "LOCK TABLE {table} IN EXCLUSIVE MODE; "
            "NOTIFY {channel}; "
            "WITH inserted AS (INSERT INTO {table} "
            "(originator_id, originator_version, topic, state) "
            "SELECT * FROM unnest(ids, versions, topics, states) RETURNING notification_id) "
            "SELECT array_agg(notification_id ORDER BY notification_id) "
            "INTO notification_ids FROM inserted; "
            "COMMIT; "  # the lock is released; SET LOCAL ends with the transaction
            "{after_commit}"
            "PERFORM {flush}; "
            "END; $body$"
        ).format(
            procedure=procedure,
            id_type=Identifier(self.datastore.originator_id_type),
            lock_timeout=self.datastore.lock_timeout,
            table=Identifier(self.datastore.schema, self.events_table_name),
            channel=Identifier(self.channel_name),
            after_commit=after_commit,
            flush=_FLUSH_MESSAGE,
        )

    def insert_events(self, stored_events: Sequence[StoredEvent],
                      **kwargs: Any) -> Sequence[int] | None:
        if not stored_events:
            return None
        if self._has_procedure:
            try:
                return self._save_in_one_call(stored_events)
            except ProgrammingError as exc:
                if not isinstance(exc.__cause__, UndefinedFunction):
                    raise
                self._has_procedure = False  # an older database: see the module's docstring
        ids = super().insert_events(stored_events, **kwargs)
        self._flush_or_not_durable()
        return ids

    def _save_in_one_call(self, stored_events: Sequence[StoredEvent]) -> list[int]:
        columns = ([e.originator_id for e in stored_events],
                   [e.originator_version for e in stored_events],
                   [e.topic for e in stored_events], [e.state for e in stored_events])
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                return self._call(columns)
            except _Sent:
                saved = self._saved_ids(columns)
                if saved is not None:
                    self._flush_or_not_durable()
                    return saved
                # Not committed: sent again (the pool has dropped the dead connection).
            except _CONNECTION_ERRORS:
                if attempt == _ATTEMPTS:
                    raise  # no connection to be had: nothing was sent
                time.sleep(_WAIT)
        raise OperationalError(f"the save was lost with its connection {_ATTEMPTS} times")

    def _call(self, columns: tuple[list[Any], ...]) -> list[int]:
        with self.datastore.get_connection() as conn:
            try:
                with conn.cursor() as curs:
                    curs.execute(self._call_save, columns, prepare=True)
                    row = curs.fetchone()
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                raise _Sent from exc
        assert row is not None
        return list(next(iter(row.values())))

    def _saved_ids(self, columns: tuple[list[Any], ...]) -> list[int] | None:
        """The notification ids of the events if a lost call committed them, else None."""
        try:
            ids = self._select_ids(columns)
        except _CONNECTION_ERRORS as exc:
            raise LogNotDurable("a save lost its connection, and whether it committed "
                                f"cannot be read: {type(exc).__name__}") from exc
        return ids if len(ids) == len(columns[0]) else None

    # Retried as a save is: when the server has ended every session (a restart), the pool's
    # other connections are dead too, and each try drops one.
    @retry(_CONNECTION_ERRORS, max_attempts=_ATTEMPTS, wait=_WAIT)
    def _select_ids(self, columns: tuple[list[Any], ...]) -> list[int]:
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(self._select_saved, columns[:2])
            return [next(iter(row.values())) for row in curs.fetchall()]

    def _flush_or_not_durable(self) -> None:
        try:
            self._flush_wal()
        except _CONNECTION_ERRORS as exc:
            # Committed (other sessions may already read it) but not known to be on disk:
            # the caller must not acknowledge it; a resend is then a duplicate.
            raise LogNotDurable(f"WAL flush after commit failed: {type(exc).__name__}") \
                from exc

    @retry(_CONNECTION_ERRORS, max_attempts=_ATTEMPTS, wait=_WAIT)
    def _flush_wal(self) -> None:
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(_FLUSH, prepare=True)
