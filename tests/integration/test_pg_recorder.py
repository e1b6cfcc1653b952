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


def test_lock_is_free_while_a_save_waits_for_its_flush(stores: EventStores,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = stores.ingest.recorder
    assert isinstance(recorder, FlushOutsideLockRecorder)
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


def test_a_save_returns_after_the_wal_is_flushed(stores: EventStores, pg_url: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import psycopg

    recorder = stores.access.recorder
    assert isinstance(recorder, FlushOutsideLockRecorder)
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


def test_a_save_is_one_statement_through_the_log_function(stores: EventStores,
                                                          pg_url: str) -> None:
    import psycopg

    recorder = stores.ingest.recorder
    assert isinstance(recorder, FlushOutsideLockRecorder)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        names = [r[0] for r in conn.execute(
            "SELECT proname FROM pg_proc WHERE proname LIKE 'router_insert_%' ORDER BY 1")]
    assert len(names) == 4, names  # one per log
    thing = Thing(5)
    stores.ingest.save(thing)
    assert recorder._has_function
    assert stores.ingest.repository.get(thing.id).n == 5


def test_a_database_without_the_function_falls_back(stores: EventStores, pg_url: str) -> None:
    import psycopg

    recorder = stores.admin.recorder
    assert isinstance(recorder, FlushOutsideLockRecorder)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        name = conn.execute("SELECT oid::regprocedure::text FROM pg_proc "
                            "WHERE proname LIKE 'router_insert_%admin%'").fetchone()[0]
        conn.execute(f"DROP FUNCTION {name}")  # a database made by an older version
    first, second = Thing(6), Thing(7)
    stores.admin.save(first)
    stores.admin.save(second)
    assert not recorder._has_function
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
    thing = Thing(8)
    with pytest.raises(LogNotDurable):
        stores.access.save(thing)
    assert stores.access.repository.get(thing.id).n == 8  # committed before the flush


def test_the_first_functions_argument_of_composites_is_replaced(stores: EventStores,
                                                                pg_url: str) -> None:
    import psycopg

    # The function as the first version made it (2026-12-07): one array of eventsourcing's
    # composite type. Making the tables again drops it; the four-array one remains.
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("DROP FUNCTION public.router_insert_ingest_events"
                     "(uuid[], bigint[], text[], bytea[])")
        conn.execute("CREATE FUNCTION public.router_insert_ingest_events"
                     "(events public.stored_event_uuid[]) RETURNS SETOF bigint"
                     " LANGUAGE sql AS 'SELECT 0::bigint'")
    again = EventStores(StoreConfig(pg_url, role="server"))
    try:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            signatures = [r[0] for r in conn.execute(
                "SELECT oid::regprocedure::text FROM pg_proc"
                " WHERE proname = 'router_insert_ingest_events'")]
        assert signatures == ["router_insert_ingest_events(uuid[],bigint[],text[],bytea[])"]
        thing = Thing(9)
        again.ingest.save(thing)
        assert again.ingest.recorder._has_function  # type: ignore[attr-defined]
        assert again.ingest.repository.get(thing.id).n == 9
    finally:
        again.close()
