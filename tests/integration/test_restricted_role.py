"""Serving as a PostgreSQL role that cannot change events (docs/audit-trail.md): migrate runs as
the tables' owner, deploy/postgres/restricted-role.sql grants the serving role what it needs,
and the router receives, routes, delivers and audits with it while an UPDATE, DELETE or
TRUNCATE of an event row, or dropping the trigger that refuses them, is refused."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import psycopg
import pytest
from pydicom.data import get_testdata_file

from projections.audit_chain import verify
from router.application.commands import Actor
from router.cli import main
from tests.conftest import PG_ADMIN_URL, make_settings, wait_for

pytestmark = pytest.mark.postgres
SQL_FILE = Path(__file__).parents[2] / "deploy" / "postgres" / "restricted-role.sql"
LOGS = ("ingest_events", "delivery_events", "admin_events", "access_events")


@pytest.fixture
def role(pg_url: str) -> Iterator[str]:
    """A login role that owns nothing (dropped with its grants after the test)."""
    name = f"router_app_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE ROLE "{name}" LOGIN')
    yield name
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f'DROP OWNED BY "{name}"')  # its grants in the test's database
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP ROLE IF EXISTS "{name}"')


def as_role(url: str, role: str) -> str:
    parts = urlparse(url)
    return f"postgresql://{role}@{parts.hostname}:{parts.port or 5432}{parts.path}"


def refused(url: str, sql: str) -> str:
    """The error PostgreSQL answers ``sql`` with (the test fails if it is accepted)."""
    with psycopg.connect(url, autocommit=True) as conn:
        try:
            conn.execute(sql)
        except psycopg.errors.InsufficientPrivilege as exc:
            return str(exc)
    pytest.fail(f"accepted: {sql}")


def test_the_router_works_as_a_role_that_cannot_change_events(
        pg_url: str, role: str, tmp_path: Path, start_router: Any, monkeypatch: Any,
        dcmtk: None) -> None:
    owner = make_settings(tmp_path, pg_url)
    monkeypatch.setenv("DICOM_ROUTER_DATABASE_URL", pg_url)
    monkeypatch.setenv("DICOM_ROUTER_SECRET_KEY", owner.secret_key or "")
    assert main(["--data-dir", str(owner.data_dir), "migrate"]) == 0
    result = subprocess.run(["psql", "-X", "-q", "-v", f"role={role}", "-d", pg_url, "-f",
                             str(SQL_FILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    url = as_role(pg_url, role)

    settings = make_settings(tmp_path, url, manage_schema=False)
    router = start_router(settings)
    try:
        admin = Actor("admin", "127.0.0.1")
        (tmp_path / "archive").mkdir()
        router.commands.put_destination({"name": "archive", "type": "file",
                                         "path": str(tmp_path / "archive")}, admin)
        router.commands.put_rule({"name": "all", "calling_aet": "*",
                                  "destinations": ["archive"]}, admin)
        router.runner.catch_up()
        sent = subprocess.run(
            ["storescu", "-aet", "CT_1", "-aec", "DICOMROUTER", "127.0.0.1",
             str(router.dicom.port), get_testdata_file("CT_small.dcm", download=False)],
            env={**os.environ, "TCP_NODELAY": "1"}, capture_output=True, text=True,
            timeout=60)
        assert sent.returncode == 0, sent.stderr[-2000:]
        jobs = router.view_db("jobs")
        wait_for(lambda: jobs.query("SELECT 1 FROM deliveries WHERE status = 'delivered'"),
                 60, "the delivery to the folder")
        assert list((tmp_path / "archive").rglob("*.dcm"))
        router.runner.catch_up()
        audit = router.view_db("audit")
        actions = {r["action"] for r in audit.query("SELECT action FROM audit")}
        assert {"Job.Received", "Delivery.Succeeded", "Rule.Created",
                "NodeActivity.Started"} <= actions
        verdict = verify(audit)
        assert verdict.broken is None and verdict.checked == len(
            audit.query("SELECT 1 FROM audit"))
    finally:
        router.stop()

    for log in LOGS:
        assert "immutable" in refused(url, f"UPDATE {log} SET originator_version ="
                                           " originator_version")
        assert "permission denied" in refused(url, f"DELETE FROM {log}")
        assert "permission denied" in refused(url, f"TRUNCATE {log}")
        assert "must be owner" in refused(url, f"ALTER TABLE {log} DISABLE TRIGGER ALL")
        assert "must be owner" in refused(url, f"DROP TABLE {log}")
    with psycopg.connect(url) as conn:
        owned = conn.execute("SELECT count(*) FROM pg_class WHERE relowner ="
                             " (SELECT oid FROM pg_roles WHERE rolname = current_user)"
                             ).fetchone()
        rows = conn.execute("SELECT count(*) FROM ingest_events").fetchone()
    assert owned == (0,) and rows is not None and rows[0] >= 3
