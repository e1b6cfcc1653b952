"""Users, accounts and settings through the real web application: the admin API and forms,
self-service password and API tokens, disabled users, password policy messages, the last
admin, runtime settings recorded as events with the user as actor."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import requests

from tests.conftest import ADMIN_PASSWORD, make_settings
from tests.web_harness import CSRF_META, Browser, bearer

PASSWORD = "a long enough password"
LONG = "é" * 40  # 80 bytes in UTF-8: over bcrypt's 72


def api(server: Any, method: str, path: str, headers: dict[str, str],
        **kwargs: Any) -> requests.Response:
    return requests.request(method, server.url + path, headers=headers, timeout=30, **kwargs)


def create(server: Any, admin: dict[str, str], name: str, role: str,
           password: str = PASSWORD) -> requests.Response:
    return api(server, "POST", "/api/v1/users", admin,
               json={"username": name, "role": role, "password": password})


def me(server: Any, headers: dict[str, str]) -> requests.Response:
    return api(server, "GET", "/api/v1/auth/me", headers)


def refresh_csrf(browser: Browser) -> None:
    found = CSRF_META.search(browser.get(browser.url("/account")).text)
    browser.csrf = found.group(1) if found else ""


def test_admin_manages_users_through_the_api_and_they_log_in_with_their_role(
    web_router: Any,
) -> None:
    server = web_router()
    admin = bearer(server.url, "admin", ADMIN_PASSWORD)
    r = create(server, admin, "olga", "operator")
    assert r.status_code == 201, r.text
    assert r.json() == {"username": "olga", "role": "operator", "disabled": False,
                        "locked_until": None, "tokens": []}
    assert create(server, admin, "olga", "auditor").status_code == 409
    listing = api(server, "GET", "/api/v1/users", admin)
    assert [u["username"] for u in listing.json()["items"]] == ["admin", "olga"]
    assert "$2b$" not in listing.text and "hash" not in listing.text

    olga = bearer(server.url, "olga", PASSWORD)
    assert me(server, olga).json()["role"] == "operator"
    assert api(server, "GET", "/api/v1/users", olga).status_code == 403
    r = api(server, "PATCH", "/api/v1/users/olga", admin, json={"role": "auditor"})
    assert r.status_code == 200 and r.json()["role"] == "auditor"
    assert me(server, olga).json()["role"] == "auditor"  # at once, same session
    browser = Browser(server.url)
    browser.login("olga", PASSWORD)
    assert browser.get(browser.url("/users")).status_code == 403
    assert browser.get(browser.url("/account")).status_code == 200

    r = api(server, "POST", "/api/v1/users/olga/password", admin,
            json={"password": "a brand new password"})
    assert r.status_code == 200
    assert me(server, olga).status_code == 401  # her sessions ended with the old password
    assert bearer(server.url, "olga", "a brand new password")
    events = [n for n in server.router.stores.admin.recorder.select_notifications(0, 1000)
              if n.topic.startswith("router.domain.users:User.")]
    actors = {n.topic.rsplit(".", 1)[1]: server.router.stores.admin.mapper
              .to_domain_event(n).actor for n in events}
    assert actors["RoleChanged"] == "admin" and actors["PasswordChanged"] == "admin"


def test_password_policy_errors_are_field_level_messages(web_router: Any) -> None:
    server = web_router()
    admin = bearer(server.url, "admin", ADMIN_PASSWORD)
    r = create(server, admin, "shorty", "auditor", "short")
    assert r.status_code == 422
    assert "at least 12" in r.json()["error"]["fields"]["password"]
    r = create(server, admin, "longy", "auditor", LONG)
    assert r.status_code == 422 and "72 bytes" in r.json()["error"]["fields"]["password"]
    r = create(server, admin, "bad name!", "auditor")
    assert r.status_code == 422 and "username" in r.json()["error"]["fields"]
    r = create(server, admin, "x", "superuser")
    assert r.status_code == 422 and "role" in r.json()["error"]["fields"]
    assert create(server, admin, "amy", "auditor").status_code == 201
    r = api(server, "POST", "/api/v1/users/amy/password", admin, json={"password": LONG})
    assert r.status_code == 422 and "72 bytes" in r.json()["error"]["fields"]["password"]
    amy = bearer(server.url, "amy", PASSWORD)
    r = api(server, "POST", "/api/v1/account/password", amy,
            json={"current_password": PASSWORD, "new_password": LONG})
    assert r.status_code == 422 and "72 bytes" in r.json()["error"]["fields"]["new_password"]
    r = api(server, "POST", "/api/v1/account/password", amy,
            json={"current_password": "not my password", "new_password": "another good one"})
    assert r.status_code == 422 and "current_password" in r.json()["error"]["fields"]

    browser = Browser(server.url)
    browser.login("admin", ADMIN_PASSWORD)
    r = browser.post(browser.url("/users"), data={
        "username": "longform", "role": "auditor", "password": LONG, "confirm": LONG})
    assert r.status_code == 422 and "72 bytes" in r.text and LONG not in r.text
    r = browser.post(browser.url("/users"), data={
        "username": "mismatch", "role": "auditor", "password": PASSWORD, "confirm": "other"})
    assert r.status_code == 422 and "does not match" in r.text
    r = browser.post(browser.url("/users/amy/password"), data={"password": "short",
                                                               "confirm": "short"})
    assert r.status_code == 422 and "at least 12" in r.text
    names = [u.name for u in server.router.users.all()]
    assert names == ["admin", "amy"]


def test_user_forms_create_change_and_escape_hostile_labels(web_router: Any) -> None:
    server = web_router()
    browser = Browser(server.url)
    browser.login("admin", ADMIN_PASSWORD)
    r = browser.post(browser.url("/users"), data={
        "username": "rita", "role": "radiologist", "password": PASSWORD, "confirm": PASSWORD})
    assert r.status_code == 200 and r.url.endswith("/users/rita?done=created")
    assert "User created." in r.text
    assert "rita" in browser.get(browser.url("/users")).text
    r = browser.post(browser.url("/users/rita/role"), data={"role": "auditor"})
    assert "Role changed." in r.text and server.router.users.get("rita").role == "auditor"

    hostile = '<script>alert("x")</script>'
    r = browser.post(browser.url("/users/rita/tokens"), data={"label": hostile})
    assert r.status_code == 200 and r.headers["Cache-Control"] == "no-store"
    assert "<script>alert" not in r.text and "&lt;script&gt;alert" in r.text
    value = re.search(r'id="new-token-value">(drt_[^<]+)<', r.text).group(1)
    assert requests.get(server.url + "/api/v1/auth/me", timeout=10,
                        headers={"Authorization": f"Bearer {value}"}).json()["username"] == "rita"
    again = browser.get(browser.url("/users/rita"))
    assert value not in again.text and "&lt;script&gt;" in again.text  # shown once
    token_id = next(iter(server.router.users.get("rita").tokens))
    r = browser.post(browser.url(f"/users/rita/tokens/{token_id}/revoke"))
    assert "API token revoked." in r.text
    assert requests.get(server.url + "/api/v1/auth/me", timeout=10,
                        headers={"Authorization": f"Bearer {value}"}).status_code == 401


def test_a_disabled_user_cannot_log_in_and_its_sessions_and_tokens_stop(
    web_router: Any, tmp_path: Path, database_url: str,
) -> None:
    server = web_router(make_settings(tmp_path, database_url))
    admin = Browser(server.url)
    admin.login("admin", ADMIN_PASSWORD)
    admin.post(admin.url("/users"), data={
        "username": "dora", "role": "operator", "password": PASSWORD, "confirm": PASSWORD})
    dora = Browser(server.url)
    dora.login("dora", PASSWORD)
    assert dora.get(dora.url("/account")).status_code == 200
    session = bearer(server.url, "dora", PASSWORD)
    token = api(server, "POST", "/api/v1/account/tokens", session, json={"label": "script"})
    assert token.status_code == 201
    script = {"Authorization": f"Bearer {token.json()['token']}"}
    assert me(server, script).status_code == 200

    r = admin.post(admin.url("/users/dora/disabled"), data={"disabled": "1"})
    assert "User disabled" in r.text
    page = dora.get(dora.url("/account"), allow_redirects=False)
    assert page.status_code == 302 and page.headers["Location"].startswith("/login")
    assert me(server, session).status_code == 401
    assert me(server, script).status_code == 401
    assert Browser(server.url).login("dora", PASSWORD).status_code == 401

    r = admin.post(admin.url("/users/dora/disabled"), data={"disabled": "0"})
    assert "User enabled." in r.text
    assert Browser(server.url).login("dora", PASSWORD).status_code == 200
    assert me(server, script).status_code == 200  # never revoked, only suspended


def test_own_api_tokens_are_shown_once_and_work_until_revoked(web_router: Any) -> None:
    server = web_router()
    admin = bearer(server.url, "admin", ADMIN_PASSWORD)
    create(server, admin, "tom", "radiologist")
    tom = bearer(server.url, "tom", PASSWORD)
    r = api(server, "POST", "/api/v1/account/tokens", tom, json={"label": "viewer sync"})
    assert r.status_code == 201
    created = r.json()
    assert created["token"].startswith("drt_") and created["label"] == "viewer sync"
    listing = api(server, "GET", "/api/v1/account/tokens", tom)
    assert listing.json()["items"] == [{"id": created["id"], "label": "viewer sync",
                                        "revoked": False}]
    assert created["token"] not in listing.text
    assert created["token"] not in api(server, "GET", "/api/v1/users/tom", admin).text
    token = {"Authorization": f"Bearer {created['token']}"}
    assert me(server, token).json() == {"username": "tom", "role": "radiologist",
                                        "authenticated_by": "api_token"}
    assert api(server, "DELETE", f"/api/v1/account/tokens/{created['id']}",
               tom).status_code == 200
    assert me(server, token).status_code == 401
    assert api(server, "GET", "/api/v1/users/tom/tokens", admin).json()["items"][0]["revoked"]
    assert api(server, "DELETE", "/api/v1/account/tokens/nope", tom).status_code == 404
    # An admin creates and revokes tokens of other users the same way.
    r = api(server, "POST", "/api/v1/users/tom/tokens", admin, json={"label": "by admin"})
    assert me(server, {"Authorization": f"Bearer {r.json()['token']}"}).status_code == 200
    assert api(server, "DELETE", f"/api/v1/users/tom/tokens/{r.json()['id']}",
               admin).status_code == 200


def test_account_page_changes_the_own_password_and_stays_logged_in(web_router: Any) -> None:
    server = web_router()
    admin = bearer(server.url, "admin", ADMIN_PASSWORD)
    create(server, admin, "ann", "auditor")
    elsewhere = Browser(server.url)
    elsewhere.login("ann", PASSWORD)
    browser = Browser(server.url)
    browser.login("ann", PASSWORD)
    r = browser.post(browser.url("/account/password"), data={
        "current_password": "wrong password!!", "new_password": "a new password 1",
        "confirm": "a new password 1"})
    assert r.status_code == 422 and "current password is wrong" in r.text
    r = browser.post(browser.url("/account/password"), data={
        "current_password": PASSWORD, "new_password": "a new password 1",
        "confirm": "a new password 1"})
    assert r.status_code == 200 and r.url.endswith("/account?done=password")
    assert "Password changed" in r.text
    refresh_csrf(browser)
    r = browser.post(browser.url("/account/tokens"), data={"label": "mine"})
    assert r.status_code == 200 and "drt_" in r.text  # still logged in, new CSRF token
    gone = elsewhere.get(elsewhere.url("/account"), allow_redirects=False)
    assert gone.status_code == 302
    assert Browser(server.url).login("ann", PASSWORD).status_code == 401
    assert Browser(server.url).login("ann", "a new password 1").status_code == 200


def test_the_last_enabled_admin_cannot_be_demoted_or_disabled(web_router: Any) -> None:
    server = web_router()
    admin = bearer(server.url, "admin", ADMIN_PASSWORD)
    r = api(server, "PATCH", "/api/v1/users/admin", admin, json={"role": "operator"})
    assert r.status_code == 422 and "last enabled admin" in r.json()["error"]["message"]
    r = api(server, "PATCH", "/api/v1/users/admin", admin, json={"disabled": True})
    assert r.status_code == 422 and "own account" in r.json()["error"]["message"]
    browser = Browser(server.url)
    browser.login("admin", ADMIN_PASSWORD)
    r = browser.post(browser.url("/users/admin/role"), data={"role": "auditor"})
    assert r.status_code == 422 and "last enabled admin" in r.text
    assert server.router.users.get("admin").role == "admin"

    create(server, admin, "boss", "admin")
    boss = bearer(server.url, "boss", PASSWORD)
    r = api(server, "PATCH", "/api/v1/users/admin", boss, json={"disabled": True})
    assert r.status_code == 200 and r.json()["disabled"] is True
    r = api(server, "PATCH", "/api/v1/users/boss", boss, json={"role": "operator"})
    assert r.status_code == 422 and "last enabled admin" in r.text
    r = api(server, "PATCH", "/api/v1/users/admin", boss, json={"disabled": False})
    assert r.status_code == 200
    assert api(server, "PATCH", "/api/v1/users/boss", boss,
               json={"role": "operator"}).status_code == 200
    # Disabling ended admin's sessions for good; enabling again revives none of them.
    assert api(server, "GET", "/api/v1/users", admin).status_code == 401
    admin = bearer(server.url, "admin", ADMIN_PASSWORD)
    assert api(server, "PATCH", "/api/v1/users/ghost", admin,
               json={"role": "operator"}).status_code == 404


def test_settings_show_the_effective_configuration_without_secrets(web_router: Any) -> None:
    server = web_router()
    admin = bearer(server.url, "admin", ADMIN_PASSWORD)
    r = api(server, "GET", "/api/v1/settings", admin)
    assert r.status_code == 200
    sections = r.json()["sections"]
    assert set(sections) == {"server", "dicom", "dispatch", "ingest", "web", "storage",
                             "audit", "atna"}
    assert sections["audit"]["retention_days"] == {"value": 2192, "source": "default",
                                                   "changeable": False}
    assert sections["atna"]["host"]["value"] == ""  # not sending
    assert sections["server"]["secret_key"]["value"] == "set"
    assert sections["server"]["admin_password"]["value"] == "set"
    assert ADMIN_PASSWORD not in r.text and "0" * 64 not in r.text
    assert sections["web"]["min_password_length"] == {"value": 12, "source": "default",
                                                      "changeable": False}
    assert sections["dicom"]["processes"]["source"] != "default"  # the tests set 0
    retention = sections["storage"]["retention_days"]
    assert retention["changeable"] and retention["value"] == 0

    r = api(server, "PUT", "/api/v1/settings/storage.retention_days", admin,
            json={"value": 30})
    assert r.status_code == 200 and r.json()["value"] == 30
    assert r.json()["changed_by"] == "admin" and r.json()["file_value"] == 0
    assert server.router.retention.retention_days == 30
    r = api(server, "PUT", "/api/v1/settings/storage.retention_days", admin, json={"value": -1})
    assert r.status_code == 422
    assert r.json()["error"]["fields"] == {"value": "must be between 0 and 36500, got -1"}
    r = api(server, "PUT", "/api/v1/settings/storage.retention_days", admin,
            json={"value": "30"})
    assert r.status_code == 422
    r = api(server, "PUT", "/api/v1/settings/dicom.max_associations", admin, json={"value": 5})
    assert r.status_code == 422 and "TOML file" in r.json()["error"]["message"]
    assert api(server, "PUT", "/api/v1/settings/nope.nothing", admin,
               json={"value": 5}).status_code == 404


def test_settings_page_changes_retention_as_the_user(web_router: Any) -> None:
    server = web_router()
    admin = bearer(server.url, "admin", ADMIN_PASSWORD)
    api(server, "PUT", "/api/v1/settings/storage.retention_days", admin, json={"value": 30})
    browser = Browser(server.url)
    browser.login("admin", ADMIN_PASSWORD)
    page = browser.get(browser.url("/settings"))
    assert "changed at run time by <strong>admin</strong>" in page.text
    assert ADMIN_PASSWORD not in page.text
    r = browser.post(browser.url("/settings/storage.retention_days"), data={"value": "abc"})
    assert r.status_code == 422 and "expected a whole number, got &#39;abc&#39;" in r.text
    # The file's words for the file's range (StorageSettings.retention_days).
    r = browser.post(browser.url("/settings/storage.retention_days"), data={"value": "-1"})
    assert r.status_code == 422 and "must be between 0 and 36500, got -1" in r.text
    r = browser.post(browser.url("/settings/storage.retention_days"),
                     data={"value": "7", "reset": "1"})
    assert "Setting changed." in r.text and server.router.retention.retention_days == 0
    changes = [server.router.stores.admin.mapper.to_domain_event(n) for n in
               server.router.stores.admin.recorder.select_notifications(0, 1000)
               if n.topic.endswith("RuntimeSettings.Changed")]
    assert [(e.actor, e.name, e.value, e.previous) for e in changes] == [
        ("admin", "storage.retention_days", 30, None),
        ("admin", "storage.retention_days", None, 30)]


def test_settings_and_users_are_refused_to_other_roles(web_router: Any) -> None:
    server = web_router()
    admin = bearer(server.url, "admin", ADMIN_PASSWORD)
    create(server, admin, "opal", "operator")
    opal = bearer(server.url, "opal", PASSWORD)
    for method, path in (("GET", "/api/v1/users"), ("GET", "/api/v1/settings"),
                         ("PUT", "/api/v1/settings/storage.retention_days"),
                         ("GET", "/api/v1/storage"), ("POST", "/api/v1/storage/purge")):
        assert api(server, method, path, opal, json={"value": 1}).status_code == 403, path
    assert api(server, "GET", "/api/v1/account", opal).json()["username"] == "opal"


def test_database_passwords_are_masked() -> None:
    from web.api.settings import mask_url

    assert mask_url("postgresql://router:s3cret@db:5432/router") == \
        "postgresql://router:***@db:5432/router"
    assert mask_url("sqlite:///data/db") == "sqlite:///data/db"


def test_no_route_of_these_modules_answers_500_to_empty_or_odd_input(web_router: Any) -> None:
    from web.routes import all_routes

    server = web_router()
    admin = bearer(server.url, "admin", ADMIN_PASSWORD)
    browser = Browser(server.url)
    browser.login("admin", ADMIN_PASSWORD)
    mine = ("web.api.users", "web.pages.users", "web.api.settings", "web.pages.settings",
            "web.api.storage", "web.pages.storage")
    routes = [r for r in all_routes() if r.handler.__module__ in mine]
    assert len(routes) >= 30
    for route in routes:
        for name in ("admin", "x" * 70, "%3Cscript%3E"):
            path = re.sub(r"\{[^}]+\}", name, route.path)
            as_api = requests.request(route.method, server.url + path, headers=admin,
                                      json={"value": "x", "role": 5}, timeout=30,
                                      allow_redirects=False)
            as_form = browser.request(route.method, server.url + path, timeout=30,
                                      data={"value": "", "role": "x", "disabled": "1"},
                                      allow_redirects=False)
            for r in (as_api, as_form):
                assert r.status_code < 500, (route.method, path, r.status_code, r.text[:300])
                if r.headers.get("Content-Type", "").startswith("text/html"):
                    assert "<script>" not in r.text, (route.method, path)


def test_settings_show_the_key_file_as_the_master_key(web_router: Any, tmp_path: Path
                                                      ) -> None:
    """Bug 4: without secret_key the router uses data/secret.key, yet settings said
    "secret_key: not set"."""
    from dataclasses import replace

    server = web_router(replace(make_settings(tmp_path, f"sqlite:///{tmp_path / 'db'}"),
                                secret_key=None))
    key_file = tmp_path / "data" / "secret.key"
    assert key_file.is_file()  # made at the first start and used since
    admin = bearer(server.url, "admin", ADMIN_PASSWORD)
    shown = api(server, "GET", "/api/v1/settings", admin).json()["sections"]["server"]
    assert shown["secret_key"] == {"value": "set", "source": f"key file {key_file}",
                                   "changeable": False}
    assert key_file.read_text().strip() not in api(server, "GET", "/api/v1/settings",
                                                   admin).text
    browser = Browser(server.url)
    browser.login("admin", ADMIN_PASSWORD)
    page = browser.get(browser.url("/settings")).text
    assert "not set" not in page.split("secret_key", 1)[1][:300]
