"""The names of delivery states that people see: in the UI, the API, the CLI and the docs.

The jobs view stores a delivery's state under the names the dispatcher has always used
(``pending``, ``dead``, ...); every reader shows them under one vocabulary instead:

======== ============ ==========================================================
shown    stored       meaning
======== ============ ==========================================================
failed   dead         given up (dead-lettered): a permanent error, or retries
                      exhausted past the maximum age; requeue to try again
retrying retrying     the last attempt failed; the next one is due at a set time
queued   pending      waiting for its first attempt (or requeued)
held     held         waiting for its series or study to be complete or quiet
delivered delivered   the destination confirmed the object
cancelled cancelled   an operator stopped it
======== ============ ==========================================================

Filters also take the old names as aliases: ``dead`` and ``dead-lettered`` mean
``failed``, ``pending`` means ``queued``.
"""

from __future__ import annotations

# Most urgent first: a job's or a transfer's state is its most urgent delivery's.
SHOWN_BY_STORED = {"dead": "failed", "retrying": "retrying", "pending": "queued",
                   "held": "held", "delivered": "delivered", "cancelled": "cancelled"}
STORED_BY_SHOWN = {shown: stored for stored, shown in SHOWN_BY_STORED.items()}
DELIVERY_STATES = tuple(SHOWN_BY_STORED.values())
ALIASES = {"dead": "failed", "dead-lettered": "failed", "dead_lettered": "failed",
           "pending": "queued"}
OPEN_STATES = ("retrying", "queued", "held")  # still to be delivered
FINAL_STATES = ("failed", "delivered", "cancelled")


def shown(stored: str) -> str:
    """The name people see for a state as the jobs view stores it."""
    return SHOWN_BY_STORED.get(stored, stored)


def canonical(name: str) -> str:
    """A state name as typed (current name or an old alias) as the current name."""
    return ALIASES.get(name, name)


def stored(name: str) -> str:
    """The jobs view's stored value for a shown name (or alias)."""
    name = canonical(name)
    return STORED_BY_SHOWN.get(name, name)


def shown_sql(column: str) -> str:
    """A SQL expression giving ``column`` (a stored delivery status) under its shown name."""
    cases = " ".join(f"WHEN '{s}' THEN '{v}'" for s, v in SHOWN_BY_STORED.items() if s != v)
    return f"CASE {column} {cases} ELSE {column} END"
