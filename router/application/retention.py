"""Storage retention: purge the stored objects of fully delivered jobs older than N days, and
measure the blob store.

A job may lose its object when it was received before the cutoff and is either routed with
every delivery delivered or a duplicate (never delivered itself). A blob is content-addressed
and may be shared: it is deleted only when every job referencing its sha256 may lose it (or
already has). Pending, retrying, dead-lettered, cancelled, unrouted and conflicting jobs keep
theirs. Each purged job gets a ``Job.BlobPurged`` event (actor: a user, or ``system`` for the
periodic run), saved before its file is deleted; a crash in between is swept up by the next
process's first run.

A receipt arriving meanwhile cannot lose data: the same sha256 means the same bytes, hence the
same SOP Instance UID, so it is recorded as a duplicate and never delivered.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eventsourcing.persistence import IntegrityError

from projections.db import ViewDatabase
from projections.jobs_queries import (
    delivered_destinations,
    purge_candidates,
    unreferenced_purged_blobs,
)
from router.application.commands import Actor, CommandError
from router.application.runtime_settings import RuntimeSettingsStore
from router.application.stores import EventStores
from router.domain.ingest import Job
from router.storage.blobs import BlobError, BlobStore

logger = logging.getLogger(__name__)

RETENTION_SETTING = "storage.retention_days"
DAY = 86400.0
BATCH = 200
SWEEP_WINDOW = 7 * DAY  # purges this close to the latest one are re-checked at start
USAGE_CACHE_SECONDS = 30.0

# Which jobs may lose their object, and the sweep's blobs: projections/jobs_queries.py
# (purge_candidates, unreferenced_purged_blobs).


@dataclass(frozen=True)
class PurgeResult:
    """What one purge run did."""

    purge_id: str
    actor: str
    started_at: float
    finished_at: float
    cutoff: float
    retention_days: int
    jobs: int
    blobs: int
    bytes_freed: int


@dataclass(frozen=True)
class StorageUsage:
    """The blob store's size and its filesystem's free space, measured at ``measured_at``."""

    path: str
    bytes: int
    objects: int
    free_bytes: int
    total_bytes: int
    measured_at: float


def measure(blob_dir: Path) -> tuple[int, int]:
    """(bytes, object count) of the files under ``blob_dir``."""
    total = count = 0
    stack = [blob_dir]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except FileNotFoundError:
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                stack.append(Path(entry.path))
            elif entry.is_file(follow_symlinks=False):
                try:
                    total += entry.stat(follow_symlinks=False).st_size
                except FileNotFoundError:
                    continue
                count += 1
    return total, count


class Retention:
    """Purges (on demand and periodically) and the blob store's usage."""

    def __init__(self, stores: EventStores, jobs_db: ViewDatabase, blobs: BlobStore,
                 runtime: RuntimeSettingsStore, clock: Callable[[], float] = time.time,
                 on_saved: Callable[[], None] = lambda: None, interval: float = 3600.0,
                 first_delay: float = 60.0, leads: Callable[[], bool] = lambda: True) -> None:
        self._ingest = stores.ingest
        self._leads = leads  # one node runs the scheduled purge (router.cluster)
        self._db = jobs_db
        self._blobs = blobs
        self._runtime = runtime
        self.clock = clock  # tests move time forward instead of sleeping
        self._on_saved = on_saved
        self.interval = interval
        self.first_delay = first_delay
        self.last: PurgeResult | None = None
        self.next_run_at: float | None = None
        self._running = threading.Lock()
        self._swept = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._usage: StorageUsage | None = None

    @property
    def retention_days(self) -> int:
        return self._runtime.value(RETENTION_SETTING)

    # --- purging ----------------------------------------------------------------------
    def run(self, actor: Actor, now: float | None = None) -> PurgeResult:
        """Purge what the current retention allows; raises CommandError when it is off."""
        days = self.retention_days
        if days <= 0:
            raise CommandError("retention is off (storage.retention_days is 0); set a number "
                               "of days in the settings first")
        if not self._running.acquire(blocking=False):
            raise CommandError("a purge is already running; try again in a moment")
        try:
            return self._run(actor, days, self.clock() if now is None else now)
        finally:
            self._running.release()

    def _run(self, actor: Actor, days: int, now: float) -> PurgeResult:
        purge_id = actor.correlation_id or str(uuid.uuid4())
        ctx = Actor(actor.name, actor.source_ip, purge_id).ctx()
        cutoff = now - days * DAY
        started = time.time()
        jobs = blobs = freed = 0
        tried: set[str] = set()
        while not self._stop.is_set():
            rows = [r for r in purge_candidates(self._db, cutoff, BATCH)
                    if r["job_id"] not in tried]
            if not rows:
                break
            tried.update(r["job_id"] for r in rows)
            purged = self._record(rows, ctx, days)
            jobs += len(purged)
            count, size = self._delete({r["sha256"] for r in purged})
            blobs += count
            freed += size
        if not self._swept:
            self._swept = True
            self._sweep()
        result = PurgeResult(purge_id, actor.name, started, time.time(), cutoff, days, jobs,
                             blobs, freed)
        self.last = result
        if jobs:
            logger.info("retention purge by %s: %d jobs, %d blobs, %d bytes freed",
                        actor.name, jobs, blobs, freed)
        return result

    def _record(self, rows: list[dict[str, Any]], ctx: dict[str, str],
                days: int) -> list[dict[str, Any]]:
        """Save Job.BlobPurged for the rows the log confirms; returns those rows."""
        delivered = self._delivered([r["job_id"] for r in rows])
        jobs: list[Job] = []
        chosen = []
        for row in rows:
            job: Any = self._ingest.repository.get(uuid.UUID(row["job_id"]))
            # The log, not the view, is the truth: skip a job rerouted since the view saw it.
            if job.blob_purged or not set(job.destinations) <= delivered.get(row["job_id"],
                                                                            set()):
                continue
            job.purge_blob(**ctx, sha256=job.sha256, size=job.size,
                           reason=f"retention: fully delivered and older than {days} days")
            jobs.append(job)
            chosen.append(row)
        if not jobs:
            return []
        try:
            self._ingest.save(*jobs)
        except IntegrityError:
            logger.warning("retention: %d jobs changed meanwhile; left for the next run",
                           len(jobs))
            return []
        self._on_saved()
        return chosen

    def _delivered(self, job_ids: list[str]) -> dict[str, set[str]]:
        return delivered_destinations(self._db, job_ids)

    def _delete(self, shas: Iterable[str]) -> tuple[int, int]:
        count = freed = 0
        for sha in shas:
            try:
                size = self._blobs.remove(sha)
            except OSError as exc:
                reason = str(exc) if isinstance(exc, BlobError) else (
                    exc.strerror or type(exc).__name__)
                logger.error("retention could not delete a blob: %s", reason)
                continue
            if size is None:
                continue
            count += 1
            freed += size
        if count:
            self._usage = None
        return count, freed

    def _sweep(self) -> None:
        shas = unreferenced_purged_blobs(self._db, SWEEP_WINDOW)
        count, _ = self._delete(sha for sha in shas if self._blobs.exists(sha))
        if count:
            logger.info("retention: removed %d blobs left behind by an interrupted purge",
                        count)

    # --- the periodic run -------------------------------------------------------------
    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="retention", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _loop(self) -> None:
        delay = self.first_delay
        while True:
            self.next_run_at = time.time() + delay
            if self._stop.wait(delay):
                return
            delay = self.interval
            try:
                if self.retention_days > 0 and self._leads():
                    self.run(Actor("system"))
            except CommandError as exc:
                logger.info("retention run skipped: %s", exc)
            except Exception:
                logger.exception("retention run failed; next try in %.0f s", self.interval)

    # --- usage ------------------------------------------------------------------------
    def usage(self, fresh: bool = False) -> StorageUsage:
        """The blob store's bytes and objects (walked at most every 30 s) and free space."""
        cached = self._usage
        if cached is None or fresh or time.time() - cached.measured_at > USAGE_CACHE_SECONDS:
            size, count = measure(self._blobs.blob_dir)
            disk = os.statvfs(self._blobs.root)
            cached = StorageUsage(self._blobs.describe(), size, count,
                                  disk.f_bavail * disk.f_frsize, disk.f_blocks * disk.f_frsize,
                                  time.time())
            self._usage = cached
        return cached
