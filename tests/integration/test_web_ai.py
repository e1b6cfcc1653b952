"""The AI screens with a real round trip (AI stub, storescu, SQLite): the AI processors page
with its test ping, the job and study pages showing the round trip and its result tags, the
dashboard's turnaround, the round-trip list and requeue in the API.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
import requests

from tests.conftest import ADMIN_PASSWORD, make_settings, wait_for
from tests.integration.ai_stub import AIStub
from tests.integration.test_ai_processors import SECRET, ai_rows, config, served
from tests.integration.test_pipeline import storescu
from tests.integration.test_study_routing import Clock
from tests.synthetic import make_ct_series
from tests.web_harness import Browser, WebServer, bearer

pytestmark = pytest.mark.dcmtk
__all__ = ["served"]


def test_ai_pages_show_the_round_trip_and_its_tags(
        tmp_path: Path, served: Callable[..., WebServer]) -> None:
    with AIStub(SECRET) as stub:
        settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'db'}",
                                 config(tmp_path, stub.url))
        clock = Clock()
        server = served(settings, clock)
        router = server.router
        files = make_ct_series(tmp_path / "ct", count=2, rows=16, cols=16)
        study = str(pydicom.dcmread(files[0]).StudyInstanceUID)
        storescu(router.dicom.port, files)
        wait_for(lambda: len(router.view_db("jobs").query(
            "SELECT 1 FROM deliveries WHERE status = 'held'")) == 2, 10, "held")
        clock.advance(61)
        request = stub.wait(1)[0]
        wait_for(lambda: [r for r in ai_rows(router) if r["status"] == "accepted"], 10, "ok")
        answer = stub.callback(request.document["callback_url"], {
            "status": "completed", "tags": {"finding": "positive", "score": 0.5}})
        assert answer.status_code == 200, answer.text
        wait_for(lambda: [r for r in ai_rows(router) if r["status"] == "completed"], 10, "done")

        browser = Browser(server.url)
        browser.login("admin", ADMIN_PASSWORD)
        page = browser.get(browser.url("/ai"))
        assert page.status_code == 200 and 'data-destination="lungai"' in page.text
        assert "finding=positive" in page.text
        ping = browser.post(browser.url("/ai/lungai/ping"))
        assert 'data-ping="ok"' in ping.text and stub.pings == 1
        job_id = router.view_db("jobs").query(
            "SELECT job_id FROM jobs WHERE study_instance_uid = ? LIMIT 1", (study,))[0]["job_id"]
        job = browser.get(browser.url(f"/jobs/{job_id}"))
        assert "AI round trips" in job.text and "finding=positive" in job.text
        study_page = browser.get(browser.url(f"/studies/{study}"))
        assert "AI round trips" in study_page.text and "score=0.5" in study_page.text
        dashboard = browser.get(browser.url("/dashboard/live"))
        assert 'id="ai-turnaround"' in dashboard.text

        api = bearer(server.url, "admin", ADMIN_PASSWORD)
        listed = requests.get(f"{server.url}/api/v1/ai/requests?destination=lungai",
                              headers=api, timeout=10).json()["items"]
        assert listed[0]["tags"] == {"finding": "positive", "score": 0.5}
        assert listed[0]["turnaround"] is not None
        refused = requests.post(
            f"{server.url}/api/v1/ai/requests/{listed[0]['request_id']}/requeue",
            headers=api, timeout=10)
        assert refused.status_code == 422  # completed: nothing to requeue
        form = browser.get(browser.url("/destinations/new?type=ai"))
        assert 'name="callback_timeout"' in form.text and 'name="secret"' in form.text


def test_rule_editor_keeps_series_and_study_keys(tmp_path: Path,
                                                  served: Callable[..., WebServer]) -> None:
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'db'}",
                             config(tmp_path, "http://127.0.0.1:9/v1"))
    server = served(settings, Clock())
    browser = Browser(server.url)
    browser.login("admin", ADMIN_PASSWORD)
    saved = browser.post(browser.url("/rules"), data={
        "name": "series to urgent", "priority": "50", "enabled": "on",
        "destinations": "urgent", "granularity": "series", "quiet_time": "90s",
        "expected_count": "12", "amendments": "whole_unit"})
    assert saved.status_code == 200, saved.text[-500:]
    spec = next(r.spec for r in server.router.admin.refresh().rules
                if r.spec.name == "series to urgent")
    assert (spec.granularity, spec.quiet_time, spec.expected_count, spec.amendments) == (
        "series", 90.0, 12, "whole_unit")
    page = browser.get(browser.url("/rules/series%20to%20urgent/edit"))
    assert '<option value="series" selected>' in page.text and 'value="90.0"' in page.text
    bad = browser.post(browser.url("/rules"), data={
        "name": "bad", "priority": "50", "destinations": "urgent", "granularity": "patient"})
    assert "granularity" in bad.text and bad.status_code in (400, 422)
