"""Locked-out users are shown as locked and can be unlocked (UI, API, command line), recorded
as ``User.Unlocked`` with the acting user; new accounts and remote nodes start with the least
privilege. Against a real router and its web server.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import requests

from router.domain.users import LEAST_PRIVILEGED_ROLE, ROLES, user_id
from tests.conftest import ADMIN_PASSWORD
from tests.web_harness import Browser, bearer
from web.security import ROLE_PERMISSIONS

PASSWORD = "a long password 1"
ROUTER_BIN = Path(sys.executable).parent / "dicom-router"


def token(server: Any, name: str, password: str) -> int:
    return requests.post(server.url + "/api/v1/auth/token", timeout=30,
                         json={"username": name, "password": password}).status_code


def lock_out(server: Any, name: str) -> None:
    for _ in range(server.router.settings.web.max_login_failures):
        assert token(server, name, "wrong password!") == 401
    assert token(server, name, PASSWORD) == 429  # locked: even the right password fails


def unlocked_rows(router: Any) -> list[dict[str, Any]]:
    router.runner.catch_up()
    return router.view_db("audit").query(
        "SELECT actor, detail FROM audit WHERE action = 'User.Unlocked' ORDER BY position")


def reason(row: dict[str, Any]) -> str:
    """The reason an unlock row of the audit view carries (its detail is the event's JSON)."""
    return str(json.loads(row["detail"] or "{}").get("reason", ""))


def test_the_least_privileged_role_has_the_fewest_permissions() -> None:
    def size(role: str) -> float:  # "*": every permission
        return float("inf") if "*" in ROLE_PERMISSIONS[role] else len(ROLE_PERMISSIONS[role])

    fewest = min(ROLES, key=size)
    assert fewest == LEAST_PRIVILEGED_ROLE
    assert not any(p.endswith(".write") for p in ROLE_PERMISSIONS[LEAST_PRIVILEGED_ROLE])


def test_a_locked_out_user_is_shown_and_unlocked_in_the_ui_and_api(web_router: Any) -> None:
    server = web_router()
    admin = bearer(server.url, "admin", ADMIN_PASSWORD)
    made = requests.post(server.url + "/api/v1/users", headers=admin, timeout=30,
                         json={"username": "bob", "password": PASSWORD})
    assert made.status_code == 201 and made.json()["role"] == LEAST_PRIVILEGED_ROLE
    assert made.json()["locked_until"] is None
    lock_out(server, "bob")

    shown = requests.get(server.url + "/api/v1/users/bob", headers=admin, timeout=30).json()
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", shown["locked_until"] or "")
    browser = Browser(server.url)
    browser.login("admin", ADMIN_PASSWORD)
    page = browser.get(browser.url("/users"))
    assert re.search(r"locked until \d\d:\d\d UTC", page.text)
    assert 'action="/users/bob/unlock"' in page.text
    bob_page = browser.get(browser.url("/users/bob")).text
    assert "locked until" in bob_page
    # The account's versions (role, state, tokens) side by side, from its page
    assert f'href="/audit/versions?object={user_id("bob")}"' in bob_page
    assert 'name="reason"' in page.text  # the unlock form asks why
    done = browser.post(browser.url("/users/bob/unlock"), allow_redirects=False,
                        data={"reason": "called the service desk"})
    assert done.status_code == 303 and done.headers["Location"] == "/users/bob?done=unlocked"
    assert "locked until" not in browser.get(browser.url("/users")).text
    assert token(server, "bob", PASSWORD) == 200
    assert [(r["actor"], reason(r)) for r in unlocked_rows(server.router)] == [
        ("admin", "called the service desk")]

    lock_out(server, "bob")
    answer = requests.post(server.url + "/api/v1/users/bob/unlock", headers=admin, timeout=30,
                           json={"reason": "ticket 42"})
    assert answer.status_code == 200 and answer.json()["locked_until"] is None
    assert token(server, "bob", PASSWORD) == 200
    assert requests.post(server.url + "/api/v1/users/ghost/unlock", headers=admin,
                         timeout=30).status_code == 404
    bob = bearer(server.url, "bob", PASSWORD)
    assert requests.post(server.url + "/api/v1/users/bob/unlock", headers=bob,
                         timeout=30).status_code == 403
    bad = requests.post(server.url + "/api/v1/users/bob/unlock", headers=admin, timeout=30,
                        json={"reason": "x" * 501})
    assert bad.status_code == 422 and "reason" in bad.json()["error"]["fields"]
    lock_out(server, "bob")
    bare = requests.post(server.url + "/api/v1/users/bob/unlock", headers=admin, timeout=30)
    assert bare.status_code == 200  # a reason is optional
    assert [reason(r) for r in unlocked_rows(server.router)] == [
        "called the service desk", "ticket 42", ""]


def test_the_cli_unlocks_a_user_of_a_running_router(web_router: Any, tmp_path: Path) -> None:
    server = web_router()
    admin = bearer(server.url, "admin", ADMIN_PASSWORD)
    requests.post(server.url + "/api/v1/users", headers=admin, timeout=30,
                  json={"username": "carol", "role": "operator", "password": PASSWORD})
    lock_out(server, "carol")
    env = {**os.environ, "DICOM_ROUTER_DATABASE_URL": f"sqlite:///{tmp_path / 'db'}",
           "DICOM_ROUTER_SECRET_KEY": "0" * 64}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(ROUTER_BIN), "--data-dir", str(tmp_path / "data"), *args],
                              capture_output=True, text=True, timeout=60, env=env)

    unknown = cli("user", "unlock", "nobody")
    assert unknown.returncode == 2 and "user 'nobody' does not exist" in unknown.stderr
    done = cli("user", "unlock", "carol", "--reason", "new phone")
    assert done.returncode == 0 and "unlocked 'carol'" in done.stdout, done.stderr
    # The web server's process holds the failures; it applies the event at the next login.
    assert token(server, "carol", PASSWORD) == 200
    rows = unlocked_rows(server.router)
    assert len(rows) == 1 and rows[0]["actor"].startswith("cli:")
    assert reason(rows[0]) == "new phone"


