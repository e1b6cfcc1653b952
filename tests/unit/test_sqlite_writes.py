"""SQLite logs: a write waits for the log's flock, which another process may hold."""

from __future__ import annotations

import fcntl
import os
import threading
import time
from pathlib import Path

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
