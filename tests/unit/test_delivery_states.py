"""The shown names of delivery states, their aliases, and the SQL that renames stored values."""

from __future__ import annotations

import sqlite3

import pytest

from projections.transfers_queries import progress_text
from router.domain.delivery_states import (
    DELIVERY_STATES,
    SHOWN_BY_STORED,
    canonical,
    shown,
    shown_sql,
    stored,
)


def test_every_stored_state_has_one_shown_name_and_back() -> None:
    assert DELIVERY_STATES == ("failed", "retrying", "queued", "held", "delivered",
                               "cancelled")
    for name, value in SHOWN_BY_STORED.items():
        assert stored(shown(name)) == name and shown(name) == value


@pytest.mark.parametrize(("typed", "name"), [("dead", "failed"), ("dead-lettered", "failed"),
                                             ("pending", "queued"), ("failed", "failed"),
                                             ("retrying", "retrying")])
def test_old_names_are_aliases(typed: str, name: str) -> None:
    assert canonical(typed) == name


def test_shown_sql_renames_stored_values_in_sqlite() -> None:
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE d (status TEXT)")
    db.executemany("INSERT INTO d VALUES (?)", [(s,) for s in SHOWN_BY_STORED] + [("other",)])
    got = [row[0] for row in db.execute(f"SELECT {shown_sql('status')} FROM d")]
    assert got == [*SHOWN_BY_STORED.values(), "other"]


def test_progress_text_leads_with_delivered_then_urgent_states() -> None:
    assert progress_text({"delivered": 58, "retrying": 2}) == "58/60 delivered, 2 retrying"
    assert progress_text({"failed": 1, "queued": 3}) == "0/4 delivered, 1 failed, 3 queued"


def test_the_bulk_api_describes_states_by_their_shown_names() -> None:
    """The OpenAPI summaries of the bulk actions name the states people see; the old stored
    names appear only where they are offered as aliases."""
    import re

    from web.api.deliveries import ROUTES

    for route in ROUTES:
        words = set(re.findall(r"[a-z]+", route.summary))
        assert not words & {"dead", "pending"}, route.summary