def test_new_users_and_remote_nodes_start_with_least_privilege(web_router: Any) -> None:
    server = web_router()
    browser = Browser(server.url)
    browser.login("admin", ADMIN_PASSWORD)
    form = browser.get(browser.url("/users")).text
    selected = re.findall(r'<option value="(\w+)" selected>', form)
    assert selected == [LEAST_PRIVILEGED_ROLE]
    remote = browser.get(browser.url("/remote/new")).text
    assert 'name="service_find"' in remote and " checked" not in remote
    admin = bearer(server.url, "admin", ADMIN_PASSWORD)
    node = requests.post(server.url + "/api/v1/remote-nodes", headers=admin, timeout=30,
                         json={"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                               "port": 104})
    assert node.status_code == 201, node.text
    assert node.json()["services"] == []
    # The CLI still wants a role spelled out.
    assert "--role" in subprocess.run([str(ROUTER_BIN), "user", "add", "x"],
                                      capture_output=True, text=True, timeout=60).stderr


def test_optional_bodies_are_documented_as_optional(web_router: Any) -> None:
    """An unlock, a requeue and a cancel work without a body (the reason is optional); the
    OpenAPI document says so, and still requires the bodies that are required."""
    server = web_router()
    paths = requests.get(server.url + "/api/v1/openapi.json", timeout=30).json()["paths"]
    delivery = "/api/v1/jobs/{job_id}/deliveries/{destination}"
    for path in ("/api/v1/users/{name}/unlock", delivery + "/requeue", delivery + "/cancel"):
        assert paths[path]["post"]["requestBody"]["required"] is False, path
    for path in ("/api/v1/deliveries/requeue", "/api/v1/users"):
        assert paths[path]["post"]["requestBody"]["required"] is True, path
