"""Several nodes on one database: each has an identity, recorded in what it receives and
attempts; each lists the others with when it was last seen; nodes started together create
their tables without racing."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import requests

from projections.db import SqliteViews
from router.cluster.nodes import NodeRegistry
from tests.conftest import ADMIN_PASSWORD, make_settings, wait_for
from tests.integration.test_web_jobs import storescu, write_instances
from tests.web_harness import bearer


def _at_once(work: Callable[[Any], Any], items: Sequence[Any],
             timeout: float = 120) -> list[Any]:
    """``work(item)`` for every item, in threads released together; what each returned, or
    the exception it raised, in the order of ``items``."""
    barrier = threading.Barrier(len(items))
    results: list[Any] = [None] * len(items)

    def run(index: int, item: Any) -> None:
        barrier.wait()
        try:
            results[index] = work(item)
        except BaseException as exc:
            results[index] = exc

    threads = [threading.Thread(target=run, args=pair) for pair in enumerate(items)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    return results


def _node_settings(tmp_path: Path, database_url: str, node: str, **overrides: Any) -> Any:
    return make_settings(tmp_path / node, database_url, node_id=node, **overrides)


@pytest.mark.postgres
def test_nodes_started_together_on_a_fresh_database_come_up(pg_url: str, tmp_path: Path,
                                                             start_router: Any) -> None:
    """Three nodes build (create every table) at once on an empty database: no catalog race."""
    from router.service import Router

    names = ["node-0", "node-1", "node-2"]
    results = _at_once(lambda node: Router.build(_node_settings(tmp_path, pg_url, node)), names)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors
    built = dict(zip(names, results, strict=True))
    assert sorted(built) == ["node-0", "node-1", "node-2"]
    for router in built.values():  # built, not started: close what build opened
        router.fresh.close()
        for handle in router.views.values():
            handle.db.close()
        router.stores.close()


@pytest.mark.postgres
def test_each_node_records_itself_and_lists_the_others(pg_url: str, tmp_path: Path,
                                                       web_router: Any) -> None:
    a = web_router(_node_settings(tmp_path, pg_url, "node-a"))
    b = web_router(_node_settings(tmp_path, pg_url, "node-b"))
    files = write_instances(tmp_path / "ct", "CT", 2)
    assert storescu(a.router.dicom.port, files, "CT_SCANNER").returncode == 0
    jobs = b.router.view_db("jobs")  # read on the other node: one database
    rows = wait_for(lambda: jobs.query("SELECT node FROM jobs"), 20, "the two receipts")
    wait_for(lambda: len(jobs.query("SELECT node FROM jobs")) == 2, 20, "both receipts")
    assert {r["node"] for r in jobs.query("SELECT node FROM jobs")} == {"node-a"}, rows
    received = [e for e in a.router.stores.ingest.recorder.select_notifications(0, 100)
                if e.topic.endswith("Job.Received")]
    assert len(received) == 2
    event = a.router.stores.ingest.mapper.to_domain_event(received[0])
    assert event.node == "node-a"

    def listed(server: Any) -> dict[str, str]:
        r = requests.get(server.url + "/api/v1/stats", timeout=30,
                         headers=bearer(server.url, "admin", ADMIN_PASSWORD))
        r.raise_for_status()
        return {n["node_id"]: n["state"] for n in r.json()["nodes"]}

    assert listed(a) == {"node-a": "up", "node-b": "up"}
    assert listed(b) == {"node-a": "up", "node-b": "up"}
    assert requests.get(b.url + "/readyz", timeout=10).json()["node"] == "node-b"
    b.router.stop()  # its web server stays up until the fixture's teardown
    assert listed(a) == {"node-a": "up", "node-b": "stopped"}


def test_delivery_attempts_name_the_node(tmp_path: Path, database_url: str,
                                         start_router: Any) -> None:
    out = tmp_path / "node-x" / "out"
    out.mkdir(parents=True)
    settings = _node_settings(
        tmp_path, database_url, "node-x",
        destinations=({"name": "folder", "type": "file", "path": str(out)},),
        rules=({"name": "all", "calling_aet": "*", "destinations": ["folder"]},))
    router = start_router(settings)
    files = write_instances(tmp_path / "ct", "CT", 1)
    assert storescu(router.dicom.port, files, "CT_SCANNER").returncode == 0
    jobs = router.view_db("jobs")
    wait_for(lambda: jobs.query("SELECT 1 FROM deliveries WHERE status = 'delivered'"), 30,
             "the delivery")
    assert jobs.query("SELECT last_node FROM deliveries") == [{"last_node": "node-x"}]
    assert jobs.query("SELECT node FROM jobs") == [{"node": "node-x"}]


def test_registry_shows_up_missing_and_stopped(tmp_path: Path) -> None:
    now = [1000.0]
    db = SqliteViews(tmp_path / "views.sqlite")
    a = NodeRegistry(db, "a", dicom_port=104, http_port=8080, interval=5, clock=lambda: now[0])
    a.ensure_table()
    b = NodeRegistry(db, "b", dicom_port=11112, http_port=8081, interval=5,
                     clock=lambda: now[0])
    a.start()
    b.start()
    try:
        states = {n["node_id"]: n["state"] for n in a.nodes()}
        assert states == {"a": "up", "b": "up"}
        now[0] += 16  # b missed three heartbeats (its thread beats every 5 s of real time)
        a.beat()
        states = {n["node_id"]: n["state"] for n in a.nodes()}
        assert states == {"a": "up", "b": "missing"}
        b.stop()
        assert {n["node_id"]: n["state"] for n in a.nodes()}["b"] == "stopped"
        # b starts again: up, with its new ports
        b2 = NodeRegistry(db, "b", dicom_port=11113, http_port=8081, interval=5,
                          clock=lambda: now[0])
        b2.start()
        row = next(n for n in a.nodes() if n["node_id"] == "b")
        assert (row["state"], row["dicom_port"]) == ("up", 11113)
        b2.stop()
    finally:
        a.stop()
        db.close()


def test_node_id_must_be_a_plain_name(tmp_path: Path) -> None:
    from router.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match="node_id"):
        load_settings({"DICOM_ROUTER_NODE_ID": "../etc"}, None, tmp_path)
    assert load_settings({"DICOM_ROUTER_NODE_ID": "site-2.node_1"}, None,
                         tmp_path).node_id == "site-2.node_1"
    assert load_settings({}, None, tmp_path).node_id  # the host's name by default
    assert replace(load_settings({}, None, tmp_path), node_id="x").node_id == "x"


@pytest.mark.postgres
def test_nodes_starting_together_on_a_new_database_make_one_first_admin(
        pg_url: str, tmp_path: Path) -> None:
    """Each start makes the user 'admin' when there is no user: two nodes doing it at once
    must not fail (one makes it, the other finds it made)."""
    from router.application.admin_state import AdminState
    from router.application.stores import open_stores
    from router.application.users import Users
    from router.secrets import SecretBox

    settings = _node_settings(tmp_path, pg_url, "node-a")
    box = SecretBox(bytes(32))
    stores = [open_stores(settings, box, role="tool") for _ in range(2)]
    users = [Users(s, AdminState(s.admin), settings.web) for s in stores]
    results = _at_once(lambda u: u.ensure_first_admin("a-long-enough-password-1"), users,
                       timeout=60)
    try:
        assert results == [None, None], results
        assert list(AdminState(stores[0].admin).refresh().users) == ["admin"]
    finally:
        for s in stores:
            s.close()


@pytest.mark.postgres
def test_nodes_started_together_with_the_same_configuration_file_all_come_up(
        pg_url: str, tmp_path: Path, start_router: Any) -> None:
    """Each start applies the file's destinations and rules and makes the first admin: three
    nodes doing it at once on an empty database must all come up, with one of each."""
    out = tmp_path / "out"
    out.mkdir()
    config = {"destinations": ({"name": "archive", "type": "file", "path": str(out)},),
              "rules": ({"name": "all", "calling_aet": "*", "destinations": ["archive"]},)}
    names = ["node-0", "node-1", "node-2"]
    settings = []
    for node in names:
        one = _node_settings(tmp_path, pg_url, node, **config)
        settings.append(replace(one, storage=replace(
            one.storage, destination_roots=(*one.storage.destination_roots, out))))
    results = _at_once(start_router, settings)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors
    started = dict(zip(names, results, strict=True))
    assert sorted(started) == ["node-0", "node-1", "node-2"]
    snapshot = started["node-0"].admin.refresh()
    assert list(snapshot.live_destinations()) == ["archive"]
    assert [r.spec.name for r in snapshot.rules] == ["all"]
    assert list(snapshot.users) == ["admin"]
