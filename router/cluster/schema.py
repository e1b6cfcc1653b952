"""Table creation, one node or command at a time.

PostgreSQL's ``CREATE TABLE IF NOT EXISTS`` is not safe against itself: two sessions creating
the same table at once can fail with a unique violation on the catalog. ``dicom-router
migrate`` and every node's start create their tables under one advisory lock, so nodes may be
started together, before or without ``migrate``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

SCHEMA_LOCK = "dicom-router:schema"


def is_postgres(database_url: str) -> bool:
    return database_url.startswith(("postgresql://", "postgres://"))


@contextmanager
def schema_lock(database_url: str) -> Iterator[None]:
    """Hold the database's schema lock (waits for another holder); nothing on SQLite, whose
    files belong to one node."""
    if not is_postgres(database_url):
        yield
        return
    import psycopg

    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(hashtext(%s))", (SCHEMA_LOCK,))
        try:
            yield
        finally:
            conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", (SCHEMA_LOCK,))
