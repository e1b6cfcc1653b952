"""The projection runner: follows application logs and applies events to views in batches,
writing each view's position in the same transaction as its rows (no double application).

PostgreSQL wakes it by LISTEN/NOTIFY (the recorder notifies on every insert); SQLite has no
subscription, so it polls and is woken in-process right after each save. After each batch
the runner publishes the view's positions (``progress``): queries of this process that wait
for their view (read-your-writes, freshness.py) wake on it.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from projections.db import Cursor, ViewDatabase
from projections.positions import (
    POSITIONS_SQL,
    forget_positions,
    positions_in,
    save_position,
    view_positions,
)
from projections.progress import ViewProgress
from router.priority import lower_this_thread

logger = logging.getLogger(__name__)

LISTEN_POLL = 0.2  # seconds the LISTEN thread waits for a NOTIFY before checking for a stop

BATCH_SIZE = 500
# PostgreSQL: the node building the views notifies this channel after each batch, so that
# the other nodes (which read the views) see the new positions at once.
VIEWS_CHANNEL = "router_views"

@dataclass(frozen=True)
class EventRecord:
    """One decoded event handed to a view."""

    application: str
    position: int
    topic: str  # "Job.Received"
    event: Any

    @property
    def originator_id(self) -> str:
        return str(self.event.originator_id)

    @property
    def timestamp(self) -> float:
        return float(self.event.timestamp.timestamp())


class View:
    """A read model: its tables, the logs it follows and how each event changes it."""

    name: str = ""
    follows: tuple[str, ...] = ()
    tables: tuple[str, ...] = ()

    def create(self, cur: Cursor, dialect: str) -> None:
        raise NotImplementedError

    def apply(self, cur: Cursor, record: EventRecord) -> None:
        raise NotImplementedError

    def begin_batch(self, cur: Cursor) -> None:
        """Called at the start of each batch's transaction, before its first event."""

    def end_batch(self, cur: Cursor) -> None:
        """Called once per committed batch, inside its transaction."""


@dataclass(frozen=True)
class ViewHandle:
    """A view and the database its tables are in."""

    view: View
    db: ViewDatabase


def ensure_schema(view: View, db: ViewDatabase) -> None:
    with db.transaction() as cur:
        cur.execute(POSITIONS_SQL)
        view.create(cur, db.dialect)


def columns_of(create_sql: str) -> set[str]:
    """Column names of a ``CREATE TABLE t (col TYPE ..., ...)`` without table constraints."""
    body = create_sql.split("(", 1)[1].rsplit(")", 1)[0]
    return {part.split()[0] for part in body.split(",") if part.split()}


def existing_columns(cur: Cursor, dialect: str, table: str) -> set[str]:
    if dialect == "sqlite":
        cur.execute(f"PRAGMA table_info({table})")
        return {row["name"] for row in cur.fetchall()}
    cur.execute("SELECT column_name AS name FROM information_schema.columns"
                " WHERE table_schema = current_schema() AND table_name = ?", (table,))
    return {row["name"] for row in cur.fetchall()}


def drop_if_outdated(view: View, cur: Cursor, dialect: str,
                     creates: dict[str, str]) -> bool:
    """Drop the view's tables and positions when a table of ``creates`` (table -> its CREATE
    statement) lacks a column: the view then replays the log from 0. True if dropped."""
    for table, sql in creates.items():
        existing = existing_columns(cur, dialect, table)
        if existing and not columns_of(sql) <= existing:
            logger.info("%s view: schema changed; rebuilding it from the log", view.name)
            for name in view.tables:
                cur.execute(f"DROP TABLE IF EXISTS {name}")
            forget_positions(cur, view.name)
            return True
    return False


def drop_view(view: View, db: ViewDatabase) -> None:
    """Forget a view's rows and positions (a rebuild then replays from position 0)."""
    with db.transaction() as cur:
        cur.execute(POSITIONS_SQL)
        for table in view.tables:
            cur.execute(f"DROP TABLE IF EXISTS {table}")
        forget_positions(cur, view.name)


def index_text(value: object) -> str | None:
    """An index value as text (a value with a backslash was decoded as a list of values)."""
    if value is None:
        return None
    if isinstance(value, list):
        return "\\".join(str(v) for v in value)
    return str(value)


def topic_name(topic: str) -> str:
    return topic.rsplit(":", 1)[-1]


class DecodedEvents:
    """Events decoded once for every view that follows their log.

    Each view reads the same log entries in its own thread; decrypting and parsing an entry
    again for each (three times for ingest, twice for delivery) was about a tenth of the
    supervisor's CPU. Domain events are immutable, so the views can share them.
    """

    def __init__(self, apps: dict[str, Any], size: int = 4 * BATCH_SIZE) -> None:
        self._apps = apps
        self._size = size
        self._events: OrderedDict[tuple[str, int], Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, app_name: str, notification: Any) -> Any:
        key = (app_name, int(notification.id))
        with self._lock:
            event = self._events.get(key)
        if event is None:
            event = self._apps[app_name].mapper.to_domain_event(notification)
            with self._lock:
                self._events[key] = event
                if len(self._events) > self._size:
                    self._events.popitem(last=False)
        return event


