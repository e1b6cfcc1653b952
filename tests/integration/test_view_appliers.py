"""Two appliers of one view (routers of several sites on one PostgreSQL database, a rebuild
beside a serving router, catch_up beside a view's thread) never apply an event twice or skip
one, whether they take turns with stale positions or run at the same time."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from eventsourcing.domain import Aggregate

from projections import runner as runner_module
from projections.db import Cursor, open_views
from projections.runner import EventRecord, View, ensure_schema, process_batch
from router.application.stores import EventStores, StoreConfig


class Thing(Aggregate):
    """An aggregate of the test's own: one Created event each."""

    def __init__(self, label: str) -> None:
        self.label = label


class CountingView(View):
    """Counts the events it is given, with no protection of its own against a replay: an
    event applied twice shows as a count too high."""

    name = "counting"
    follows = ("admin",)
    tables = ("counted",)

    def create(self, cur: Cursor, dialect: str) -> None:
        cur.execute("CREATE TABLE IF NOT EXISTS counted (k INTEGER PRIMARY KEY, n BIGINT)")
        cur.execute("INSERT INTO counted (k, n) VALUES (1, 0) ON CONFLICT (k) DO NOTHING")

    def apply(self, cur: Cursor, record: EventRecord) -> None:
        cur.execute("UPDATE counted SET n = n + 1 WHERE k = 1")


def counted(db: Any) -> int:
    return int(db.query("SELECT n FROM counted WHERE k = 1")[0]["n"])


@pytest.fixture
def logged(database_url: str) -> Any:
    stores = EventStores(StoreConfig(database_url))
    stores.admin.save(*[Thing(f"thing {i}") for i in range(40)])
    db = open_views(database_url, "counting")
    view = CountingView()
    ensure_schema(view, db)
    yield view, db, stores
    db.close()
    stores.close()


def test_appliers_taking_turns_with_stale_positions_apply_each_event_once(
    logged: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    view, db, stores = logged
    monkeypatch.setattr(runner_module, "BATCH_SIZE", 7)
    total = stores.admin.recorder.max_notification_id()
    first: dict[str, int] = {}
    second: dict[str, int] = {}
    assert process_batch(view, db, stores.all(), first) == 7
    # The second starts from nothing and must not apply the first's batch again.
    assert process_batch(view, db, stores.all(), second) == 7
    assert second["admin"] == 14 and counted(db) == 14
    while process_batch(view, db, stores.all(), first) + process_batch(
            view, db, stores.all(), second):
        pass
    assert counted(db) == 40 and first["admin"] == second["admin"] == total


def test_appliers_running_at_once_apply_each_event_once(
    logged: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    view, db, stores = logged
    monkeypatch.setattr(runner_module, "BATCH_SIZE", 3)
    applied: list[int] = []
    errors: list[BaseException] = []

    def apply_all() -> None:
        current: dict[str, int] = {}
        try:
            while count := process_batch(view, db, stores.all(), current):
                applied.append(count)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=apply_all) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert sum(applied) == 40 and counted(db) == 40
