"""Storage retention with real receipts: storescu sends to the router, which delivers to a folder
(delivered) and to a DICOM node that is down (retrying). Purges are run with a moved clock
(no sleeping): through the storage page as a user and by the periodic thread as ``system``.
Only fully delivered, old jobs lose their objects; undelivered, unrouted and still-needed
shared objects stay; each purge is an event and shows on the page. SQLite and PostgreSQL, with
the local blob store and with the S3 one (moto over HTTP: purged objects leave the bucket).
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import boto3
import pytest
import requests
from pydicom.data import get_testdata_file

from projections.audit_chain import verify
from projections.runner import drop_view, ensure_schema, process_batch
from router.application.retention import DAY
from router.application.stores import open_stores
from router.service import open_all_views
from tests.conftest import ADMIN_PASSWORD, make_settings, wait_for
from tests.integration.peers import free_port, s3_server
from tests.synthetic import make_ct_series
from tests.web_harness import Browser, bearer

STORESCU_ENV = {**os.environ, "TCP_NODELAY": "1"}


def send(port: int, calling_aet: str, *files: Path) -> None:
    result = subprocess.run(
        ["storescu", "-aet", calling_aet, "-aec", "DICOMROUTER", "127.0.0.1", str(port),
         *map(str, files)], env=STORESCU_ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def jobs(router: Any) -> list[dict[str, Any]]:
    return router.view_db("jobs").query(
        "SELECT j.job_id, j.calling_aet, j.sop_instance_uid, j.sha256, j.routing,"
        " p.actor AS purged_by FROM jobs j LEFT JOIN blob_purges p ON p.job_id = j.job_id"
        " ORDER BY j.received_at")


def deliveries(router: Any) -> dict[tuple[str, str], int]:
    rows = router.view_db("jobs").query("SELECT destination, status, COUNT(*) AS n"
                                         " FROM deliveries GROUP BY destination, status")
    return {(r["destination"], r["status"]): int(r["n"]) for r in rows}


def purge_runs(server: Any, headers: dict[str, str]) -> list[dict[str, Any]]:
    r = requests.get(server.url + "/api/v1/storage", headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    return list(r.json()["purges"]["items"])


@pytest.fixture(params=["local", "s3"])
def blob_store(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """The [storage] keys of each blob store: the local folder, or a fresh bucket on moto."""
    if request.param == "local":
        yield {}
        return
    with s3_server() as endpoint:
        bucket = f"retention-{uuid.uuid4().hex[:10]}"
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                     aws_access_key_id="test", aws_secret_access_key="test"
                     ).create_bucket(Bucket=bucket)
        yield {"backend": "s3", "bucket": bucket, "endpoint_url": endpoint,
               "access_key_id": "test", "secret_access_key": "test"}


def start(web_router: Any, tmp_path: Path, database_url: str,
          blob_store: dict[str, str] | None = None) -> Any:
    (tmp_path / "archive").mkdir()
    settings = make_settings(tmp_path, database_url)
    settings = replace(settings, storage=replace(settings.storage, **(blob_store or {})))
    settings = replace(settings, destinations=(
        {"name": "archive", "type": "file", "path": str(tmp_path / "archive")},
        {"name": "down", "type": "dicom", "host": "127.0.0.1", "port": free_port(),
         "ae_title": "NOBODY"},
    ), rules=(
        {"name": "good", "calling_aet": "GOOD", "destinations": ["archive"]},
        {"name": "bad", "calling_aet": "BAD", "destinations": ["down"]},
    ))
    return web_router(settings)


def send_scenario(router: Any, tmp_path: Path) -> tuple[float, dict[str, str], list[Path]]:
    """Five objects: three delivered (f1-f3), one to the dead node (f4) plus its duplicate,
    one unrouted (f5); then, after the returned cutoff, a young duplicate of f3. Returns the
    cutoff, each object's sha256 and the files."""
    real = [Path(get_testdata_file(n, download=False)) for n in ("CT_small.dcm",
                                                                  "MR_small.dcm")]
    files = [*real, *make_ct_series(tmp_path / "ct", count=3, rows=16, cols=16)]
    f1, f2, f3, f4, f5 = files
    port = router.dicom.port
    send(port, "GOOD", f1, f2, f3)
    send(port, "BAD", f4)  # its destination is down: retrying
    send(port, "NOBODY", f5)  # no rule: unrouted
    send(port, "GOOD", f4)  # same bytes as the undelivered job: a duplicate sharing its blob
    wait_for(lambda: deliveries(router) == {("archive", "delivered"): 3,
                                            ("down", "retrying"): 1},
             60, "three deliveries to the folder and a failed attempt to the dead node")
    middle = time.time()  # the cutoff: everything above is older
    send(port, "GOOD", f3)  # a young duplicate: f3's blob is still needed for it
    wait_for(lambda: len(jobs(router)) == 7, 30, "seven jobs in the view")
    uids = {read_uid(f): name for name, f in zip(("f1", "f2", "f3", "f4", "f5"), files,
                                                 strict=True)}
    sha = {uids[j["sop_instance_uid"]]: j["sha256"] for j in jobs(router)}
    return middle, sha, files


