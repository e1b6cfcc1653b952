"""SQLite logs: a write waits for the log's flock, which another process may hold."""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time
from pathlib import Path

import pytest

from router.application.sqlite_writes import LogNotDurable
from router.application.stores import EventStores, StoreConfig
from router.domain.ingest import ReceiptFailure


def _failure() -> ReceiptFailure:
    return ReceiptFailure(actor="MODALITY", source_ip="127.0.0.1", correlation_id="c",
                          source="dimse", calling_aet="MODALITY", called_aet="ROUTER",
                          status=0xC000, reason="test", sop_class_uid="", sop_instance_uid="")


def test_a_save_waits_while_another_holder_has_the_logs_write_lock(tmp_path: Path) -> None:
    stores = EventStores(StoreConfig(f"sqlite:///{tmp_path}"))
    try:
        stores.ingest.save(_failure())  # creates the log and its lock file
        lock_path = tmp_path / "ingest.sqlite.lock"
        assert lock_path.exists()
        # Another open file description: to flock, this is another process.
        other = os.open(lock_path, os.O_RDWR)
        fcntl.flock(other, fcntl.LOCK_EX)
        saved = threading.Event()
        writer = threading.Thread(target=lambda: (stores.ingest.save(_failure()), saved.set()))
        writer.start()
        time.sleep(0.3)
        assert not saved.is_set(), "the save did not wait for the lock"
        reads = stores.ingest.recorder.select_notifications(start=1, limit=10)
        assert len(reads) == 1  # readers never wait
        fcntl.flock(other, fcntl.LOCK_UN)
        os.close(other)
        assert saved.wait(5)
        writer.join()
        assert len(stores.ingest.recorder.select_notifications(start=1, limit=10)) == 2
    finally:
        stores.close()


def test_each_save_syncs_the_wal_after_releasing_the_write_lock(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite itself no longer fsyncs inside the commit (synchronous=NORMAL); the save syncs
    the WAL, outside the lock, before it returns."""
    stores = EventStores(StoreConfig(f"sqlite:///{tmp_path}"))
    try:
        stores.ingest.save(_failure())
        wal = tmp_path / "ingest.sqlite-wal"
        lock_path = tmp_path / "ingest.sqlite.lock"
        synced: list[tuple[int, bool]] = []
        real_fdatasync = os.fdatasync

        def fdatasync(fd: int) -> None:
            probe = os.open(lock_path, os.O_RDWR)
            try:  # is the write lock free while the WAL is synced?
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
                free = True
                fcntl.flock(probe, fcntl.LOCK_UN)
            except BlockingIOError:
                free = False
            finally:
                os.close(probe)
            synced.append((os.fstat(fd).st_ino, free))
            real_fdatasync(fd)

        monkeypatch.setattr(os, "fdatasync", fdatasync)
        stores.ingest.save(_failure())
        assert synced == [(wal.stat().st_ino, True)]
        with stores.ingest.recorder.datastore.transaction(commit=False) as cursor:  # type: ignore[attr-defined]
            cursor.execute("PRAGMA synchronous")
            assert cursor.fetchone()[0] == 1  # NORMAL: no fsync inside the commit
    finally:
        stores.close()


def test_a_failed_wal_sync_fails_the_save_after_its_commit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stores = EventStores(StoreConfig(f"sqlite:///{tmp_path}"))
    try:
        stores.ingest.save(_failure())

        def failing(fd: int) -> None:
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(os, "fdatasync", failing)
        with pytest.raises(LogNotDurable, match="WAL sync failed"):
            stores.ingest.save(_failure())
        # Committed (visible), though not confirmed on disk: the caller must say so.
        assert len(stores.ingest.recorder.select_notifications(start=1, limit=10)) == 2
    finally:
        stores.close()


def test_the_wal_sync_follows_a_replaced_wal_and_skips_a_removed_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from router.application.sqlite_writes import WriteLock

    wal = tmp_path / "log.sqlite-wal"
    lock = WriteLock(str(tmp_path / "log.sqlite.lock"), str(wal))
    synced: list[int] = []
    monkeypatch.setattr(os, "fdatasync", lambda fd: synced.append(os.fstat(fd).st_ino))
    try:
        lock.sync_log()  # no WAL yet: nothing to sync
        wal.write_bytes(b"first")
        first = wal.stat().st_ino
        lock.sync_log()
        wal.unlink()
        wal.write_bytes(b"second")  # SQLite made a new WAL after a checkpoint
        second = wal.stat().st_ino
        lock.sync_log()
        lock.sync_log()
        assert first != second and synced == [first, second, second]
    finally:
        lock.close()


def test_the_logs_are_built_by_our_factory_named_in_eventsourcings_setting(
        tmp_path: Path) -> None:
    """No patch: eventsourcing's own classes stay as they are, ours is chosen by
    PERSISTENCE_MODULE."""
    from eventsourcing.sqlite import SQLiteDatastore

    from router.application.sqlite_writes import OrderedSQLiteDatastore, OrderedSQLiteFactory

    stores = EventStores(StoreConfig(f"sqlite:///{tmp_path}"))
    try:
        for app in stores.all().values():
            assert type(app.factory) is OrderedSQLiteFactory
            assert type(app.recorder.datastore) is OrderedSQLiteDatastore  # type: ignore[attr-defined]
        assert SQLiteDatastore.transaction.__module__ == "eventsourcing.sqlite"
        assert SQLiteDatastore.get_connection.__module__ == "eventsourcing.sqlite"
    finally:
        stores.close()


def test_our_factory_passes_on_every_setting_of_eventsourcings_datastore(tmp_path: Path) -> None:
    """OrderedSQLiteFactory rebuilds the datastore eventsourcing's factory made from the
    settings, argument by argument: a new argument in an eventsourcing upgrade must be
    passed on too (or the upgrade checked) before this test is changed."""
    import inspect

    from eventsourcing.sqlite import SQLiteDatastore

    from router.application.sqlite_writes import OrderedSQLiteFactory

    assert list(inspect.signature(SQLiteDatastore.__init__).parameters) == [
        "self", "db_name", "lock_timeout", "pool_size", "max_overflow", "pool_timeout",
        "max_age", "pre_ping", "single_row_tracking", "originator_id_type"]
    factory = OrderedSQLiteFactory({
        "SQLITE_DBNAME": str(tmp_path / "x.sqlite"), "SQLITE_LOCK_TIMEOUT": "7",
        "SINGLE_ROW_TRACKING": "n", "ORIGINATOR_ID_TYPE": "text"})
    try:
        datastore = factory.datastore
        assert datastore.pool.db_name == str(tmp_path / "x.sqlite")
        assert datastore.pool.lock_timeout == 7
        assert datastore.single_row_tracking is False
        assert datastore.originator_id_type == "text"
    finally:
        factory.close()