def process_batch(view: View, db: ViewDatabase, apps: dict[str, Any],
                  current: dict[str, int] | None = None,
                  decoded: DecodedEvents | None = None) -> int:
    """Apply up to BATCH_SIZE new events of each followed log in one transaction.

    ``current`` (positions by log) may be passed in to save a query; it is updated only once
    the transaction has committed. ``decoded`` shares decoded events between views. Returns
    how many events were applied.

    Another process may apply the same view (routers of several sites on one PostgreSQL
    database, or ``dicom-router projections rebuild`` while the router serves): the
    transaction locks the view's positions and re-reads them, and a batch that another
    applier has already applied is dropped and selected again from where that one got to.
    """
    current = view_positions(db, view.name) if current is None else current
    while True:  # each retry follows another applier's progress, so this ends
        applied = _try_batch(view, db, apps, current, decoded)
        if applied is not None:
            return applied


class _Moved(Exception):
    """The view's stored positions moved since they were read (another applier)."""


def _try_batch(view: View, db: ViewDatabase, apps: dict[str, Any], current: dict[str, int],
               decoded: DecodedEvents | None) -> int | None:
    """One batch from ``current``; None when another applier had moved the positions
    (``current`` then holds the stored ones)."""
    batches = []
    for app_name in view.follows:
        batch = apps[app_name].recorder.select_notifications(
            start=current.get(app_name, 0), limit=BATCH_SIZE, inclusive_of_start=False)
        if batch:
            batches.append((app_name, batch))
    if not batches:
        return 0
    stored: dict[str, int] = {}
    try:
        with db.transaction() as cur:
            stored = _lock_positions(cur, db.dialect, view.name)
            if any(stored.get(app, 0) != current.get(app, 0) for app in view.follows):
                raise _Moved
            view.begin_batch(cur)
            for app_name, batch in batches:
                mapper = apps[app_name].mapper
                for n in batch:
                    event = decoded.get(app_name, n) if decoded else mapper.to_domain_event(n)
                    view.apply(cur, EventRecord(app_name, n.id, topic_name(n.topic), event))
            view.end_batch(cur)
            for app_name, batch in batches:
                save_position(cur, view.name, app_name, batch[-1].id)
            if db.dialect == "postgres":
                cur.execute(f"NOTIFY {VIEWS_CHANNEL}")  # delivered at commit
    except _Moved:
        current.clear()
        current.update(stored)
        return None
    for app_name, batch in batches:
        current[app_name] = batch[-1].id
    return sum(len(batch) for _, batch in batches)


def _lock_positions(cur: Cursor, dialect: str, view_name: str) -> dict[str, int]:
    """Take the view's write lock for this transaction and read its positions under it.

    SQLite: the transaction began IMMEDIATE, so it holds the file's write lock already.
    PostgreSQL: an advisory lock keyed by the view's name (rows of a view that has not
    committed a batch yet do not exist, so they cannot be locked with FOR UPDATE).
    """
    if dialect == "postgres":
        cur.execute("SELECT pg_advisory_xact_lock(hashtext(?))", (f"view:{view_name}",))
    return positions_in(cur, view_name)


