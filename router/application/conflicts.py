"""Read, change, save, and again on a version conflict: the one way a command that races a
background writer on one aggregate (an operator's requeue against the dispatcher's outcome,
an AI callback against the worker's Accepted) lands on top of what is stored instead of
failing. ``change`` decides again on each fresh read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from eventsourcing.persistence import IntegrityError

A = TypeVar("A")


def save_changed(read: Callable[[], A | None], change: Callable[[A | None], A | None],
                 save: Callable[[A], Any], tries: int = 3) -> Any:
    """``save(change(read()))``, read and changed again after each IntegrityError; the last
    one is raised after ``tries``. Nothing is saved (None) when ``change`` returns None."""
    for left in range(tries - 1, -1, -1):
        aggregate = change(read())
        if aggregate is None:
            return None
        try:
            return save(aggregate)
        except IntegrityError:
            if not left:
                raise
    return None
