"""The views' PostgreSQL connection pool after the server dropped our sessions (a restart, a
failover, an administrator's pg_terminate_backend): the next query works, no caller sees a
dead pooled connection."""

from __future__ import annotations

import psycopg
import pytest

from projections.db import PostgresViews
from tests.conftest import PG_ADMIN_URL


@pytest.mark.postgres
def test_a_query_after_the_server_dropped_pooled_connections_succeeds(pg_url: str) -> None:
    db = PostgresViews(pg_url)
    try:
        with db.transaction() as cur:
            cur.execute("CREATE TABLE t (n INTEGER)")
            cur.execute("INSERT INTO t (n) VALUES (?)", (7,))
        assert db.query("SELECT n FROM t") == [{"n": 7}]  # the pooled connection is in use
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            dropped = conn.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (pg_url.rsplit("/", 1)[1],)).fetchone()
        assert dropped is not None and dropped[0] >= 1
        assert db.query("SELECT n FROM t") == [{"n": 7}]
        with db.transaction() as cur:
            cur.execute("INSERT INTO t (n) VALUES (?)", (8,))
        assert db.query("SELECT count(*) AS c FROM t") == [{"c": 2}]
    finally:
        db.close()
