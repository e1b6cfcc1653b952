"""The PostgreSQL recorder releases a log's table lock before the WAL is flushed
(router/application/pg_recorder.py): another writer of the same log commits meanwhile, ids stay
in commit order, and a failed flush after the commit is reported as not durable."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from eventsourcing.domain import Aggregate, event
from psycopg import OperationalError

from router.application.pg_recorder import FlushOutsideLockRecorder
from router.application.sqlite_writes import LogNotDurable
from router.application.stores import EventStores, StoreConfig

pytestmark = pytest.mark.postgres


class Thing(Aggregate):
    @event("Made")
    def __init__(self, n: int) -> None:
        self.n = n


@pytest.fixture
def stores(pg_url: str) -> Any:
    s = EventStores(StoreConfig(pg_url, role="server"))
    yield s
    s.close()


def test_every_log_uses_the_recorder(stores: EventStores) -> None:
    for name, app in stores.all().items():
        assert isinstance(app.recorder, FlushOutsideLockRecorder), name


def _with_after_commit(recorder: FlushOutsideLockRecorder, pg_url: str, statement: str) -> None:
    """Make the log's save procedure again with ``statement`` run between its two
    transactions (after the insert's commit, before the flush)."""
    import psycopg
    from psycopg.sql import SQL, Identifier

    table = recorder.events_table_name
    sql = recorder.save_procedure(Identifier("public", f"router_save_{table}"), SQL(statement))
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(sql)


def test_lock_is_free_while_a_save_waits_for_its_flush(stores: EventStores, pg_url: str) -> None:
    import psycopg

    recorder = stores.ingest.recorder
    assert isinstance(recorder, FlushOutsideLockRecorder)
    first = Thing(1)
    # The first save waits, after its commit and before its flush, for a lock the test holds.
    _with_after_commit(recorder, pg_url, f"IF ids[1] = '{first.id}'::uuid THEN "
                       "PERFORM pg_advisory_lock(4242); PERFORM pg_advisory_unlock(4242); "
                       "END IF; ")
    with psycopg.connect(pg_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(4242)")
        t = threading.Thread(target=stores.ingest.save, args=(first,))
        t.start()
        try:
            deadline = time.monotonic() + 10
            while recorder.max_notification_id() != 1:  # committed, waiting before its flush
                assert time.monotonic() < deadline, "the first save did not commit"
                time.sleep(0.02)
            assert t.is_alive()
            # The table lock must be free: a second save on the same log completes now.
            second = Thing(2)
            started = time.monotonic()
            stores.ingest.save(second)
            assert time.monotonic() - started < 5
        finally:
            holder.execute("SELECT pg_advisory_unlock(4242)")
            t.join(10)
    assert not t.is_alive()
    ids = [n.originator_id for n in recorder.select_notifications(1, 10)]
    assert ids == [first.id, second.id]  # commit order = id order


def test_lock_is_free_while_a_fallback_save_waits_for_its_flush(
        stores: EventStores, monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = stores.ingest.recorder
    assert isinstance(recorder, FlushOutsideLockRecorder)
    recorder._has_procedure = False  # a database without the procedure: eventsourcing's path
    flushing = threading.Event()
    release = threading.Event()
    real_flush = recorder._flush_wal
    first_thread = threading.current_thread().name + "-first"

    def slow_flush() -> None:
        if threading.current_thread().name == first_thread:
            flushing.set()
            assert release.wait(10), "the second save never released the first"
        real_flush()

    monkeypatch.setattr(recorder, "_flush_wal", slow_flush)
    first = Thing(1)
    t = threading.Thread(target=stores.ingest.save, args=(first,), name=first_thread)
    t.start()
    try:
        assert flushing.wait(10), "the first save did not reach its flush"
        # The first save's transaction is committed and its flush has not run: the table lock
        # must be free, so a second save on the same log completes now.
        second = Thing(2)
        started = time.monotonic()
        stores.ingest.save(second)
        assert time.monotonic() - started < 5
    finally:
        release.set()
        t.join(10)
    assert not t.is_alive()
    ids = [n.originator_id for n in stores.ingest.recorder.select_notifications(1, 10)]
    assert ids == [first.id, second.id]  # commit order = id order


def test_failed_flush_after_commit_is_not_durable(stores: EventStores,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = stores.delivery.recorder
    assert isinstance(recorder, FlushOutsideLockRecorder)
    recorder._has_procedure = False  # the flush is a statement of its own on this path
    calls = []

    def broken(self: Any) -> None:
        calls.append(1)
        raise OperationalError("server closed the connection unexpectedly")

    # The class attribute holds the retrying wrapper; replace it to fail every try at once.
    monkeypatch.setattr(FlushOutsideLockRecorder, "_flush_wal", broken)
    thing = Thing(3)
    with pytest.raises(LogNotDurable):
        stores.delivery.save(thing)
    assert calls == [1]
    # Committed before the flush: readers see it, and a resend would be its duplicate.
    assert stores.delivery.repository.get(thing.id).n == 3
    assert recorder.max_notification_id() == 1


def test_a_call_lost_after_its_commit_is_flushed_and_succeeds(stores: EventStores,
                                                              pg_url: str) -> None:
    recorder = stores.delivery.recorder
    assert isinstance(recorder, FlushOutsideLockRecorder)
    # The connection dies between the commit and the flush: the log has the events, so the
    # WAL is flushed by a statement of its own and the save succeeds, once.
    _with_after_commit(recorder, pg_url, "PERFORM pg_terminate_backend(pg_backend_pid()); ")
    thing = Thing(10)
    stores.delivery.save(thing)
    assert stores.delivery.repository.get(thing.id).n == 10
    assert recorder.max_notification_id() == 1


def test_a_call_lost_after_its_commit_whose_flush_fails_is_not_durable(
        stores: EventStores, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = stores.delivery.recorder
    assert isinstance(recorder, FlushOutsideLockRecorder)
    _with_after_commit(recorder, pg_url, "PERFORM pg_terminate_backend(pg_backend_pid()); ")

    def broken(self: Any) -> None:
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(FlushOutsideLockRecorder, "_flush_wal", broken)
    thing = Thing(11)
    with pytest.raises(LogNotDurable):
        stores.delivery.save(thing)
    assert stores.delivery.repository.get(thing.id).n == 11  # committed all the same


def test_a_call_lost_before_its_commit_is_sent_again(stores: EventStores, pg_url: str) -> None:
    import psycopg

    recorder = stores.ingest.recorder
    assert isinstance(recorder, FlushOutsideLockRecorder)
    thing = Thing(12)
    with psycopg.connect(pg_url) as holder:
        # The save's call waits for the log's table lock; its connection is then terminated
        # before it could commit anything.
        holder.execute(f"LOCK TABLE {recorder.events_table_name} IN EXCLUSIVE MODE")
        t = threading.Thread(target=stores.ingest.save, args=(thing,))
        t.start()
        try:
            with psycopg.connect(pg_url, autocommit=True) as killer:
                deadline = time.monotonic() + 10
                while not killer.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE query LIKE 'CALL %router_save_%' AND wait_event_type = 'Lock'"
                        ).fetchall():
                    assert time.monotonic() < deadline, "the call never waited for the lock"
                    time.sleep(0.02)
        finally:
            holder.rollback()
        t.join(10)
    assert not t.is_alive()
    assert stores.ingest.repository.get(thing.id).n == 12
    assert recorder.max_notification_id() == 1  # sent again, recorded once


def test_a_save_returns_after_the_wal_is_flushed(stores: EventStores, pg_url: str) -> None:
    import psycopg

    recorder = stores.access.recorder
    assert isinstance(recorder, FlushOutsideLockRecorder)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE lsn_probe (lsn pg_lsn)")
        # Noted after the insert's commit, so its commit record lies below this position.
        _with_after_commit(recorder, pg_url,
                           "INSERT INTO lsn_probe VALUES (pg_current_wal_insert_lsn()); ")
        stores.access.save(Thing(4))
        # Without the flush the WAL writer would reach it only within wal_writer_delay (200 ms).
        assert conn.execute("SELECT pg_current_wal_flush_lsn() >= lsn FROM lsn_probe"
                            ).fetchone()[0]


def test_a_fallback_save_returns_after_the_wal_is_flushed(
        stores: EventStores, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import psycopg

    recorder = stores.access.recorder
    assert isinstance(recorder, FlushOutsideLockRecorder)
    recorder._has_procedure = False
    real_flush = recorder._flush_wal
    committed_below: list[str] = []

    with psycopg.connect(pg_url, autocommit=True) as conn:
        def flush_after_noting_lsn() -> None:
            # Our insert has committed (asynchronously): its commit record lies below the WAL
            # insert position now.
            committed_below.append(conn.execute("SELECT pg_current_wal_insert_lsn()::text")
                                   .fetchone()[0])
            real_flush()

        monkeypatch.setattr(recorder, "_flush_wal", flush_after_noting_lsn)
        stores.access.save(Thing(4))
        # Without the flush the WAL writer would reach it only within wal_writer_delay (200 ms).
        assert conn.execute("SELECT pg_current_wal_flush_lsn() >= %s::pg_lsn",
                            (committed_below[0],)).fetchone()[0]


def test_a_save_is_one_call_of_the_log_procedure(stores: EventStores, pg_url: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import psycopg

    recorder = stores.ingest.recorder
    assert isinstance(recorder, FlushOutsideLockRecorder)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        names = [r[0] for r in conn.execute(
            "SELECT proname FROM pg_proc WHERE proname LIKE 'router_%' AND prokind = 'p'"
            " ORDER BY 1")]
    assert len(names) == 4, names  # one per log
    statements: list[str] = []
    real_execute = psycopg.Cursor.execute

    def spy(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        statements.append(query.as_string(self) if hasattr(query, "as_string") else query)
        return real_execute(self, query, *args, **kwargs)

    monkeypatch.setattr(psycopg.Cursor, "execute", spy)
    thing = Thing(5)
    stores.ingest.save(thing)
    monkeypatch.undo()
    assert len(statements) == 1 and statements[0].startswith("CALL "), statements
    assert recorder._has_procedure
    assert stores.ingest.repository.get(thing.id).n == 5


def test_a_database_without_the_procedure_falls_back(stores: EventStores, pg_url: str) -> None:
    import psycopg

    recorder = stores.admin.recorder
    assert isinstance(recorder, FlushOutsideLockRecorder)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        name = conn.execute("SELECT oid::regprocedure::text FROM pg_proc "
                            "WHERE proname LIKE 'router_save_%admin%'").fetchone()[0]
        conn.execute(f"DROP PROCEDURE {name}")  # a database made by an older version
    first, second = Thing(6), Thing(7)
    stores.admin.save(first)
    stores.admin.save(second)
    assert not recorder._has_procedure
    ids = [n.originator_id for n in recorder.select_notifications(1, 10)]
    assert ids == [first.id, second.id]


def test_a_flush_that_loses_its_connection_is_not_durable(stores: EventStores,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    from psycopg.sql import SQL

    from router.application import pg_recorder

    # The flush's connection dies under it, as when the server restarts: psycopg's error comes
    # out of eventsourcing's connection translated into its own, which must be caught too.
    monkeypatch.setattr(pg_recorder, "_FLUSH",
                        SQL("SELECT pg_terminate_backend(pg_backend_pid())"))
    recorder = stores.access.recorder
    assert isinstance(recorder, FlushOutsideLockRecorder)
    recorder._has_procedure = False  # the flush is a statement of its own on this path
    thing = Thing(8)
    with pytest.raises(LogNotDurable):
        stores.access.save(thing)
    assert stores.access.repository.get(thing.id).n == 8  # committed before the flush


def test_the_first_versions_functions_are_replaced(stores: EventStores, pg_url: str) -> None:
    import psycopg

    # The insert functions of the first versions (2026-12-07), without the flush: making the
    # tables again drops them; the procedure remains.
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE FUNCTION public.router_insert_ingest_events"
                     "(events public.stored_event_uuid[]) RETURNS SETOF bigint"
                     " LANGUAGE sql AS 'SELECT 0::bigint'")
        conn.execute("CREATE FUNCTION public.router_insert_ingest_events"
                     "(uuid[], bigint[], text[], bytea[]) RETURNS SETOF bigint"
                     " LANGUAGE sql AS 'SELECT 0::bigint'")
    again = EventStores(StoreConfig(pg_url, role="server"))
    try:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            signatures = [r[0] for r in conn.execute(
                "SELECT oid::regprocedure::text FROM pg_proc"
                " WHERE proname LIKE 'router_%ingest_events' ORDER BY 1")]
        assert signatures == [
            "router_save_ingest_events(uuid[],bigint[],text[],bytea[],bigint[])"]
        thing = Thing(9)
        again.ingest.save(thing)
        assert again.ingest.recorder._has_procedure  # type: ignore[attr-defined]
        assert again.ingest.repository.get(thing.id).n == 9
    finally:
        again.close()
