"""router.dispatch.seats: counting our associations to a peer and remembering its limit."""

from __future__ import annotations

import pytest

from router.dispatch import seats as seats_module
from router.dispatch.seats import Seats, seats_for


def test_a_learned_limit_holds_for_a_while_then_more_are_tried(
        monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(seats_module.time, "monotonic", lambda: now[0])
    seats = Seats("PACS@pacs:104")
    assert seats.available() and seats.taken() == 0
    seats.opened()
    assert seats.available()  # no limit known yet: an extra one may be tried
    seats.learn(1)
    assert not seats.available()
    seats.closed()
    assert seats.available() and seats.taken() == 0  # below the limit again
    seats.opened()
    now[0] += seats_module.LEARN_FOR + 1
    assert seats.available()  # forgotten: an extra one is tried again
    seats.closed()
    seats.closed()
    assert seats.taken() == 0  # never negative


def test_one_peer_one_seats_whatever_the_host_spelling() -> None:
    a = seats_for("PACS.example", 104, "PACS", "ROUTER")
    assert seats_for("pacs.example", 104, "PACS", "ROUTER") is a
    assert seats_for("pacs.example", 104, "PACS", "OTHER") is not a
    assert seats_for("pacs.example", 11112, "PACS", "ROUTER") is not a
