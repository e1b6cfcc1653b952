"""AI processors end to end with an AI stub on 127.0.0.1: storescu sends two studies, each is
released to the processor when quiet (injected clock), the "AI" reads its study back over
DICOMweb with the scoped token (and is refused the other study), and calls back with tags and
an SR; a rule on ai.lungai.finding sends the study on to an urgent folder and the SR reaches
its own destination. Forged, stale, replayed, unknown and oversized callbacks change nothing.
Runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient

from router.service import Router
from router.settings import AISettings
from tests.conftest import make_settings, outdated_on_next_read, wait_for
from tests.integration.ai_stub import AIStub, make_sr, sign
from tests.integration.test_pipeline import storescu
from tests.integration.test_study_routing import Clock
from tests.synthetic import make_ct_series
from tests.web_harness import WebServer

pytestmark = pytest.mark.dcmtk
SECRET = "a shared secret of the AI vendor"


def config(tmp_path: Path, url: str, extra: str = "", timeout: str = "1h") -> Path:
    for name in ("urgent", "results"):
        (tmp_path / name).mkdir(exist_ok=True)
    path = tmp_path / "router.toml"
    path.write_text(f"""
[[destinations]]
name = "lungai"
type = "ai"
url = "{url}"
secret = "{SECRET}"
callback_timeout = "{timeout}"
quiet_time = "60s"
{extra}

[[destinations]]
name = "urgent"
type = "file"
path = "{tmp_path / 'urgent'}"
template = "{{StudyInstanceUID}}/{{SOPInstanceUID}}.dcm"

[[destinations]]
name = "results"
type = "file"
path = "{tmp_path / 'results'}"
template = "{{StudyInstanceUID}}/{{SOPInstanceUID}}.dcm"

[[rules]]
name = "CT to the AI"
modality = ["CT"]
destinations = ["lungai"]

[[rules]]
name = "positive findings are urgent"
match = [{{ tag = "ai.lungai.finding", op = "eq", value = "positive" }}]
destinations = ["urgent"]