class ProjectionRunner:
    """One thread per view, woken by saves (in-process), NOTIFY (PostgreSQL) or a poll.

    ``leads(view_name)`` says whether this node builds the view now (router.cluster: one node
    at a time on a shared PostgreSQL database). When it does not, the view's thread follows:
    it reads the positions the building node commits and wakes this node's listeners and
    waiting queries as they move.
    """

    def __init__(self, views: Sequence[ViewHandle], apps: dict[str, Any],
                 poll_interval: float = 0.5, coalesce: float = 0.05,
                 leads: Callable[[str], bool] = lambda view: True,
                 manage_schema: bool = True) -> None:
        self._views = list(views)
        self._manage_schema = manage_schema  # False: migrate made the tables (another role)
        self._leads = leads
        # After a partial batch, wait this long so that the next one is larger: one
        # transaction per receipt would cost more than the receipts themselves.
        self._coalesce = coalesce
        self._positions: dict[str, dict[str, int]] = {}
        self._apps = apps
        self._decoded = DecodedEvents(apps)
        self._poll = poll_interval
        names = [handle.view.name for handle in self._views]
        self._wakes = {name: threading.Event() for name in names}
        # Set by a query waiting for the view: it ends the coalescing pause (see hurry()).
        self._hurries = {name: threading.Event() for name in names}
        # catch_up() may run beside the view threads: one batch of a view at a time.
        self._locks = {name: threading.Lock() for name in names}
        self._schema_ready: set[str] = set()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._listeners: list[Callable[[str], None]] = []
        self.progress = ViewProgress()  # each view's committed positions, for waiting queries

    def add_listener(self, callback: Callable[[str], None]) -> None:
        """``callback(view_name)`` runs after each committed batch (keep it quick)."""
        self._listeners.append(callback)

    def wake(self) -> None:
        for event in self._wakes.values():
            event.set()

    def _wake_for(self, channel: str) -> None:
        """A NOTIFY: new events wake the views this node builds; another node's committed
        batch (VIEWS_CHANNEL) wakes the views it follows. Waking every view of every node
        for every event cost each following node's views a positions query per receipt
        anywhere in the cluster (about 2 ms of CPU per instance, docs/scaling.md)."""
        follower_news = channel == VIEWS_CHANNEL
        for name, wake in self._wakes.items():
            if self._leads(name) != follower_news:
                wake.set()

    def hurry(self, view: str) -> None:
        """A query waits for ``view``: apply what is recorded now, and skip the pause that
        lets the next batch grow (saves only wake the views: under load they would end every
        pause and cost a transaction per receipt)."""
        for events in (self._hurries, self._wakes):
            if view in events:
                events[view].set()

    def listen(self, database_url: str, channels: Sequence[str]) -> None:
        """PostgreSQL: wake on NOTIFY from any node's saves (the recorder sends them)."""
        t = threading.Thread(target=self._listen, args=(database_url, channels),
                             name="view-listen", daemon=True)
        t.start()
        self._threads.append(t)

    def _listen(self, database_url: str, channels: Sequence[str]) -> None:
        import psycopg

        while not self._stop.is_set():
            try:
                with psycopg.connect(database_url, autocommit=True) as conn:
                    for channel in channels:
                        conn.execute(f'LISTEN "{channel}"')
                    while not self._stop.is_set():
                        # A short wait: stop() waits for this loop to notice it.
                        for notify in conn.notifies(timeout=LISTEN_POLL):
                            self._wake_for(notify.channel)
            except Exception as exc:
                logger.warning("LISTEN connection lost (%s); polling meanwhile",
                               type(exc).__name__)
                self._stop.wait(2.0)

    def _ensure_schema(self, view: View, db: ViewDatabase) -> None:
        """Create the view's tables once per runner, under the view's lock. Not on every
        catch-up: on PostgreSQL ``CREATE INDEX IF NOT EXISTS`` locks its table before looking,
        and a catch-up from another thread then deadlocked with the view's own batch."""
        if not self._manage_schema or view.name in self._schema_ready:
            return
        with self._locks[view.name]:
            if view.name not in self._schema_ready:
                ensure_schema(view, db)
                self._schema_ready.add(view.name)

    def start(self) -> None:
        for handle in self._views:
            view, db = handle.view, handle.db
            self._ensure_schema(view, db)
            t = threading.Thread(target=self._run, args=(view, db), name=f"view-{view.name}",
                                 daemon=True)
            t.start()
            self._threads.append(t)

    def catch_up(self) -> None:
        """Synchronously apply everything recorded so far (start-up, tests, shutdown flush);
        a view another node builds is only read."""
        for handle in self._views:
            view, db = handle.view, handle.db
            self._ensure_schema(view, db)
            if not self._leads(view.name):
                self._follow(view, db)
                continue
            while self._step(view, db):
                pass

    def _follow(self, view: View, db: ViewDatabase) -> None:
        """Read the positions another node committed; wake listeners when they moved."""
        with self._locks[view.name]:
            before = self._positions.get(view.name)
            stored = self._positions[view.name] = view_positions(db, view.name)
        self.progress.advanced(view.name, stored)
        if before is not None and stored != before:
            for callback in self._listeners:
                callback(view.name)

    def _step(self, view: View, db: ViewDatabase) -> int:
        """One batch of one view, with its cached positions (re-read after a failure)."""
        with self._locks[view.name]:
            current = self._positions.get(view.name)
            if current is None:
                current = self._positions[view.name] = view_positions(db, view.name)
            try:
                applied = process_batch(view, db, self._apps, current, self._decoded)
            except Exception:
                self._positions.pop(view.name, None)
                raise
            self.progress.advanced(view.name, current)  # committed (or read) positions
            return applied

    def _run(self, view: View, db: ViewDatabase) -> None:
        lower_this_thread()
        while not self._stop.is_set():
            self._wakes[view.name].clear()
            self._hurries[view.name].clear()
            if not self._leads(view.name):
                try:
                    self._follow(view, db)
                except Exception as exc:
                    logger.warning("view %s: reading its positions failed (%s); retrying",
                                   view.name, type(exc).__name__)
                    self._stop.wait(1.0)
                    continue
                self._wakes[view.name].wait(self._poll)
                continue
            try:
                applied = self._step(view, db)
            except Exception:
                logger.exception("view %s: batch failed; retrying", view.name)
                self._stop.wait(1.0)
                continue
            if applied:
                for callback in self._listeners:
                    callback(view.name)
                if applied < BATCH_SIZE:
                    self._hurries[view.name].wait(self._coalesce)
                continue
            self._wakes[view.name].wait(self._poll)

    def stop(self) -> None:
        """Stop the threads, then flush what is left so the views match the log."""
        self._stop.set()
        self.wake()
        for event in self._hurries.values():
            event.set()
        for t in self._threads:
            t.join(timeout=10)
        try:
            self.catch_up()
        except Exception:
            logger.exception("final view flush failed")
