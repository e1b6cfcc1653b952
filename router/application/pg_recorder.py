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

The insert is one statement: a PL/pgSQL function per log (``router_insert_<table>``, made with
the log's table) sets the two ``SET LOCAL``s, takes the lock, notifies and inserts, and its
autocommit statement's commit ends the transaction. eventsourcing's own path pipelines five
statements, a sync and a commit: 0.63 ms of CPU per save in the router against 0.34-0.42 with
the function (docs/benchmarks.md, "Fifteenth session"). The function takes one array per column,
in binary (see ``_insert_function``). eventsourcing's optional database
function (``enable_db_functions``) takes no table lock, so it is not used. A database made by
an older version has no function until the serving process or ``dicom-router migrate`` makes
the tables again; until then a save falls back to eventsourcing's path.
"""

from __future__ import annotations

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

_FLUSH = SQL("SELECT pg_logical_emit_message(true, 'dicom-router', 'flush')")

# eventsourcing's connections raise its own errors (psycopg's, translated) and it retries
# those; psycopg's are listed too for errors raised outside a datastore connection.
_CONNECTION_ERRORS = (InterfaceError, OperationalError, psycopg.InterfaceError,
                      psycopg.OperationalError)


class FlushOutsideLockRecorder(PostgresApplicationRecorder):
    """eventsourcing's application recorder, committing under the table lock without waiting
    for the disk, then waiting for the disk after the lock is released."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # eventsourcing's path (the fallback): run before the LOCK TABLE, in the same
        # (pipelined) transaction.
        self.lock_table_statements = [SQL("SET LOCAL synchronous_commit = off"),
                                      *self.lock_table_statements]
        function = Identifier(self.datastore.schema,
                              f"router_insert_{self.events_table_name}".replace(".", "_"))
        self.sql_create_statements += [
            # The first version of the function took an array of eventsourcing's composite
            # type (databases made on 2026-12-07): dropped, so one insert function remains.
            SQL("DROP FUNCTION IF EXISTS {0}({1}[])").format(
                function, Identifier(self.datastore.schema, self.stored_event_type_name)),
            self._insert_function(function)]
        self._call_insert = SQL("SELECT * FROM {0}(%b, %b::bigint[], %b::text[], %b)").format(
            function)
        self._has_function = True

    def _insert_function(self, function: Identifier) -> Composed:
        """The one-statement insert: eventsourcing's pipelined statements, in their order.

        Its arguments are four arrays, one per column, sent in binary: an array of the
        composite ``stored_event`` type (eventsourcing's own function's argument) goes as
        text, which psycopg builds in Python and the server parses back, escaping every
        byte of each event's state as hex (0.65 against 0.45 ms of CPU per receipt here,
        docs/benchmarks.md, "Sixteenth session")."""
        return SQL(
            "CREATE OR REPLACE FUNCTION {function}(ids {id_type}[], versions bigint[], "
            "topics text[], states bytea[]) "
            "RETURNS SETOF bigint LANGUAGE plpgsql AS $body$ BEGIN "
            "SET LOCAL synchronous_commit = off; "
            "SET LOCAL lock_timeout = '{lock_timeout}s'; "
            "LOCK TABLE {table} IN EXCLUSIVE MODE; "
            "NOTIFY {channel}; "
            "RETURN QUERY INSERT INTO {table} (originator_id, originator_version, topic, state) "
            "SELECT * FROM unnest(ids, versions, topics, states) "
            "RETURNING notification_id; "
            "END; $body$"
        ).format(
            function=function,
            id_type=Identifier(self.datastore.originator_id_type),
            lock_timeout=self.datastore.lock_timeout,
            table=Identifier(self.datastore.schema, self.events_table_name),
            channel=Identifier(self.channel_name),
        )

    def insert_events(self, stored_events: Sequence[StoredEvent],
                      **kwargs: Any) -> Sequence[int] | None:
        if not stored_events:
            return None
        ids = None
        if self._has_function:
            try:
                ids = self._insert_in_one_statement(stored_events)
            except ProgrammingError as exc:
                if not isinstance(exc.__cause__, UndefinedFunction):
                    raise
                self._has_function = False  # an older database: see the module's docstring
        if ids is None:
            ids = super().insert_events(stored_events, **kwargs)
        try:
            self._flush_wal()
        except _CONNECTION_ERRORS as exc:
            # Committed (other sessions may already read it) but not known to be on disk:
            # the caller must not acknowledge it; a resend is then a duplicate.
            raise LogNotDurable(f"WAL flush after commit failed: {type(exc).__name__}") \
                from exc
        return ids

    @retry(_CONNECTION_ERRORS, max_attempts=10, wait=0.2)
    def _insert_in_one_statement(self, stored_events: Sequence[StoredEvent]) -> list[int]:
        columns = ([e.originator_id for e in stored_events],
                   [e.originator_version for e in stored_events],
                   [e.topic for e in stored_events], [e.state for e in stored_events])
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(self._call_insert, columns, prepare=True)
            return [next(iter(row.values())) for row in curs.fetchall()]

    @retry(_CONNECTION_ERRORS, max_attempts=10, wait=0.2)
    def _flush_wal(self) -> None:
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(_FLUSH, prepare=True)
