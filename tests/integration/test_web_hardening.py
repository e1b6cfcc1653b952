"""Small leaks of the web server, closed: a login takes as long for an unknown name as for a
wrong password, /metrics wants a token unless made public, and no answer names the server's
software versions (pages, API, errors, static files, malformed requests)."""

from __future__ import annotations

import socket
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import requests

from router.application.commands import Actor
from tests.conftest import ADMIN_PASSWORD, make_settings
from tests.web_harness import bearer
from web.app import SERVER_NAME

PASSWORD = "a long enough password"
ROUNDS = 5  # logins per kind: about 0.3 s each here


def _login_seconds(server: Any, username: str) -> float:
    started = time.perf_counter()
    r = requests.post(server.url + "/api/v1/auth/token", timeout=30,
                      json={"username": username, "password": "not the password at all"})
    elapsed = time.perf_counter() - started
    assert r.status_code == 401, r.text
    assert r.json()["error"]["message"] == "wrong user name or password"
    return elapsed


@pytest.mark.real_password_cost
def test_unknown_users_disabled_users_and_wrong_passwords_take_the_same_time(
        web_router: Any, tmp_path: Path) -> None:
    """Medians of a few interleaved tries of each kind, compared with a generous ratio: the
    difference this guards against is 40-fold (a cheap dummy hash: 6 ms against 250 ms)."""
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'db'}")
    server = web_router(replace(settings, web=replace(settings.web, max_login_failures=100)))
    users = server.router.users
    users.add("alice", "operator", PASSWORD, Actor("admin"))
    users.add("gone", "operator", PASSWORD, Actor("admin"))
    users.set_disabled("gone", True, Actor("admin"))
    _login_seconds(server, "warm-up")  # the first request pays for imports and connections
    times: dict[str, list[float]] = {"unknown": [], "wrong password": [], "disabled": []}
    for i in range(ROUNDS):
        times["unknown"].append(_login_seconds(server, f"nobody-{i}"))
        times["wrong password"].append(_login_seconds(server, "alice"))
        times["disabled"].append(_login_seconds(server, "gone"))
    medians = {kind: statistics.median(values) for kind, values in times.items()}
    print("login medians (ms):", {k: round(1000 * v) for k, v in medians.items()})
    assert max(medians.values()) < 2.5 * min(medians.values()), medians


def test_metrics_need_a_token_with_the_permission(web_router: Any) -> None:
    server = web_router()
    users = server.router.users
    users.add("op", "operator", PASSWORD, Actor("admin"))
    users.add("rad", "radiologist", PASSWORD, Actor("admin"))
    anonymous = requests.get(server.url + "/metrics", timeout=10, allow_redirects=False)
    assert anonymous.status_code == 401 and "Bearer" in anonymous.headers["WWW-Authenticate"]
    assert "dicom_router" not in anonymous.text
    admin = requests.get(server.url + "/metrics", timeout=10,
                         headers=bearer(server.url, "admin", ADMIN_PASSWORD))
    assert admin.status_code == 200 and "dicom_router_receipts" in admin.text
    scraper = users.create_token("op", "prometheus", Actor("op")).value
    assert requests.get(server.url + "/metrics", timeout=10,
                        headers={"Authorization": f"Bearer {scraper}"}).status_code == 200
    assert requests.get(server.url + "/metrics", timeout=10,
                        headers=bearer(server.url, "rad", PASSWORD)).status_code == 403


def test_metrics_can_be_made_public(web_router: Any, tmp_path: Path) -> None:
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'db'}")
    server = web_router(replace(settings, web=replace(settings.web, public_metrics=True)))
    r = requests.get(server.url + "/metrics", timeout=10)
    assert r.status_code == 200 and "dicom_router_deliveries" in r.text


def _raw_answer(server: Any, request: bytes) -> bytes:
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(request)
        answer = b""
        while b"\r\n\r\n" not in answer and (chunk := conn.recv(4096)):
            answer += chunk
    return answer


def test_no_answer_names_the_server_software(web_router: Any) -> None:
    server = web_router()
    auth = bearer(server.url, "admin", ADMIN_PASSWORD)
    answers = {
        "static file": requests.get(server.url + "/static/app.css", timeout=10),
        "404": requests.get(server.url + "/no/such/page", timeout=10),
        "API call": requests.get(server.url + "/api/v1/auth/me", headers=auth, timeout=10),
        "API 401": requests.get(server.url + "/api/v1/jobs", timeout=10),
        "page": requests.get(server.url + "/login", timeout=10),
        "redirect": requests.get(server.url + "/jobs", timeout=10, allow_redirects=False),
    }
    assert answers["static file"].status_code == 200 and answers["404"].status_code == 404
    assert answers["API call"].status_code == 200 and answers["API 401"].status_code == 401
    for what, response in answers.items():
        assert response.headers["Server"] == SERVER_NAME, what
    for malformed in (b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n"):
        head = _raw_answer(server, malformed).split(b"\r\n\r\n")[0].decode("latin-1")
        assert head.startswith("HTTP/1.") and " 400 " in head.split("\r\n")[0], head
        assert f"\r\nServer: {SERVER_NAME}" in head and "aiohttp" not in head.lower(), head
        assert "python" not in head.lower(), head
