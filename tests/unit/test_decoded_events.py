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