def test_retention_purges_only_delivered_old_jobs_and_keeps_needed_shared_blobs(
    web_router: Any, tmp_path: Path, database_url: str, dcmtk: None, blob_store: dict[str, str],
) -> None:
    server = start(web_router, tmp_path, database_url, blob_store)
    router = server.router
    middle, sha, files = send_scenario(router, tmp_path)
    trail = audit_rows(router)
    admin = bearer(server.url, "admin", ADMIN_PASSWORD)
    off = requests.post(server.url + "/api/v1/storage/purge", headers=admin, timeout=30)
    assert off.status_code == 409 and "retention is off" in off.json()["error"]["message"]
    r = requests.put(server.url + "/api/v1/settings/storage.retention_days", headers=admin,
                     json={"value": 1}, timeout=30)
    assert r.status_code == 200

    router.retention.clock = lambda: middle + DAY  # cutoff = middle
    browser = Browser(server.url)
    browser.login("admin", ADMIN_PASSWORD)
    page = browser.post(browser.url("/storage/purge"))
    assert "Purged 2 job(s): 2 stored object(s) deleted" in page.text, page.text[-3000:]
    assert not stored(router, sha["f1"]) and not stored(router, sha["f2"])
    assert all(stored(router, sha[n]) for n in ("f3", "f4", "f5"))
    purged = {j["sop_instance_uid"]: j["purged_by"] for j in jobs(router) if j["purged_by"]}
    assert purged == {read_uid(files[0]): "admin", read_uid(files[1]): "admin"}
    runs = purge_runs(server, admin)
    assert [(r["actor"], r["jobs"], r["objects"]) for r in runs] == [("admin", 2, 2)]
    assert "<td>admin</td>" in browser.get(browser.url("/storage")).text
    assert len([p for p in (tmp_path / "archive").rglob("*") if p.is_file()]) == 3

    check_periodic_purge(server, admin, middle + 10 * DAY, sha)
    assert_purge_events(router, {"admin": 2, "system": 2})
    # Image retention is not audit retention: every audit row is still there, unchanged,
    # and the chain is intact (docs/security.md, "How long the audit trail is kept").
    after = audit_rows(router)
    assert trail.items() <= after.items() and len(after) > len(trail)
    assert verify(router.view_db("audit")).broken is None
    assert_rebuild_is_identical(router)


def check_periodic_purge(server: Any, admin: dict[str, str], now: float,
                         sha: dict[str, str]) -> None:
    """The hourly thread, later: the young duplicate is old now; the rest is still needed."""
    router = server.router
    router.retention.stop()
    router.retention.clock = lambda: now
    router.retention.first_delay = 0.0
    router.retention.start()
    wait_for(lambda: len(purge_runs(server, admin)) == 2, 30, "the periodic purge")
    latest = purge_runs(server, admin)[0]
    assert (latest["actor"], latest["jobs"], latest["objects"]) == ("system", 2, 1)
    assert not stored(router, sha["f3"])
    assert stored(router, sha["f4"]) and stored(router, sha["f5"])
    kept = [j for j in jobs(router) if not j["purged_by"]]
    assert sorted((j["calling_aet"], j["routing"]) for j in kept) == [
        ("BAD", "routed"), ("GOOD", "duplicate"), ("NOBODY", "unrouted")]


def audit_rows(router: Any) -> dict[tuple[str, int], tuple[Any, ...]]:
    router.runner.catch_up()
    rows = router.view_db("audit").query("SELECT * FROM audit")
    return {(r["application"], r["position"]): tuple(r.values()) for r in rows}


def stored(router: Any, sha256: str) -> bool:
    """Whether the store holds the object: in the bucket itself for the S3 store."""
    if router.blobs.remote:
        return bool(router.blobs.stored_size(sha256) is not None)
    return bool(router.blobs.exists(sha256))


def read_uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def assert_purge_events(router: Any, expected: dict[str, int]) -> None:
    app = router.stores.ingest
    events = [app.mapper.to_domain_event(n) for n in app.recorder.select_notifications(0, 1000)
              if n.topic.endswith("Job.BlobPurged")]
    counts: dict[str, int] = {}
    for e in events:
        counts[e.actor] = counts.get(e.actor, 0) + 1
        assert e.reason.startswith("retention: fully delivered")
    assert counts == expected


