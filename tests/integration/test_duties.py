"""One node at a time performs each duty (building a view, sending to a destination, the
timers): PostgreSQL advisory locks, taken over when the holder stops, dies or loses its
database session."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from router.cluster.leadership import AdvisoryLocks, SoleNode
from tests.conftest import make_settings, wait_for
from tests.integration.test_web_jobs import storescu, write_instances

pytestmark = pytest.mark.postgres


def test_a_duty_has_one_holder_and_passes_on_when_it_lets_go(pg_url: str) -> None:
    a, b = AdvisoryLocks(pg_url, "a"), AdvisoryLocks(pg_url, "b")
    try:
        assert a.holds("view:jobs")
        assert not b.holds("view:jobs")
        assert b.holds("destination:pacs")  # another duty: free
        assert not a.holds("destination:pacs")
        a.close()
        # b tries again at most once a second
        wait_for(lambda: b.holds("view:jobs"), 5, "b to take the view over")
        assert sorted(b.held()) == ["destination:pacs", "view:jobs"]
    finally:
        a.close()
        b.close()


def test_a_node_that_loses_its_session_gives_its_duties_up(pg_url: str) -> None:
    a, b = AdvisoryLocks(pg_url, "a"), AdvisoryLocks(pg_url, "b")
    try:
        assert a.holds("units")
        with psycopg.connect(pg_url, autocommit=True) as admin:
            killed = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = 'dicom-router a'").fetchall()
        assert killed == [(True,)]
        # a notices within a second (its next check), b takes the duty at its next try
        wait_for(lambda: not a.holds("units"), 5, "a to notice its lost session")
        wait_for(lambda: b.holds("units"), 5, "b to take the duty")
        assert not a.holds("units")  # a reconnects, but b holds it now
    finally:
        a.close()
        b.close()


def test_sqlite_is_one_node_holding_everything() -> None:
    assert SoleNode().holds("view:jobs") and SoleNode().holds("anything")


def _node(tmp_path: Path, pg_url: str, node: str, start_router: Any) -> Any:
    return start_router(make_settings(tmp_path / node, pg_url, node_id=node))


def _view_duties(router: Any) -> set[str]:
    return {d for d in router.duties.held() if d.startswith("view:")}


def test_one_node_builds_the_views_and_another_takes_over_when_it_stops(
        pg_url: str, tmp_path: Path, start_router: Any) -> None:
    a = _node(tmp_path, pg_url, "node-a", start_router)
    b = _node(tmp_path, pg_url, "node-b", start_router)
    assert _view_duties(a) == {"view:jobs", "view:studies", "view:audit"}
    assert _view_duties(b) == set()
    # Received on the node that does not build the views, read on both.
    assert storescu(b.dicom.port, write_instances(tmp_path / "one", "CT", 3),
                    "CT_SCANNER").returncode == 0
    for node in (a, b):
        jobs = node.view_db("jobs")
        wait_for(lambda jobs=jobs: len(jobs.query("SELECT 1 FROM jobs")) == 3, 20,
                 "the receipts in the jobs view")
    # Read-your-writes on the node that follows: stored on a, b's query waits for a's views.
    for round_ in range(5):
        files = write_instances(tmp_path / f"ryw{round_}", "CT", 2)
        assert storescu(a.dicom.port, files, "CT_SCANNER").returncode == 0
        assert b.fresh.wait("studies", timeout=5.0)
        found = b.view_db("studies").query("SELECT COUNT(*) AS n FROM instances")[0]["n"]
        assert found == 3 + 2 * (round_ + 1)
    a.stop()
    started = time.monotonic()
    wait_for(lambda: _view_duties(b) == {"view:jobs", "view:studies", "view:audit"}, 10,
             "node-b to build the views")
    took = time.monotonic() - started
    assert storescu(b.dicom.port, write_instances(tmp_path / "two", "CT", 2),
                    "CT_SCANNER").returncode == 0
    jobs = b.view_db("jobs")
    wait_for(lambda: len(jobs.query("SELECT 1 FROM jobs")) == 15, 20,
             "node-b's views to take the new receipts")
    print(f"node-b took the views over {took:.1f} s after node-a stopped")


def test_configuration_changed_on_one_node_is_in_force_on_the_others_within_2_s(
        pg_url: str, tmp_path: Path, start_router: Any) -> None:
    from router.application.commands import Actor

    a = _node(tmp_path, pg_url, "node-a", start_router)
    b = _node(tmp_path, pg_url, "node-b", start_router)
    out = tmp_path / "node-a" / "out"
    out.mkdir()
    changed = time.monotonic()
    a.commands.put_destination({"name": "archive", "type": "file", "path": str(out)},
                               Actor("admin"))
    a.commands.put_rule({"name": "ct", "calling_aet": "CT_*", "destinations": ["archive"]},
                        Actor("admin"))
    wait_for(lambda: "archive" in b.admin.snapshot().live_destinations()
             and any(r.spec.name == "ct" for r in b.admin.snapshot().rules), 2.0,
             "node-b to see the new destination and rule")
    seen = time.monotonic() - changed
    # In force: a receipt on node-b is routed by the rule made on node-a.
    assert storescu(b.dicom.port, write_instances(tmp_path / "ct", "CT", 1),
                    "CT_SCANNER").returncode == 0
    jobs = b.view_db("jobs")
    wait_for(lambda: jobs.query("SELECT destination FROM deliveries"), 20, "the delivery row")
    assert jobs.query("SELECT destination FROM deliveries") == [{"destination": "archive"}]
    print(f"node-b saw the change after {seen:.2f} s")