[[rules]]
name = "AI reports"
modality = ["SR"]
destinations = ["results"]
""")
    return path


@pytest.fixture
def served(tmp_path: Path, dcmtk: None) -> Iterator[Callable[..., WebServer]]:
    running: list[tuple[Router, WebServer]] = []

    def start(settings: Any, clock: Clock) -> WebServer:
        router = Router.build(settings, clock=clock)
        router.start()
        server = WebServer(router)
        server.start()
        router.ai_requests.public_url = server.url
        running.append((router, server))
        return server

    yield start
    for router, server in running:
        server.stop()
        if router.ready:
            router.stop()


def ai_rows(router: Router) -> list[dict[str, Any]]:
    return router.view_db("jobs").query("SELECT * FROM ai_requests ORDER BY created_at")


def callbacks_denied(router: Router) -> list[dict[str, Any]]:
    router.runner.catch_up()
    return router.view_db("audit").query(
        "SELECT * FROM audit WHERE action = 'ai.callback' AND outcome = 'denied'")


def two_studies(tmp_path: Path, port: int) -> tuple[list[Path], list[Path]]:
    a = make_ct_series(tmp_path / "a", count=3, rows=16, cols=16, patient_id="PA")
    b = make_ct_series(tmp_path / "b", count=1, rows=16, cols=16, patient_id="PB")
    storescu(port, a + b)
    return a, b


def test_study_round_trip_over_dicomweb_routes_the_study_on(
        tmp_path: Path, database_url: str, served: Callable[..., WebServer]) -> None:
    with AIStub(SECRET) as stub:
        settings = make_settings(tmp_path, database_url, config(tmp_path, stub.url),
                                 ai=AISettings(max_callback_bytes=256 * 1024))
        clock = Clock()
        server = served(settings, clock)
        router = server.router
        a, b = two_studies(tmp_path, router.dicom.port)
        study_a = str(pydicom.dcmread(a[0]).StudyInstanceUID)
        study_b = str(pydicom.dcmread(b[0]).StudyInstanceUID)
        wait_for(lambda: len(router.view_db("jobs").query(
            "SELECT 1 FROM deliveries WHERE status = 'held'")) == 4, 10, "held for the AI")
        time.sleep(0.5)
        assert stub.requests == []  # the studies are not quiet yet
        clock.advance(61)
        received = {r.document["study_instance_uid"]: r for r in stub.wait(2)}
        request = received[study_a]
        assert request.signature_ok and request.document["series_instance_uids"]
        assert len(request.document["sop_instance_uids"]) == 3
        web = request.document["dicomweb"]
        wait_for(lambda: [r for r in ai_rows(router) if r["status"] == "accepted"], 10,
                 "accepted")

        client = DICOMwebClient(web["base_url"], headers={
            "Authorization": f"Bearer {web['token']}"})
        instances = client.retrieve_study(study_a)
        assert sorted(str(i.SOPInstanceUID) for i in instances) == sorted(
            str(pydicom.dcmread(p).SOPInstanceUID) for p in a)
        assert len(client.search_for_series(study_a)) == 1
        for url in (f"{web['base_url']}/studies/{study_b}", f"{web['base_url']}/studies"):
            refused = requests.get(url, headers={"Authorization": f"Bearer {web['token']}",
                                                 "Accept": "application/dicom+json"}, timeout=10)
            assert refused.status_code == 403, url

        sr = make_sr(instances[0])
        answer = stub.callback(request.document["callback_url"],
                               {"status": "completed", "tags": {"finding": "positive",
                                                                "score": 0.93}}, [sr])
        assert answer.status_code == 200, answer.text
        assert answer.json()["result_objects"] == 1
        urgent = tmp_path / "urgent" / study_a
        wait_for(lambda: len(list(urgent.glob("*.dcm"))) == 4, 20, "study + SR urgent")
        wait_for(lambda: (tmp_path / "results" / study_a / f"{sr.SOPInstanceUID}.dcm")
                 .is_file(), 20, "the SR at its destination")
        assert not (tmp_path / "urgent" / study_b).exists()
        row = wait_for(lambda: [r for r in ai_rows(router) if r["status"] == "completed"], 10,
                       "completed")[0]
        assert json.loads(row["tags"]) == {"finding": "positive", "score": 0.93}
        deliveries = router.view_db("jobs").query(
            "SELECT status, detail FROM deliveries WHERE destination = 'lungai'"
            " AND status = 'delivered'")
        assert len(deliveries) == 3 and "finding=positive" in deliveries[0]["detail"]
        # The token died with its request.
        gone = requests.get(f"{web['base_url']}/studies/{study_a}/series", timeout=10,
                            headers={"Authorization": f"Bearer {web['token']}"})
        assert gone.status_code == 401
        check_refused_callbacks(stub, router, request.document["callback_url"],
                                received[study_b].document["callback_url"])


def check_refused_callbacks(stub: AIStub, router: Router, done_url: str,
                            open_url: str) -> None:
    """Replay, forged signature, stale timestamp, unknown id, oversized: nothing changes."""
    before = ai_rows(router)
    jobs_before = len(router.view_db("jobs").query("SELECT job_id FROM jobs"))
    result = {"status": "completed", "tags": {"finding": "positive"}}
    body = json.dumps(result).encode()
    now = int(time.time())
    replay = stub.callback(done_url, result, body=body, timestamp=now,
                           signature=sign(SECRET, now, body))
    assert replay.status_code == 409
    assert stub.callback(open_url, result, secret="not the secret at all").status_code == 401
    assert stub.callback(open_url, result, timestamp=now - 600).status_code == 401
    assert stub.callback(open_url.rsplit("/", 1)[0] + "/00000000-0000-4000-8000-00000000000a",
                         result).status_code == 404
    big = {"status": "completed", "tags": {"x": "y" * 1000}, "pad": "z" * 300_000}
    assert stub.callback(open_url, big, body=json.dumps(big).encode()).status_code == 413
    denied = callbacks_denied(router)
    answered = sorted(json.loads(r["detail"])["detail"].split(":")[0] for r in denied)
    assert answered == ["401", "401", "404", "409", "413"]
    time.sleep(0.3)
    router.runner.catch_up()
    assert ai_rows(router) == before
    assert len(router.view_db("jobs").query("SELECT job_id FROM jobs")) == jobs_before


def test_no_callback_retries_then_dead_letters_with_the_reason(
        tmp_path: Path, database_url: str, served: Callable[..., WebServer]) -> None:
    with AIStub(SECRET) as stub:
        settings = make_settings(tmp_path, database_url,
                                 config(tmp_path, stub.url, timeout="1m"))
        settings = replace(settings, dispatch=replace(settings.dispatch, max_age=200.0))
        clock = Clock()
        router = served(settings, clock).router
        files = make_ct_series(tmp_path / "a", count=2, rows=16, cols=16)
        storescu(router.dicom.port, files)
        wait_for(lambda: len(router.view_db("jobs").query(
            "SELECT 1 FROM deliveries WHERE status = 'held'")) == 2, 10, "held")
        clock.advance(61)
        stub.wait(1)
        wait_for(lambda: [r for r in ai_rows(router) if r["status"] == "accepted"], 10, "ok")
        clock.advance(61)  # past the callback deadline: timed out, retried in 30 s
        wait_for(lambda: [r for r in ai_rows(router) if r["status"] == "retrying"], 10, "retry")
        clock.advance(31)
        stub.wait(2)
        wait_for(lambda: [r for r in ai_rows(router) if r["attempts"] == 2
                          and r["status"] == "accepted"], 10, "second attempt accepted")
        clock.advance(61)  # no callback again, and the maximum age is reached
        row = wait_for(lambda: [r for r in ai_rows(router) if r["status"] == "dead"], 10,
                       "dead-lettered")[0]
        assert "no callback within 1 min" in row["last_error"]
        jobs = router.view_db("jobs").query(
            "SELECT status, last_error FROM deliveries WHERE destination = 'lungai'")
        assert [j["status"] for j in jobs] == ["dead", "dead"]
        assert all("gave up after 2 attempts" in j["last_error"] for j in jobs)
        # Both attempts (Requested, then Resent) name the node that sent them.
        log = router.stores.delivery
        sent = [log.mapper.to_domain_event(n) for n in log.recorder.select_notifications(0, 500)
                if n.topic.endswith(("AIRequest.Requested", "AIRequest.Resent"))]
        assert [e.node for e in sent] == [settings.node_id] * 2


def test_deidentified_files_and_reidentified_results(
        tmp_path: Path, database_url: str, served: Callable[..., WebServer]) -> None:
    with AIStub(SECRET) as stub:
        extra = 'send = "files"\ndeidentify = true'
        settings = make_settings(tmp_path, database_url, config(tmp_path, stub.url, extra))
        clock = Clock()
        router = served(settings, clock).router
        files = make_ct_series(tmp_path / "a", count=2, rows=16, cols=16, patient_id="REAL1")
        original = pydicom.dcmread(files[0])
        storescu(router.dicom.port, files)
        wait_for(lambda: len(router.view_db("jobs").query(
            "SELECT 1 FROM deliveries WHERE status = 'held'")) == 2, 10, "held")
        clock.advance(61)
        request = stub.wait(1)[0]
        assert request.signature_ok and "dicomweb" not in request.document
        assert len(request.files) == 2
        seen = request.files[0]
        assert seen.PatientID != "REAL1" and str(seen.PatientName) != str(original.PatientName)
        assert seen.StudyInstanceUID != original.StudyInstanceUID
        assert request.document["study_instance_uid"] == seen.StudyInstanceUID
        assert set(request.document["sop_instance_uids"]) == {
            str(f.SOPInstanceUID) for f in request.files}
        sr = make_sr(seen, "nothing found")
        answer = stub.callback(request.document["callback_url"],
                               {"status": "completed", "tags": {"finding": "negative"}}, [sr])
        assert answer.status_code == 200, answer.text
        stored = tmp_path / "results" / original.StudyInstanceUID
        found = wait_for(lambda: list(stored.glob("*.dcm")), 20, "the re-identified SR")
        back = pydicom.dcmread(found[0])
        assert (back.PatientID, str(back.PatientName)) == ("REAL1", str(original.PatientName))
        assert not (tmp_path / "urgent").exists() or not any((tmp_path / "urgent").iterdir())
        row = ai_rows(router)[0]
        assert row["deidentified"] == 1 and row["status"] == "completed"


def test_results_stored_by_stow_with_the_token_and_an_identical_rebuild(
        tmp_path: Path, database_url: str, served: Callable[..., WebServer]) -> None:
    with AIStub(SECRET) as stub:
        settings = make_settings(tmp_path, database_url, config(tmp_path, stub.url))
        clock = Clock()
        server = served(settings, clock)
        router = server.router
        files = make_ct_series(tmp_path / "a", count=2, rows=16, cols=16)
        study = str(pydicom.dcmread(files[0]).StudyInstanceUID)
        storescu(router.dicom.port, files)
        wait_for(lambda: len(router.view_db("jobs").query(
            "SELECT 1 FROM deliveries WHERE status = 'held'")) == 2, 10, "held")
        clock.advance(61)
        request = stub.wait(1)[0]
        wait_for(lambda: [r for r in ai_rows(router) if r["status"] == "accepted"], 10, "ok")
        web = request.document["dicomweb"]
        client = DICOMwebClient(web["base_url"], headers={
            "Authorization": f"Bearer {web['token']}"})
        sr = make_sr(pydicom.dcmread(files[0]))
        client.store_instances([sr], study_instance_uid=study)
        answer = stub.callback(request.document["callback_url"],
                               {"status": "completed", "tags": {"finding": "negative"}})
        assert answer.status_code == 200
        wait_for(lambda: (tmp_path / "results" / study / f"{sr.SOPInstanceUID}.dcm").is_file(),
                 20, "the SR stored by STOW-RS at its destination")
        actor = router.view_db("jobs").query(
            "SELECT actor, source FROM jobs WHERE sop_instance_uid = ?", (sr.SOPInstanceUID,))
        assert actor == [{"actor": "ai:lungai", "source": "stow"}]
        wait_for(lambda: [r for r in ai_rows(router) if r["status"] == "completed"], 10, "done")
        assert_identical_rebuild(router)


def assert_identical_rebuild(router: Router) -> None:
    """The jobs view rebuilt from the logs has the same deliveries, units and AI rows."""
    from projections.runner import drop_view, ensure_schema, process_batch
    from router.application.stores import open_stores
    from router.service import open_all_views

    queries = ("SELECT * FROM deliveries ORDER BY delivery_id",
               "SELECT * FROM units ORDER BY unit_id",
               "SELECT * FROM unit_members ORDER BY unit_id, job_id",
               "SELECT * FROM ai_requests ORDER BY request_id",
               "SELECT * FROM ai_request_jobs ORDER BY request_id, job_id")
    time.sleep(0.5)
    router.runner.catch_up()
    before = [router.view_db("jobs").query(q) for q in queries]
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
        assert [db.query(q) for q in queries] == before
    finally:
        for handle in views.values():
            handle.db.close()
        stores.close()


def test_a_metadata_address_is_refused_and_dead_lettered(
        tmp_path: Path, database_url: str, served: Callable[..., WebServer],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Saved while its name answered a private address; by the time of the request the name
    answers the metadata address (DNS rebinding): refused at connect time, dead-lettered."""
    answers = {"ai.rebinding.test": "10.20.30.40"}
    real = socket.getaddrinfo

    def resolve(host: str, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host in answers:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answers[host], port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    settings = make_settings(tmp_path, database_url,
                             config(tmp_path, "http://ai.rebinding.test/latest/v1"))
    clock = Clock()
    router = served(settings, clock).router
    answers["ai.rebinding.test"] = "169.254.169.254"
    storescu(router.dicom.port, make_ct_series(tmp_path / "a", count=1, rows=16, cols=16))
    wait_for(lambda: router.view_db("jobs").query(
        "SELECT 1 FROM deliveries WHERE status = 'held'"), 10, "held")
    clock.advance(61)
    row = wait_for(lambda: [r for r in ai_rows(router) if r["status"] == "dead"], 10, "dead")[0]
    assert "refusing to connect: 169.254.169.254 is a link-local" in row["last_error"]
    job = router.view_db("jobs").query(
        "SELECT status, last_error FROM deliveries WHERE destination = 'lungai'")
    assert job[0]["status"] == "dead" and "link-local" in job[0]["last_error"]


def _race_on_load(router: Router, concurrent: Callable[[Any], None]) -> None:
    """The callback's load of the request hands out a copy that the worker (or a second
    callback) then outdates."""
    outdated_on_next_read(router.ai_requests, "load", concurrent, router.ai_requests.save)


def _accepted_request(tmp_path: Path, database_url: str,
                      served: Callable[..., WebServer], stub: AIStub) -> tuple[Router, str]:
    clock = Clock()
    router = served(make_settings(tmp_path, database_url, config(tmp_path, stub.url)),
                    clock).router
    storescu(router.dicom.port, make_ct_series(tmp_path / "a", count=1, rows=16, cols=16))
    wait_for(lambda: router.view_db("jobs").query(
        "SELECT 1 FROM deliveries WHERE status = 'held'"), 10, "held")
    clock.advance(61)
    url = stub.wait(1)[0].document["callback_url"]
    wait_for(lambda: [r for r in ai_rows(router) if r["status"] == "accepted"], 10, "accepted")
    return router, url


def test_a_callback_that_overtakes_the_recorded_answer_is_taken(
        tmp_path: Path, database_url: str, served: Callable[..., WebServer]) -> None:
    """A processor may call back before the router has recorded its answer to the POST: the
    worker's Accepted lands between the callback's load and save. The result is recorded
    on the request as stored now (this was a 409 "changed meanwhile" that lost the result)."""
    with AIStub(SECRET) as stub:
        router, url = _accepted_request(tmp_path, database_url, served, stub)
        rid = url.rsplit("/", 1)[1]
        _race_on_load(router, lambda other: other.accept(
            actor="system", source_ip="", correlation_id=rid, attempt=other.attempts,
            http_status=200, deadline=time.time() + 3600, duration_ms=1))
        answer = stub.callback(url, {"status": "completed", "tags": {"finding": "negative"}})
        assert answer.status_code == 200, answer.text
        stored = router.ai_requests.load(rid)
        assert stored is not None and stored.status == "completed"
        row = wait_for(lambda: [r for r in ai_rows(router) if r["status"] == "completed"], 10,
                       "completed")[0]
        assert json.loads(row["tags"]) == {"finding": "negative"}


def test_a_result_that_loses_to_a_concurrent_result_is_refused(
        tmp_path: Path, database_url: str, served: Callable[..., WebServer]) -> None:
    with AIStub(SECRET) as stub:
        router, url = _accepted_request(tmp_path, database_url, served, stub)
        rid = url.rsplit("/", 1)[1]
        _race_on_load(router, lambda other: other.receive_result(
            actor="ai:lungai", source_ip="127.0.0.1", correlation_id=rid, status="failed",
            tags={}, result_job_ids=[], signature="the other callback", detail="first"))
        answer = stub.callback(url, {"status": "completed", "tags": {"finding": "positive"}})
        assert answer.status_code == 409, answer.text
        assert "concurrent callback" in answer.json()["error"]["message"]
        stored = router.ai_requests.load(rid)
        assert stored is not None and stored.status == "failed"
        assert stored.signatures == ["the other callback"]
