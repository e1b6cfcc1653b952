"""Destinations are not a pivot, against the running router with loopback destinations NOT
allowed (the default; make_settings allows them for the other tests): refused on save through
the API, the UI form, the configuration file and for remote nodes, each with the field and the
reason; refused again at connect time when a name changes its answer (DNS rebinding); and the
test-connection buttons answer refused and unreachable addresses with the same words."""

from __future__ import annotations

import html
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
from pydicom.data import get_testdata_file

from router.application.commands import Actor
from router.dispatch.base import NOT_REACHED
from router.dispatch.registry import DestinationConfigError
from router.settings import SecuritySettings
from tests.conftest import ADMIN_PASSWORD, make_settings, wait_for
from tests.integration.peers import StoreScp, free_port
from tests.integration.test_pipeline import storescu
from tests.web_harness import Browser, bearer

API = "/api/v1/destinations"
PASSWORD = "operator pass 1234"
CT_SMALL = Path(get_testdata_file("CT_small.dcm", download=False))


@pytest.fixture
def answers(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Host names the resolver answers with the given address (changeable during a test)."""
    names: dict[str, str] = {}
    real = socket.getaddrinfo

    def resolve(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host in names:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (names[host], port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    return names


@pytest.fixture
def strict(web_router: Any, tmp_path: Path) -> Any:
    """A router with the default policy: no loopback destinations (file roots: tmp_path)."""
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'db'}",
                             security=SecuritySettings())
    server = web_router(settings)
    server.router.users.add("op", "operator", PASSWORD, Actor("admin"))
    return server


def dicom(name: str, host: str, port: int = 104, **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": "dicom", "host": host, "port": port, "ae_title": "PACS",
            "timeout": 2, **extra}


def test_refused_on_save_with_the_field_and_the_reason(strict: Any) -> None:
    operator = bearer(strict.url, "op", PASSWORD)
    data_dir = strict.router.settings.data_dir
    own_http = int(strict.url.rsplit(":", 1)[1])
    refused = [
        (dicom("lo", "127.0.0.1"), "host", "loopback address"),
        (dicom("own", "localhost", own_http), "host", "localhost resolves to 127.0.0.1"),
        (dicom("meta", "169.254.169.254", 80), "host", "link-local"),
        (dicom("decimal", "2852039166", 80), "host", "169.254.169.254 (2852039166)"),
        (dicom("hex", "0xA9FEA9FE", 80), "host", "link-local"),
        (dicom("mapped", "::ffff:169.254.169.254", 80), "host", "link-local"),
        (dicom("lo-mapped", "::ffff:127.0.0.1"), "host", "loopback"),
        ({"name": "s3", "type": "s3", "bucket": "imaging", "access_key_id": "AKIAEXAMPLE",
          "secret_access_key": "a-secret-value", "endpoint_url": "http://[::ffff:a9fe:a9fe]/"},
         "endpoint_url", "link-local"),
        ({"name": "ai", "type": "ai", "url": "http://100.100.100.200/v1",
          "secret": "a shared secret of the vendor"}, "url", "[ai] allowed_networks"),
        ({"name": "etc", "type": "file", "path": "/etc"}, "path", "outside the folders"),
        ({"name": "ssh", "type": "file", "path": "/root/.ssh"}, "path", "outside the folders"),
        ({"name": "own", "type": "file", "path": str(data_dir / "blobs")}, "path",
         "inside the router's own data folder"),
        ({"name": "all", "type": "file", "path": str(data_dir.parent)}, "path",
         "holds the router's own data folder"),
    ]
    for body, field, reason in refused:
        r = requests.post(strict.url + API, json=body, headers=operator, timeout=30)
        assert r.status_code == 422, (body, r.text)
        fields = r.json()["error"]["fields"]
        assert reason in fields[field], (body, fields)
        if "loopback" in reason:
            assert "allow_loopback_destinations" in fields[field]
    assert strict.router.admin.refresh().live_destinations() == {}
    allowed = [dicom("pacs", "10.0.0.5"), dicom("cgnat", "100.64.1.2"),
               {"name": "exports", "type": "file", "path": str(data_dir / "exports" / "site")}]
    for body in allowed:
        r = requests.post(strict.url + API, json=body, headers=operator, timeout=30)
        assert r.status_code == 201, (body, r.text)

    nodes = "/api/v1/remote-nodes"
    r = requests.post(strict.url + nodes, headers=operator, timeout=30, json={
        "name": "self", "ae_title": "SELF", "host": "127.0.0.1", "port": 11112})
    assert r.status_code == 422 and "loopback" in r.json()["error"]["fields"]["host"]
    r = requests.post(strict.url + nodes, headers=operator, timeout=30, json={
        "name": "pacs", "ae_title": "PACS", "host": "10.0.0.5", "port": 104})
    assert r.status_code == 201, r.text


def test_refused_in_the_form_and_from_the_configuration_file(strict: Any) -> None:
    browser = Browser(strict.url)
    browser.login("op", PASSWORD)
    r = browser.post(browser.url("/destinations"), data={
        "type": "dicom", "name": "meta", "host": "169.254.169.254", "port": "80",
        "ae_title": "PACS"})
    assert r.status_code == 422 and "link-local" in r.text
    assert "meta" not in strict.router.admin.refresh().live_destinations()
    with pytest.raises(DestinationConfigError, match=r"host: 127\.0\.0\.1 is a loopback address"):
        strict.router.commands.apply([dicom("pacs", "127.0.0.1")], [])
    with pytest.raises(DestinationConfigError, match="path: /etc is outside"):
        strict.router.commands.apply([{"name": "etc", "type": "file", "path": "/etc"}], [])


def _form_check(browser: Browser, body: dict[str, Any]) -> tuple[str, float]:
    started = time.monotonic()
    r = browser.post(browser.url("/destinations/check"), data=body,
                     headers={"HX-Request": "true"})
    elapsed = time.monotonic() - started
    assert r.status_code == 200, r.text
    found = re.search(r"test failed: (.*?)\s*<span", r.text, re.S)
    assert found, r.text
    return html.unescape(found.group(1).strip()), elapsed


def test_test_connection_answers_refused_and_unreachable_alike(
        strict: Any, answers: dict[str, str]) -> None:
    browser = Browser(strict.url)
    browser.login("op", PASSWORD)
    dicom_port = strict.router.dicom.port
    unsaved = {
        "loopback, the router's DICOM port": ("127.0.0.1", dicom_port),
        "metadata": ("169.254.169.254", 80),
        "metadata, decimal": ("2852039166", 80),
        "metadata, IPv4-mapped": ("::ffff:169.254.169.254", 80),
        "unknown name": ("no-such-host.invalid", 104),
        "unroutable (TEST-NET-1)": ("192.0.2.1", 104),
    }
    results = {}
    for what, (host, port) in unsaved.items():
        results[what] = _form_check(browser, {
            "type": "dicom", "name": "probe", "host": host, "port": str(port),
            "ae_title": "PACS", "timeout": "2"})
    results["s3 at metadata"] = _form_check(browser, {
        "type": "s3", "name": "probe", "bucket": "imaging", "access_key_id": "AKIAEXAMPLE",
        "secret_access_key": "a-secret-value", "endpoint_url": "http://169.254.169.254/"})
    answers["pacs.rebinding.test"] = "10.20.30.40"
    operator = bearer(strict.url, "op", PASSWORD)
    r = requests.post(strict.url + API, json=dicom("rebound", "pacs.rebinding.test"),
                      headers=operator, timeout=30)
    assert r.status_code == 201, r.text
    answers["pacs.rebinding.test"] = "127.0.0.1"  # what the name answers by test time
    started = time.monotonic()
    saved = requests.post(strict.url + API + "/rebound/test", headers=operator, timeout=60)
    results["saved, name now loopback"] = (saved.json()["error"], time.monotonic() - started)
    texts = {what: text for what, (text, _) in results.items()}
    assert set(texts.values()) == {NOT_REACHED}, texts
    assert all(seconds >= 0.95 for _, seconds in results.values()), results


def test_a_test_connection_cannot_tell_an_open_port_from_a_closed_one(web_router: Any) -> None:
    """Loopback allowed (as in the other tests): the router's own HTTP port (open, not DICOM)
    and a closed port answer alike."""
    server = web_router()
    browser = Browser(server.url)
    browser.login("admin", ADMIN_PASSWORD)
    http_port = int(server.url.rsplit(":", 1)[1])
    texts = {port: _form_check(browser, {"type": "dicom", "name": "probe", "host": "127.0.0.1",
                                         "port": str(port), "ae_title": "PACS",
                                         "timeout": "2"})[0]
             for port in (http_port, free_port())}
    assert set(texts.values()) == {NOT_REACHED}, texts


def test_remote_node_echo_answers_refused_and_unknown_alike(
        strict: Any, answers: dict[str, str]) -> None:
    operator = bearer(strict.url, "op", PASSWORD)
    answers["pacs.rebinding.test"] = "10.20.30.40"
    for name, host in (("rebound", "pacs.rebinding.test"), ("unknown", "no-such.invalid")):
        r = requests.post(strict.url + "/api/v1/remote-nodes", headers=operator, timeout=30,
                          json={"name": name, "ae_title": name.upper(), "host": host,
                                "port": 104})
        assert r.status_code == 201, r.text
    answers["pacs.rebinding.test"] = "169.254.169.254"
    messages = {}
    for name in ("rebound", "unknown"):
        started = time.monotonic()
        r = requests.post(strict.url + f"/api/v1/remote-nodes/{name}/echo", headers=operator,
                          timeout=60)
        assert time.monotonic() - started >= 0.95
        assert r.status_code == 200 and r.json()["ok"] is False, r.text
        messages[name] = r.json()["detail"].split(" ", 1)[1]  # after AE@host:port
    assert set(messages.values()) == {NOT_REACHED}, messages


@pytest.mark.dcmtk
def test_a_name_that_turns_loopback_is_refused_at_connect_time(
        strict: Any, answers: dict[str, str], tmp_path: Path, dcmtk: None) -> None:
    """Saved while the name answered a private address; at delivery it answers loopback,
    where a PACS listens: refused before connecting, dead-lettered with the reason."""
    operator = bearer(strict.url, "op", PASSWORD)
    with StoreScp(tmp_path / "scp") as scp:
        answers["pacs.rebinding.test"] = "10.20.30.40"
        body = dicom("pacs", "pacs.rebinding.test", scp.port, ae_title="STORESCP")
        assert requests.post(strict.url + API, json=body, headers=operator,
                             timeout=30).status_code == 201
        assert requests.post(strict.url + "/api/v1/rules", headers=operator, timeout=30,
                             json={"name": "all", "destinations": ["pacs"]}).status_code == 201
        answers["pacs.rebinding.test"] = "127.0.0.1"
        storescu(strict.router.dicom.port, [CT_SMALL])
        row: Callable[[], Any] = lambda: strict.router.view_db("jobs").query(  # noqa: E731
            "SELECT status, last_error FROM deliveries WHERE status = 'dead'")
        dead = wait_for(row, 20, "the delivery to be dead-lettered")[0]
        assert "refusing to connect: 127.0.0.1 is a loopback address" in dead["last_error"]
        assert scp.associations() == 0
