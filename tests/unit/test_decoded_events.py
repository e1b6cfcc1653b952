"""The projection runner decodes each log entry once for all the views that follow it."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from projections.runner import DecodedEvents


class _CountingMapper:
    def __init__(self) -> None:
        self.calls = 0

    def to_domain_event(self, notification: Any) -> Any:
        self.calls += 1
        return ("decoded", notification.id)


def test_each_entry_is_decoded_once_and_old_ones_are_forgotten() -> None:
    mapper = _CountingMapper()
    decoded = DecodedEvents({"ingest": SimpleNamespace(mapper=mapper)}, size=3)
    entries = [SimpleNamespace(id=n) for n in range(1, 5)]
    for _ in range(3):  # three views reading the same entries
        assert [decoded.get("ingest", e) for e in entries[:3]] == [
            ("decoded", 1), ("decoded", 2), ("decoded", 3)]
    assert mapper.calls == 3
    decoded.get("ingest", entries[3])  # the oldest (1) is dropped
    decoded.get("ingest", entries[0])
    assert mapper.calls == 5


class _Log:
    """A recorder over a growing list of entries, counting the selects it serves."""

    def __init__(self) -> None:
        self.entries: list[Any] = []
        self.selects: list[tuple[int, int]] = []

    def append(self, count: int) -> None:
        last = self.entries[-1].id if self.entries else 0
        self.entries += [SimpleNamespace(id=last + n) for n in range(1, count + 1)]

    def direct(self, start: int, limit: int) -> list[Any]:
        return [e for e in self.entries if e.id > start][:limit]

    def select_notifications(self, start: int, limit: int,
                             inclusive_of_start: bool = True) -> list[Any]:
        assert not inclusive_of_start
        self.selects.append((start, limit))
        return self.direct(start, limit)


def test_entries_are_selected_once_for_all_views_and_always_as_the_log_gives_them() -> None:
    log = _Log()
    decoded = DecodedEvents({"ingest": SimpleNamespace(recorder=log)}, size=6)
    log.append(3)
    for _ in range(3):  # three views at the start of the log
        assert decoded.select("ingest", 0, 5) == log.direct(0, 5)
    # Entries 1..3 were read once; each later view only asked whether more had arrived since.
    assert log.selects == [(0, 5), (3, 2), (3, 2)]
    log.selects.clear()

    log.append(4)  # 1..7
    assert decoded.select("ingest", 3, 2) == log.direct(3, 2)  # 4, 5: read from 3
    assert decoded.select("ingest", 1, 10) == log.direct(1, 10)  # 2..5 kept, 6..7 read
    assert decoded.select("ingest", 4, 2) == log.direct(4, 2)  # kept
    assert log.selects == [(3, 2), (5, 6)]
    log.selects.clear()

    # Only the last 6 are kept (2..7): a view further behind reads the log itself.
    assert decoded.select("ingest", 0, 3) == log.direct(0, 3)
    assert log.selects == [(0, 3)]
    # Past the end: nothing, and nothing invented.
    assert decoded.select("ingest", 7, 5) == []