def assert_rebuild_is_identical(router: Any) -> None:
    """The purges in the jobs view come back the same from the log alone."""
    def rows(db: Any) -> list[dict[str, Any]]:
        return db.query("SELECT job_id, purge_id, purged_at, actor, sha256, size"
                        " FROM blob_purges ORDER BY job_id")

    before = rows(router.view_db("jobs"))
    settings = router.settings
    router.stop()
    stores = open_stores(settings, router.box)
    views = open_all_views(settings)
    try:
        view, db = views["jobs"].view, views["jobs"].db
        drop_view(view, db)
        ensure_schema(view, db)
        while process_batch(view, db, stores.all()):
            pass
        assert rows(db) == before and len(before) == 4
    finally:
        for handle in views.values():
            handle.db.close()
        stores.close()


def test_purge_now_needs_the_storage_permission_and_reports_usage(
    web_router: Any, tmp_path: Path,
) -> None:
    server = web_router()
    admin = bearer(server.url, "admin", ADMIN_PASSWORD)
    r = requests.get(server.url + "/api/v1/storage", headers=admin, timeout=30)
    body = r.json()
    assert body["blob_store"]["objects"] == 0 and body["blob_store"]["free_bytes"] > 0
    assert body["retention"]["days"] == 0 and body["purges"]["items"] == []
    browser = Browser(server.url)
    browser.login("admin", ADMIN_PASSWORD)
    page = browser.get(browser.url("/storage"))
    assert "Retention is off" in page.text and "No purge has been recorded yet." in page.text
    r = browser.post(browser.url("/storage/purge"))
    assert r.status_code == 409 and "retention is off" in r.text
    fragment = browser.get(browser.url("/storage/usage"))
    assert fragment.status_code == 200 and 'id="storage-usage"' in fragment.text


def test_which_jobs_may_lose_their_blob(tmp_path: Path, database_url: str) -> None:
    """The purge query against a real jobs view, one job per delivery state."""
    from projections.db import open_views
    from projections.jobs import JobsView
    from projections.jobs_queries import CANDIDATES_SQL

    now, old, young = 1_000_000.0, 1_000.0, 999_999.0
    jobs_spec = {  # job: (received, routing, sha, delivery statuses)
        "A": (old, "routed", "a", ["delivered", "delivered"]),
        "B": (old, "routed", "b", ["delivered", "dead"]),
        "C": (old, "routed", "c", ["pending"]),
        "D": (old, "routed", "d", ["delivered", "cancelled"]),
        "E": (old, "routed", "e", ["retrying"]),
        "F": (old, "unrouted", "f", []),
        "G": (old, "conflict", "g", []),
        "H": (old, "duplicate", "c", []),  # shares C's object, which C still needs
        "I": (young, "routed", "i", ["delivered"]),
        "J": (old, "routed", "i", ["delivered"]),  # shares the young I's object
        "K": (old, "routed", "k", []),  # deliveries not in the view yet
        "L": (old, "duplicate", "a", []),  # shares A's object: both may go
        "M": (old, "routed", "m", ["delivered"]),  # already purged
    }
    view, db = JobsView(), open_views(database_url, "jobs")
    try:
        ensure_schema(view, db)
        with db.transaction() as cur:
            for job, (received, routing, sha, statuses) in jobs_spec.items():
                cur.execute(
                    "INSERT INTO jobs (job_id, received_at, source, actor, source_ip,"
                    " calling_aet, called_aet, sop_class_uid, sop_instance_uid, sha256, size,"
                    " transfer_syntax_uid, routing) VALUES (?, ?, 'dimse', 'A', '', 'A', 'B',"
                    " '1.2', ?, ?, 10, '1.2.840.10008.1.2.1', ?)",
                    (job, received, job, sha * 64, routing))
                for n, status in enumerate(statuses):
                    cur.execute("INSERT INTO deliveries (delivery_id, job_id, destination,"
                                " status) VALUES (?, ?, ?, ?)", (f"{job}{n}", job, f"d{n}",
                                                                   status))
            cur.execute("INSERT INTO blob_purges (job_id, purge_id, purged_at, actor, sha256,"
                        " size) VALUES ('M', 'p', 1.0, 'system', ?, 10)", ("m" * 64,))
        cutoff = now - 1000.0
        rows = db.query(CANDIDATES_SQL, (cutoff, cutoff, 100))
        assert sorted(r["job_id"] for r in rows) == ["A", "L"]
    finally:
        db.close()
