"""The ``projection_positions`` table: how far each view (and the ATNA sender) has got in
each log it follows. Every read and write of that table is here.

A view's positions are written in the same transaction as its rows (projections/runner.py),
so a position never names events whose rows are not there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from projections.db import Cursor, ViewDatabase

POSITIONS_SQL = """CREATE TABLE IF NOT EXISTS projection_positions (
    view TEXT NOT NULL, application TEXT NOT NULL, position BIGINT NOT NULL,
    PRIMARY KEY (view, application))"""

_SELECT = "SELECT application, position FROM projection_positions WHERE view = ?"
_SAVE = ("INSERT INTO projection_positions (view, application, position) VALUES (?, ?, ?)"
         " ON CONFLICT (view, application) DO UPDATE SET position = excluded.position")
_FORGET = "DELETE FROM projection_positions WHERE view = ?"


def view_positions(db: ViewDatabase, view: str) -> dict[str, int]:
    """The positions ``view`` has committed, by log (a log it never applied is absent)."""
    return _by_log(db.query(_SELECT, (view,)))


def positions_in(cur: Cursor, view: str) -> dict[str, int]:
    """As :func:`view_positions`, inside the transaction of ``cur`` (under its locks)."""
    cur.execute(_SELECT, (view,))
    return _by_log(cur.fetchall())


def save_position(cur: Cursor, view: str, log: str, position: int) -> None:
    cur.execute(_SAVE, (view, log, position))


def forget_positions(cur: Cursor, view: str) -> None:
    """Drop the view's positions: it replays its logs from position 0."""
    cur.execute(_FORGET, (view,))


def _by_log(rows: Sequence[Any]) -> dict[str, int]:
    return {r["application"]: int(r["position"]) for r in rows}
