"""Waiting for a view to pass a target: woken by the runner's batches in threads and event
loops (ViewProgress), by polling the positions table elsewhere (PolledProgress); and the logs'
heads read straight from SQLite files (LogHeads)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path

from projections.db import SqliteViews
from projections.freshness import FreshReads, LogHeads
from projections.positions import POSITIONS_SQL, view_positions
from projections.progress import PolledProgress, ViewProgress, passed
from router.application.stores import EventStores, StoreConfig
from router.domain.access import Access


def later(seconds: float, action: Callable[[], object]) -> threading.Timer:
    timer = threading.Timer(seconds, action)
    timer.start()
    return timer


def test_passed_needs_every_log_of_the_target() -> None:
    assert passed({"ingest": 5, "delivery": 2}, {"ingest": 5})
    assert not passed({"ingest": 5}, {"ingest": 5, "delivery": 1})
    assert passed({}, {"ingest": 0})


def test_a_thread_wakes_on_the_batch_that_passes_its_target() -> None:
    progress = ViewProgress()
    progress.advanced("studies", {"ingest": 3})
    assert progress.reached("studies", {"ingest": 3})
    later(0.05, lambda: progress.advanced("studies", {"ingest": 4}))
    later(0.1, lambda: progress.advanced("jobs", {"ingest": 9}))  # another view: no use
    later(0.15, lambda: progress.advanced("studies", {"ingest": 9}))
    began = time.monotonic()
    assert progress.wait("studies", {"ingest": 9}, timeout=5)
    assert 0.1 < time.monotonic() - began < 2
    assert not progress.wait("studies", {"ingest": 10}, timeout=0.05)


def test_an_event_loop_waits_without_a_thread_and_gives_up_at_the_bound() -> None:
    progress = ViewProgress()
    progress.advanced("studies", {"ingest": 1})

    async def scenario() -> tuple[bool, float, bool, int]:
        began = time.monotonic()
        later(0.1, lambda: progress.advanced("studies", {"ingest": 2}))
        woken = await progress.wait_async("studies", {"ingest": 2}, timeout=5)
        took = time.monotonic() - began
        lagging = await progress.wait_async("studies", {"ingest": 3}, timeout=0.05)
        return woken, took, lagging, len(progress._futures["studies"])

    woken, took, lagging, left = asyncio.run(scenario())
    assert woken and took < 1 and not lagging and left == 0


def test_polled_progress_reads_the_positions_table(tmp_path: Path) -> None:
    db = SqliteViews(tmp_path / "view_studies.sqlite")
    with db.transaction() as cur:
        cur.execute(POSITIONS_SQL)

    def commit() -> None:
        with db.transaction() as cur:
            cur.execute("INSERT INTO projection_positions VALUES ('studies', 'ingest', 7)")

    progress = PolledProgress({"studies": lambda: db})
    assert not progress.reached("studies", {"ingest": 7})
    later(0.1, commit)
    assert progress.wait("studies", {"ingest": 7}, timeout=5)
    assert view_positions(db, "studies") == {"ingest": 7}
    assert not progress.wait("studies", {"ingest": 8}, timeout=0.05)
    db.close()


def test_log_heads_on_sqlite_see_each_commit(tmp_path: Path) -> None:
    stores = EventStores(StoreConfig(f"sqlite:///{tmp_path / 'db'}"))
    heads = LogHeads(stores.all())
    try:
        assert heads.local and heads.read(("access", "admin")) == {"access": 0, "admin": 0}
        stores.access.save(Access(
            actor="t", source_ip="", correlation_id="", action="study.view",
            object_type="study", object_id="", outcome="success", study_instance_uid=None,
            patient_id=None, detail=""))
        expected = stores.access.recorder.max_notification_id()
        assert expected and heads.read(("access",)) == {"access": expected}
        progress = ViewProgress()
        fresh = FreshReads(heads, {"audit": ("access",)}, progress, timeout=0.05)
        assert not fresh.wait("audit")
        progress.advanced("audit", {"access": expected})
        assert fresh.wait("audit") and asyncio.run(fresh.wait_async("audit"))
    finally:
        heads.close()
        stores.close()
